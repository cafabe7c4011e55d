"""The training step's loss, against an independent computation of what each recipe option means."""
import numpy as np
import paddle
import pytest

from trainer.engine import train_loss

N, K = 6, 5


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("smoothing, alpha", [(0.0, 0.0), (0.1, 0.0), (0.0, 0.2), (0.1, 0.2), (0.3, 1.0)])
def test_the_training_loss_is_cross_entropy_against_the_smoothed_mixed_target(smoothing, alpha):
    rng = np.random.default_rng(0)
    imgs = rng.standard_normal((N, 2, 3, 4, 4)).astype(np.float32)
    labels = np.array([0, 3, 4, 1, 2, 3])
    paddle.seed(0)
    net = paddle.nn.Sequential(paddle.nn.Flatten(), paddle.nn.Linear(2 * 3 * 4 * 4, K))
    loss, logits = train_loss(net, paddle.to_tensor(imgs), paddle.to_tensor(labels), smoothing, alpha,
                              np.random.default_rng(5))

    # mixup (Zhang et al. 2018) as documented: lam ~ Beta(alpha, alpha), then a permutation of the batch
    soft = np.eye(K)[labels] * (1 - smoothing) + smoothing / K
    x, target = imgs, soft
    if alpha > 0:
        draw = np.random.default_rng(5)
        lam, perm = draw.beta(alpha, alpha), draw.permutation(N)
        assert 0.05 < lam < 0.95  # both targets weigh in this test
        x, target = lam * imgs + (1 - lam) * imgs[perm], lam * soft + (1 - lam) * soft[perm]
    weight, bias = (p.numpy().astype(np.float64) for p in net.parameters())
    expected_logits = x.reshape(N, -1).astype(np.float64) @ weight + bias
    expected = -(target * _log_softmax(expected_logits)).sum(axis=1).mean()
    np.testing.assert_allclose(logits.numpy(), expected_logits, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)


def test_evaluate_counts_every_sample_once_including_the_last_partial_batch(tmp_path):
    """7 clips in batches of 3: the result covers exactly the 7, and matches scoring each clip alone."""
    from dali_pipelines import build_loader
    from dali_pipelines.formats import write_pkl
    from trainer import dist
    from trainer.config import load_config
    from trainer.engine import evaluate
    from trainer.models import build_model

    from .media import index_frames, jpeg
    lines = []
    for i in range(7):
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", i % K, [jpeg(f) for f in index_frames(6 + 5 * i)])
        lines.append(f"c{i}.pkl")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "c.yaml").write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 5}\n")
    paddle.seed(0)
    model = build_model(load_config(str(tmp_path / "c.yaml")))
    env = dist.Env(0, 1, "cpu", None)

    def loader(batch_size):
        return build_loader(str(tmp_path / "list.txt"), "pkl", "val", batch_size=batch_size, num_segments=2,
                            target_size=32, short_size=32, num_workers=0)

    result = evaluate(model, loader(3), env, num_classes=K)
    model.eval()
    hits, losses = [], []
    with paddle.no_grad():
        for imgs, labels in loader(1):
            logits, label = model(imgs).numpy().astype(np.float64), int(labels.numpy()[0])
            hits.append(int(logits.argmax() == label))
            losses.append(-_log_softmax(logits)[0, label])
    assert result["samples"] == len(hits) == 7 and int(result["confusion"].sum()) == 7
    np.testing.assert_allclose(result["top1"], np.mean(hits))
    np.testing.assert_allclose(result["loss"], np.mean(losses), rtol=1e-4)
