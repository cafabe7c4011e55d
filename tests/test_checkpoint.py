"""Checkpoints: which files a run writes when and which stay, what resume reads (the newest that loads, a
restarted job's own), restore (optimizer, LR schedule position, another model named); they survive kills
while being written, and resume repeats the original run exactly."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import paddle
import pytest

from trainer import checkpoint, weights
from trainer.checkpoint import Checkpoints, continue_schedule, restore
from trainer.engine import read_digests

from .tiny import tiny_config, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(cfg, *overrides, wait=True):
    cmd = [sys.executable, os.path.join(ROOT, "trainer", "main.py"), "train", "-c", cfg]
    for o in overrides:
        cmd += ["-o", o]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-3000:]
    return out


def _digest(output):
    return read_digests(output)["0"]


@pytest.mark.slow
def test_resume_after_kill_minus_9_gives_the_same_weights_as_training_straight(demo_dataset, tmp_path):
    straight = _train(tiny_config(tmp_path / "a.yaml", demo_dataset, tmp_path / "a", epochs=4))
    cfg = tiny_config(tmp_path / "b.yaml", demo_dataset, tmp_path / "b", epochs=4)
    proc = _train(cfg, wait=False)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill -9 once epoch 2 is evaluated, wherever the run is then
        if metrics.exists() and any(
            json.loads(x).get("mode") == "val" and json.loads(x)["epoch"] >= 2 for x in metrics.read_text().splitlines()
        ):
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


def test_resume_names_a_missing_checkpoint(demo_dataset, tmp_path, capsys):
    from trainer import main

    cfg = tiny_config(tmp_path / "c.yaml", demo_dataset, tmp_path / "c")
    assert main.main(["train", "-c", cfg, "-o", f"resume={tmp_path}/nope.pdckpt"]) == 1
    assert "nope.pdckpt does not exist" in capsys.readouterr().err


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
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER.format(root=ROOT, path=str(path))], stdout=subprocess.PIPE, text=True
    )
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


def test_a_full_disk_at_a_checkpoint_ends_the_training_with_one_line(demo_dataset, tmp_path, capsys):
    from trainer import main

    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        cfg = tiny_config(tmp_path / "c.yaml", demo_dataset, disk / "out", epochs=1)
        assert main.main(["train", "-c", cfg, "-o", "DATASET.num_workers=0"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("train: error: No space left on device writing ") and "resume=auto" in err[-1]
        assert not [n for n in os.listdir(disk / "out") if ".tmp-" in n]  # no half-written checkpoint left
    finally:
        subprocess.run(["umount", "-l", str(disk)])


def test_restore_brings_back_the_optimizer_state_and_the_lr_schedule_position(tmp_path):
    from trainer.solver import build_optimizer, build_scheduler

    def build():
        cfg, model = tiny_model(tmp_path)
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
    from trainer.solver import build_optimizer, build_scheduler, lr_at

    with paddle.utils.unique_name.guard():
        cfg, model = tiny_model(tmp_path)
        lr = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=4, epochs=4, global_batch=8)
        opt = build_optimizer(cfg.OPTIMIZER, lr, model)
        for _ in range(16):
            lr.step()
        checkpoint.save_state(str(tmp_path / "s.pdckpt"), model, opt, epoch=4, step=16)  # no steps_per_epoch
    with paddle.utils.unique_name.guard():
        cfg, model = tiny_model(tmp_path)
        lr = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=16, epochs=6, global_batch=2)
        meta, _ = restore(str(tmp_path / "s.pdckpt"), model, build_optimizer(cfg.OPTIMIZER, lr, model))
    assert continue_schedule(lr, meta, 16) == 64
    assert lr.get_lr() == pytest.approx(lr_at(cfg.OPTIMIZER, 64, 16, 6, 2))
    assert lr.get_lr() == pytest.approx(lr_at(cfg.OPTIMIZER, 0, 16, 6, 2) * 0.01)
    assert continue_schedule(lr, {"epoch": 4, "step": 64, "steps_per_epoch": 16}, 16) == 64  # same batch: as saved


def test_a_resume_with_another_model_names_what_differs(tmp_path):
    from trainer.config import to_plain

    cfg, model = tiny_model(tmp_path)
    checkpoint.save_state(
        str(tmp_path / "s.pdckpt"),
        model,
        paddle.optimizer.SGD(parameters=model.parameters()),
        epoch=1,
        step=4,
        config=to_plain(cfg),
    )
    other_cfg, other = tiny_model(tmp_path, num_classes=6, name="six.yaml")
    from trainer.config import ConfigError

    with pytest.raises(
        ConfigError,
        match=r"s.pdckpt holds another model \(MODEL.head.num_classes: 5 in the "
        r"checkpoint, 6 here\)",
    ):
        restore(str(tmp_path / "s.pdckpt"), other, paddle.optimizer.SGD(parameters=other.parameters()), other_cfg.MODEL)
    with pytest.raises(ConfigError, match=r"holds another model \(tensors \['head.fc"):
        restore(str(tmp_path / "s.pdckpt"), other, paddle.optimizer.SGD(parameters=other.parameters()))


def _net():
    model = paddle.nn.Linear(4, 4)
    return model, paddle.optimizer.SGD(parameters=model.parameters())


def _epochs(saver, epochs, model, opt, **meta):
    for epoch in epochs:
        saver.save_epoch(epoch, model, opt, step=10 * epoch, best={"top1": -1.0}, **meta)


def test_a_run_writes_latest_every_epoch_and_epoch_n_every_save_interval(tmp_path, monkeypatch):
    monkeypatch.setenv(checkpoint.RUN_ID_ENV, "job-7")
    model, opt = _net()
    _epochs(Checkpoints(str(tmp_path), save_interval=2), range(1, 6), model, opt, seed=3)
    assert sorted(os.listdir(tmp_path)) == ["epoch_2.pdckpt", "epoch_4.pdckpt", "latest.pdckpt"]
    meta = weights.load_checkpoint(str(tmp_path / "latest.pdckpt"))["meta"]
    assert meta == {"run_id": "job-7", "epoch": 5, "step": 50, "best": {"top1": -1.0}, "seed": 3}
    assert weights.load_checkpoint(str(tmp_path / "epoch_4.pdckpt"))["meta"]["epoch"] == 4


def test_retention_keeps_best_latest_and_the_newest_n_epoch_files(tmp_path):
    model, opt = _net()
    saver = Checkpoints(str(tmp_path), save_interval=1, keep_epochs=2)
    saver.save_best(model, top1=0.5, epoch=1)
    _epochs(saver, range(1, 12), model, opt)
    assert sorted(os.listdir(tmp_path)) == ["best.pdparams", "epoch_10.pdckpt", "epoch_11.pdckpt", "latest.pdckpt"]
    kept = [weights.load_checkpoint(str(tmp_path / f"epoch_{n}.pdckpt"))["meta"]["epoch"] for n in (10, 11)]
    assert kept == [10, 11] and weights.load_file(str(tmp_path / "best.pdparams"))["__meta__"]["epoch"] == 1
    with pytest.raises(ValueError, match="keep_epochs"):
        Checkpoints(str(tmp_path), save_interval=1, keep_epochs=0)


def test_without_keep_epochs_every_epoch_file_stays(tmp_path):
    model, opt = _net()
    _epochs(Checkpoints(str(tmp_path), save_interval=1), range(1, 5), model, opt)
    assert len([n for n in os.listdir(tmp_path) if n.startswith("epoch_")]) == 4


def test_keep_checkpoints_in_the_config_leaves_only_the_newest_epoch_file(demo_dataset, tmp_path):
    from trainer import main

    cfg = tiny_config(tmp_path / "k.yaml", demo_dataset, tmp_path / "k", epochs=3)
    overrides = ["save_interval=1", "keep_checkpoints=1", "PRECISE_BN.enabled=false", "DATASET.num_workers=0"]
    with paddle.utils.unique_name.guard():
        assert main.main(["train", "-c", cfg, *(w for o in overrides for w in ("-o", o))]) == 0
    written = sorted(n for n in os.listdir(tmp_path / "k") if n.endswith((".pdckpt", ".pdparams")))
    assert written == ["best.pdparams", "epoch_3.pdckpt", "latest.pdckpt"]


def test_a_run_that_validates_nothing_writes_its_last_weights_as_best(tmp_path):
    model, opt = _net()
    Checkpoints(str(tmp_path), save_interval=10).save_epoch(3, model, opt, as_best=True, step=30)
    assert weights.load_file(str(tmp_path / "best.pdparams"))["__meta__"] == {"epoch": 3}
    assert sorted(os.listdir(tmp_path)) == ["best.pdparams", "latest.pdckpt"]


def test_only_rank_0_writes_and_cleans(tmp_path):
    model, opt = _net()
    (tmp_path / "latest.pdckpt.tmp-123").write_bytes(b"half")
    saver = Checkpoints(str(tmp_path), save_interval=1, is_main=False)
    saver.clean()
    saver.save_best(model, top1=1.0)
    _epochs(saver, [1], model, opt)
    assert os.listdir(tmp_path) == ["latest.pdckpt.tmp-123"]
    Checkpoints(str(tmp_path), save_interval=1).clean()
    assert os.listdir(tmp_path) == []


def test_resume_auto_takes_the_newest_checkpoint_that_loads_and_reads_it_once(tmp_path, monkeypatch, capsys):
    model, opt = _net()
    saver = Checkpoints(str(tmp_path), save_interval=1)
    assert saver.find_resume("auto") is None  # an empty folder: a fresh run
    _epochs(saver, range(1, 5), model, opt)
    (tmp_path / "latest.pdckpt").write_bytes(b"")
    (tmp_path / "epoch_4.pdckpt").write_bytes((tmp_path / "epoch_4.pdckpt").read_bytes()[:100])
    reads = []
    load = weights.load_checkpoint
    monkeypatch.setattr(weights, "load_checkpoint", lambda path: reads.append(path) or load(path))
    assert saver.find_resume("auto") == str(tmp_path / "epoch_3.pdckpt")
    out = capsys.readouterr().out
    assert "latest.pdckpt: is empty" in out and "epoch_4.pdckpt: cut short" in out
    meta, scaler = saver.resume(model, opt)
    assert meta["epoch"] == 3 and scaler is None and reads.count(str(tmp_path / "epoch_3.pdckpt")) == 1
    for n in (1, 2, 3):
        (tmp_path / f"epoch_{n}.pdckpt").write_bytes(b"")
    with pytest.raises(weights.WeightsError, match=r"resume=auto: no checkpoint in .* loads \(.*latest.pdckpt: is"):
        saver.find_resume("auto")


def test_a_restarted_job_resumes_only_its_own_latest(tmp_path, monkeypatch, capsys):
    model, opt = _net()
    saver = Checkpoints(str(tmp_path), save_interval=10)
    monkeypatch.delenv(checkpoint.RUN_ID_ENV, raising=False)
    _epochs(saver, [1, 2], model, opt)
    assert saver.find_resume("") is None  # no run id: a plain run starts anew
    monkeypatch.setenv(checkpoint.RUN_ID_ENV, "job-1")
    assert saver.find_resume("") is None  # latest was written by another job
    _epochs(saver, [3], model, opt)
    assert saver.find_resume("") == str(tmp_path / "latest.pdckpt")
    assert "train: restarted: resuming this job (job-1) from" in capsys.readouterr().out
    assert saver.resume(model, opt)[0]["epoch"] == 3


def test_resume_names_a_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"resume: checkpoint .*nope.pdckpt does not exist"):
        Checkpoints(str(tmp_path), save_interval=1).find_resume(str(tmp_path / "nope.pdckpt"))


def test_read_digests_reads_every_rank_including_two_digit_ones():
    text = "rank 0: weights digest 00aa\nnoise\nrank 12: weights digest 12bb\nrank 0: weights digest 00cc\n"
    assert read_digests(text) == {"0": "00cc", "12": "12bb"}
