"""The training engine: the loss against an independent computation of each recipe option, and evaluation
counts. Resume is tests/test_checkpoint.py."""

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
    loss, logits = train_loss(
        net, paddle.to_tensor(imgs), paddle.to_tensor(labels), smoothing, alpha, np.random.default_rng(5)
    )

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
    from clipdata.pkl import write_pkl
    from dali_pipelines import build_loader
    from tools.media import index_frames, jpeg
    from trainer import dist
    from trainer.engine import evaluate

    from .tiny import tiny_model

    lines = []
    for i in range(7):
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", i % K, [jpeg(f) for f in index_frames(6 + 5 * i)])
        lines.append(f"c{i}.pkl")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    _, model = tiny_model(tmp_path)
    env = dist.Env(0, 1, "cpu", None)

    def loader(batch_size):
        return build_loader(
            str(tmp_path / "list.txt"),
            "pkl",
            "val",
            batch_size=batch_size,
            num_segments=2,
            target_size=32,
            short_size=32,
            num_workers=0,
        )

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


def test_evaluate_top1_and_top5_against_each_label_rank_counted_directly():
    """Top-k by its definition, computed apart from the code under test: a clip counts for top-k when
    fewer than k classes score above its label. Labels sit at every rank 0..9 of 10 classes, so a
    top-5 that took 4 (or 6) classes is off."""
    from trainer import dist
    from trainer.engine import evaluate

    rng = np.random.default_rng(3)
    scores = rng.permutation(40 * 10).reshape(40, 10).astype(np.float32)  # distinct: no ties
    order = np.argsort(-scores, axis=1)
    labels = order[np.arange(40), np.arange(40) % 10]  # the label of clip i is its (i % 10)-th best class
    above = (scores > scores[np.arange(40), labels][:, None]).sum(axis=1)
    assert sorted(set(above.tolist())) == list(range(10))

    class Batches:  # a loader of ready logits: the identity model turns them into the scores
        skipped = 0

        def __iter__(self):
            for i in range(0, 40, 16):
                yield paddle.to_tensor(scores[i : i + 16]), paddle.to_tensor(labels[i : i + 16])

    result = evaluate(paddle.nn.Identity(), Batches(), dist.Env(0, 1, "cpu", None), num_classes=10)
    assert result["samples"] == 40
    assert result["top1"] == pytest.approx(np.mean(above < 1)) == pytest.approx(0.1)
    assert result["top5"] == pytest.approx(np.mean(above < 5)) == pytest.approx(0.5)


def test_mean_class_accuracy_averages_the_classes_the_list_holds():
    """Mean class accuracy by its definition: top-1 within each class present in the list, averaged
    over those classes only (classes 4 and 5 of 6 have no clip here; counting them as 0 lowers it)."""
    from trainer import dist
    from trainer.engine import evaluate

    labels = np.array([0, 0, 0, 1, 1, 2, 3, 3, 3, 3])
    guess = np.array([0, 1, 0, 1, 1, 0, 3, 3, 2, 4])
    scores = np.eye(6, dtype=np.float32)[guess]

    class Batches:
        skipped = 0

        def __iter__(self):
            yield paddle.to_tensor(scores), paddle.to_tensor(labels)

    result = evaluate(paddle.nn.Identity(), Batches(), dist.Env(0, 1, "cpu", None), num_classes=6)
    per_class = [np.mean(guess[labels == c] == c) for c in (0, 1, 2, 3)]  # 2/3, 1, 0, 1/2
    assert result["mean_class_accuracy"] == pytest.approx(np.mean(per_class)) == pytest.approx(13 / 24)
