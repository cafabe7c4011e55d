"""One run per output: a second training or conversion into a folder in use stops at once, naming the
run it met; a crashed run (kill -9) leaves nothing stuck."""

import os
import signal
import subprocess
import sys

import pytest

from common.runlock import BusyError, RunLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOLD = "import sys, time; sys.path.insert(0, {root!r}); from common.runlock import RunLock; "
HOLD += "RunLock({folder!r}, 'train', {path!r}).acquire(); print('held', flush=True); time.sleep(120)"


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds a lock; yields a function taking (folder, lock path) and the process."""
    procs = []

    def hold(folder, path=None):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOLD.format(root=ROOT, folder=str(folder), path=path and str(path))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline().strip() == "held"
        procs.append(proc)
        return proc

    yield hold
    for p in procs:
        p.kill()
        p.wait()


def test_a_second_holder_is_refused_with_the_first_named_until_the_first_dies(tmp_path, holder):
    first = holder(tmp_path / "out")
    with pytest.raises(BusyError, match=rf"out is in use by another train \(pid {first.pid} on .*, started .*: -c\)"):
        RunLock(str(tmp_path / "out"), "eval").acquire()
    os.kill(first.pid, signal.SIGKILL)  # a crash: the kernel drops the lock with the process
    first.wait()
    with RunLock(str(tmp_path / "out"), "eval") as lock:
        assert lock.previous["pid"] == first.pid
    RunLock(str(tmp_path / "out"), "eval").acquire().release()  # released: free again


def test_a_second_conversion_into_a_destination_in_use_stops_before_touching_it(tmp_path, holder, capsys):
    from preprocessing import video2pkl
    from tools.media import index_frames, write_video

    (tmp_path / "src").mkdir()
    write_video(tmp_path / "src" / "vid00000001_000000_000010.mp4", index_frames(6))
    (tmp_path / "k.csv").write_text("label,youtube_id,time_start,time_end,split\na,vid00000001,0,10,train\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".tmp-other-run").write_bytes(b"the first run's half-written clip")
    first = holder(tmp_path / "out", str(tmp_path / "out") + ".lock")
    argv = [str(tmp_path / "k.csv"), str(tmp_path / "src"), str(tmp_path / "out"), "1"]
    assert video2pkl.main(argv) == 2
    assert f"is in use by another train (pid {first.pid}" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == [".tmp-other-run"]  # nothing of the first run deleted
    first.kill()
    first.wait()
    assert video2pkl.main(argv) == 0


def test_a_training_into_an_output_dir_in_use_stops_at_once(tmp_path, holder, capsys):
    from trainer import main

    from .tiny import tiny_cfg

    tiny_cfg(tmp_path)  # writes tiny.yaml
    first = holder(tmp_path / "out")
    argv = ["train", "-c", str(tmp_path / "tiny.yaml"), "-o", f"output_dir={tmp_path / 'out'}"]
    assert main.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("train: error: ") and f"pid {first.pid}" in err
