"""Checkpoints survive kills, resume repeats the original run exactly, precise-BN is what it claims."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from trainer import checkpoint, dist, weights
from trainer.config import load_config
from trainer.models import build_model
from trainer.precise_bn import batch_norms, precise_bn

from .tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(cfg, *overrides, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "main.py"), "train", "-c", cfg]
    for o in overrides:
        cmd += ["-o", o]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _digest(output):
    return re.search(r"rank 0: weights digest (\w+)", output).group(1)


@pytest.mark.slow
def test_resume_after_kill_minus_9_gives_the_same_weights_as_training_straight(demo_dataset, tmp_path):
    straight = _train(tiny_config(tmp_path / "a.yaml", demo_dataset, tmp_path / "a", epochs=4))
    cfg = tiny_config(tmp_path / "b.yaml", demo_dataset, tmp_path / "b", epochs=4)
    proc = _train(cfg, wait=False)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once epoch 2 is evaluated, wherever the run is then
        if metrics.exists() and any(json.loads(x).get("mode") == "val" and json.loads(x)["epoch"] >= 2
                                    for x in metrics.read_text().splitlines()):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = weights.load_checkpoint(str(tmp_path / "b" / "latest.pdckpt"))["meta"]["epoch"]
    assert 1 <= done < 4
    resumed = _train(cfg, "resume=auto")
    assert f"resumed from {tmp_path / 'b' / 'latest.pdckpt'} at epoch {done}" in resumed
    assert _digest(resumed) == _digest(straight)
    records = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert sorted({r["epoch"] for r in records if r["mode"] == "val"}) == [1, 2, 3, 4]


def test_resume_names_a_missing_checkpoint(demo_dataset, tmp_path):
    cfg = tiny_config(tmp_path / "c.yaml", demo_dataset, tmp_path / "c")
    result = subprocess.run([sys.executable, os.path.join(ROOT, "trainer", "main.py"), "train", "-c", cfg,
                             "-o", f"resume={tmp_path}/nope.pdckpt"], capture_output=True, text=True)
    assert result.returncode == 1 and "nope.pdckpt does not exist" in result.stderr


_WRITER = """
import sys, paddle
sys.path.insert(0, {root!r})
from trainer import checkpoint
m = paddle.nn.Linear(4, 4)
print("go", flush=True)
checkpoint.save({{"model": m.state_dict(), "big": paddle.zeros([150_000_000])}}, {path!r})
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    path = tmp_path / "latest.pdckpt"
    model = paddle.nn.Linear(4, 4)
    opt = paddle.optimizer.Momentum(0.1, parameters=model.parameters())
    checkpoint.save_state(str(path), model, opt, epoch=3, step=30, best={"top1": 0.5})
    before = path.read_bytes()
    proc = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=ROOT, path=str(path))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "go"
    deadline = time.time() + 60
    while not any(".tmp-" in n for n in os.listdir(tmp_path)) and time.time() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    assert weights.load_checkpoint(str(path))["meta"]["epoch"] == 3
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert os.listdir(tmp_path) == ["latest.pdckpt"]


def test_precise_bn_sets_running_stats_to_the_average_of_batch_statistics(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 5}\n")
    model = build_model(load_config(str(p)))
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


def _tiny_model(tmp_path, seed=0):
    p = tmp_path / "tiny.yaml"
    p.write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 5}\n")
    cfg = load_config(str(p))
    paddle.seed(seed)
    return cfg, build_model(cfg)


def _bn_buffers(model):
    return [b.numpy().copy() for bn in batch_norms(model) for b in (bn._mean, bn._variance)]


def test_precise_bn_averages_the_statistics_over_ranks(tmp_path, monkeypatch):
    """Rank 0 of two, in one process: the peer's contribution to each all-reduce is what rank 1's
    precise-BN computed on its own batches, so the result must be the mean of both ranks' statistics."""
    batches = {r: [(paddle.randn([2, 3, 3, 32, 32]) * (1 + 2 * r) + r, None) for _ in range(3)] for r in (0, 1)}
    local = {}
    for r in (0, 1):
        _, model = _tiny_model(tmp_path)
        precise_bn(model, batches[r], dist.Env(0, 1, "cpu", None))
        local[r] = _bn_buffers(model)
    peer = iter(local[1])
    monkeypatch.setattr(dist.dist, "all_reduce", lambda t, *a, **k: t.set_value(t + paddle.to_tensor(next(peer))))
    _, model = _tiny_model(tmp_path)
    precise_bn(model, batches[0], dist.Env(0, 2, "cpu", None))
    assert next(peer, None) is None  # every buffer was reduced
    for got, a, b in zip(_bn_buffers(model), local[0], local[1]):
        np.testing.assert_allclose(got, (a + b) / 2, rtol=1e-5, atol=1e-6)
    assert not np.allclose(local[0][0], local[1][0])


def test_restore_brings_back_the_optimizer_state_and_the_lr_schedule_position(tmp_path):
    from trainer.engine import restore
    from trainer.solver import build_scheduler, build_optimizer

    def build():
        cfg, model = _tiny_model(tmp_path)
        lr = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=4, epochs=3, global_batch=8)
        return model, lr, build_optimizer(cfg.OPTIMIZER, lr, model)

    def step(model, opt, lr, i):
        paddle.seed(100 + i)  # the same dropout masks in both runs
        x = paddle.to_tensor(np.random.default_rng(i).standard_normal((2, 3, 3, 32, 32)).astype(np.float32))
        loss = model(x).mean()
        loss.backward()
        opt.step()
        opt.clear_grad()
        lr.step()

    # each run names its parameters and optimizer slots afresh, as a new process does (the optimizer's
    # state is keyed by those names)
    with paddle.utils.unique_name.guard():
        model, lr, opt = build()
        for i in range(5):  # past the first decay point (1/3 of 12 steps)
            step(model, opt, lr, i)
        checkpoint.save_state(str(tmp_path / "s.pdckpt"), model, opt, epoch=1, step=5)
    with paddle.utils.unique_name.guard():  # the restored slots are created at its first step
        fresh_model, fresh_lr, fresh_opt = build()
        meta, scaler = restore(str(tmp_path / "s.pdckpt"), fresh_model, fresh_opt)
        assert meta == {"epoch": 1, "step": 5} and scaler is None
        assert fresh_lr.last_epoch == lr.last_epoch == 5 and fresh_lr.get_lr() == lr.get_lr()
        for i in range(5, 8):  # momentum and the schedule carry on exactly as in the run that never stopped
            step(model, opt, lr, i)
            step(fresh_model, fresh_opt, fresh_lr, i)
    assert lr.get_lr() < build()[1].get_lr()  # past a decay point
    for (name, a), b in zip(model.state_dict().items(), fresh_model.state_dict().values()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


def test_a_resume_with_another_batch_size_goes_on_from_the_same_epoch_of_the_schedule(tmp_path):
    """4 epochs of 4 steps, then a resume at 4x the steps per epoch (a quarter of the batch) and 6
    epochs: the LR is the new schedule's at the start of epoch 5, past both decay points (1/3, 2/3)."""
    from trainer.engine import continue_schedule, restore
    from trainer.solver import build_scheduler, build_optimizer, lr_at
    with paddle.utils.unique_name.guard():
        cfg, model = _tiny_model(tmp_path)
        lr = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=4, epochs=4, global_batch=8)
        opt = build_optimizer(cfg.OPTIMIZER, lr, model)
        for _ in range(16):
            lr.step()
        checkpoint.save_state(str(tmp_path / "s.pdckpt"), model, opt, epoch=4, step=16)  # no steps_per_epoch
    with paddle.utils.unique_name.guard():
        cfg, model = _tiny_model(tmp_path)
        lr = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=16, epochs=6, global_batch=2)
        meta, _ = restore(str(tmp_path / "s.pdckpt"), model, build_optimizer(cfg.OPTIMIZER, lr, model))
    assert continue_schedule(lr, meta, 16) == 64
    assert lr.get_lr() == pytest.approx(lr_at(cfg.OPTIMIZER, 64, 16, 6, 2))
    assert lr.get_lr() == pytest.approx(lr_at(cfg.OPTIMIZER, 0, 16, 6, 2) * 0.01)
    assert continue_schedule(lr, {"epoch": 4, "step": 64, "steps_per_epoch": 16}, 16) == 64  # same batch: as saved


def test_a_resume_with_another_model_names_what_differs(tmp_path):
    from trainer.engine import restore
    from trainer.config import to_plain
    cfg, model = _tiny_model(tmp_path)
    checkpoint.save_state(str(tmp_path / "s.pdckpt"), model, paddle.optimizer.SGD(parameters=model.parameters()),
                          epoch=1, step=4, config=to_plain(cfg))
    p = tmp_path / "six.yaml"
    p.write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 6}\n")
    other_cfg = load_config(str(p))
    other = build_model(other_cfg)
    from trainer.config import ConfigError
    with pytest.raises(ConfigError, match=r"s.pdckpt holds another model \(MODEL.head.num_classes: 5 in the "
                                          r"checkpoint, 6 here\)"):
        restore(str(tmp_path / "s.pdckpt"), other, paddle.optimizer.SGD(parameters=other.parameters()), other_cfg.MODEL)
    with pytest.raises(ConfigError, match=r"holds another model \(tensors \['head.fc"):
        restore(str(tmp_path / "s.pdckpt"), other, paddle.optimizer.SGD(parameters=other.parameters()))
