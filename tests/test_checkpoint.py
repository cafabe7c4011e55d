"""Checkpoints survive kills while being written, and resume repeats the original run exactly."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import paddle
import pytest

from trainer import checkpoint, weights

from .tiny import tiny_config

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
    return re.search(r"rank 0: weights digest (\w+)", output).group(1)


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
