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
