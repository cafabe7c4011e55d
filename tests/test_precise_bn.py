"""Precise-BN: the running statistics become the average of the batch statistics, over ranks too."""

import numpy as np
import paddle

from trainer import dist
from trainer.precise_bn import batch_norms, precise_bn

from .tiny import tiny_model


def _bn_buffers(model):
    return [b.numpy().copy() for bn in batch_norms(model) for b in (bn._mean, bn._variance)]


def test_precise_bn_sets_running_stats_to_the_average_of_batch_statistics(tmp_path):
    _, model = tiny_model(tmp_path)
    batches = [(paddle.randn([2, 3, 3, 32, 32]) * (1 + i), None) for i in range(5)]
    first = batch_norms(model)[0]
    seen = []
    hook = first.register_forward_pre_hook(lambda layer, inputs: seen.append(inputs[0].numpy()))
    before = first._mean.numpy().copy()
    assert precise_bn(model, batches, dist.Env(0, 1, "cpu", None)) == 5
    hook.remove()
    means = np.stack([x.mean(axis=(0, 2, 3)) for x in seen])
    variances = np.stack([x.var(axis=(0, 2, 3)) for x in seen])
    np.testing.assert_allclose(first._mean.numpy(), means.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(first._variance.numpy(), variances.mean(0), rtol=1e-4, atol=1e-5)
    assert not np.allclose(before, first._mean.numpy())
    assert first._momentum == 0.9  # the layer's own momentum is restored


def test_precise_bn_averages_the_statistics_over_ranks(tmp_path, monkeypatch):
    """Rank 0 of two, in one process: the peer's contribution to each all-reduce is what rank 1's
    precise-BN computed on its own batches, so the result must be the mean of both ranks' statistics."""
    batches = {r: [(paddle.randn([2, 3, 3, 32, 32]) * (1 + 2 * r) + r, None) for _ in range(3)] for r in (0, 1)}
    local = {}
    for r in (0, 1):
        _, model = tiny_model(tmp_path)
        precise_bn(model, batches[r], dist.Env(0, 1, "cpu", None))
        local[r] = _bn_buffers(model)
    peer = iter(local[1])
    monkeypatch.setattr(dist.dist, "all_reduce", lambda t, *a, **k: t.set_value(t + paddle.to_tensor(next(peer))))
    _, model = tiny_model(tmp_path)
    precise_bn(model, batches[0], dist.Env(0, 2, "cpu", None))
    assert next(peer, None) is None  # every buffer was reduced
    for got, a, b in zip(_bn_buffers(model), local[0], local[1]):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(local[0][0], local[1][0])


def test_precise_bn_takes_the_float16_batches_of_an_amp_loader(tmp_path):
    """With AMP in float16 the loader yields float16 clips; the statistics come out as from float32."""
    batches = [(paddle.randn([2, 3, 3, 32, 32]) * (1 + i), None) for i in range(3)]
    stats = {}
    for dtype in ("float32", "float16"):
        _, model = tiny_model(tmp_path)
        precise_bn(model, [(x.astype(dtype), y) for x, y in batches], dist.Env(0, 1, "cpu", None))
        stats[dtype] = _bn_buffers(model)
    for a, b in zip(stats["float32"], stats["float16"]):
        np.testing.assert_allclose(a, b, rtol=2e-2, atol=2e-3)
