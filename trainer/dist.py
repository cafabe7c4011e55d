"""Process-group setup for fleet collective training, and the few collectives the engine needs.

One code path for 1..N processes on CPU or GPU: with a single process no collective is called.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import paddle
import paddle.distributed as dist

from common import exits, lifeline
from common.processes import COLLECTIVE_TIMEOUT_ENV

from .config import ConfigError

# run_dist.sh --rendezvous-timeout sets it; the same bound under mpirun and Slurm
RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT = "TSN_RENDEZVOUS_TIMEOUT", 300.0
# seconds a rank waits in a collective for a peer before the job fails: gloo's fixed 30 s (Paddle sets
# no timeout on its gloo groups: measured, docs/robustness.md "Processes and ranks"), NCCL's
# PADDLE_PG_TIMEOUT (milliseconds, default 30 min). init() publishes it for the loader
# (dali_pipelines/feed.py), whose worker timeout must fire first to name the file a rank waits for.
GLOO_TIMEOUT = 30.0


def collective_timeout(device: str) -> float:
    if device == "gpu":
        return int(os.environ.get("PADDLE_PG_TIMEOUT") or 1800000) / 1000
    return GLOO_TIMEOUT


@dataclass(frozen=True)
class Env:
    rank: int
    world_size: int
    device: str  # "cpu" | "gpu"
    device_id: int | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(pref: str) -> str:
    has_gpu = paddle.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0
    if pref == "gpu" and not has_gpu:
        raise ConfigError(
            "config error: device = gpu, but this Paddle build sees no GPU "
            f"({'no CUDA GPU found' if paddle.is_compiled_with_cuda() else 'a CPU-only build'}); "
            "set -o device=cpu (or auto)"
        )
    return "gpu" if pref == "gpu" or (pref == "auto" and has_gpu) else "cpu"


def init(device_pref: str = "auto") -> Env:
    """Initialise fleet collective mode when launched with several processes."""
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    # no rank outlives its launcher (run_dist.sh's, mpirun's, srun's), whatever signal ended it
    lifeline.link(required=world > 1)
    device = resolve_device(device_pref)
    device_id = None
    if device == "gpu":
        device_id = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
        paddle.set_device(f"gpu:{device_id}")
    else:
        paddle.set_device("cpu")
    if world > 1:
        from paddle.distributed import fleet

        _import_kv_server_outside_cwd()
        os.environ[COLLECTIVE_TIMEOUT_ENV] = f"{collective_timeout(device):g}"
        with _bounded_rendezvous(float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV) or DEFAULT_RENDEZVOUS_TIMEOUT)):
            fleet.init(is_collective=True)
    return Env(dist.get_rank() if world > 1 else 0, world, device, device_id)


@contextlib.contextmanager
def _bounded_rendezvous(timeout: float):
    """Paddle's collective start-up waits for every rank without a time limit, inside C++ that holds the
    interpreter: a rank that never starts or dies first would hold the others forever. A forked
    watchdog process says so after ``timeout`` seconds and kills this rank (a Python thread or signal
    handler could not run while Paddle waits)."""
    master = os.environ.get("PADDLE_MASTER") or os.environ.get("PADDLE_TRAINER_ENDPOINTS", "?").split(",")[0]
    rank, world = os.environ.get("PADDLE_TRAINER_ID", "?"), os.environ.get("PADDLE_TRAINERS_NUM", "?")
    message = (
        f"rank {rank}: the ranks' rendezvous at {master} did not complete within {timeout:.0f}s "
        f"({world} ranks expected): a rank did not start, died, or cannot reach that address; stopping "
        f"(the time limit is {RENDEZVOUS_TIMEOUT_ENV}, run_dist.sh --rendezvous-timeout)\n"
    )
    parent = os.getpid()
    record_path, record = exits.record_bytes("crash", message, -signal.SIGKILL)
    sys.stderr.flush()
    watchdog = os.fork()
    if watchdog == 0:  # the child touches nothing of the parent's state (no logging: its locks may be held)
        try:
            lifeline.die_with_parent(parent)  # a rank that died first takes its watchdog with it
            time.sleep(timeout)
            os.write(2, message.encode())
            if record_path:  # the rank's record, as it cannot write one itself
                fd = os.open(record_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                os.write(fd, record)
                os.close(fd)
            os.kill(parent, signal.SIGKILL)
        finally:
            os._exit(0)
    try:
        yield
    finally:
        os.kill(watchdog, signal.SIGKILL)
        os.waitpid(watchdog, 0)


def _import_kv_server_outside_cwd() -> None:
    """Paddle's rendezvous KV server opens ``./http.log`` in the current folder when it is first imported;
    import it from the temporary folder, so that a run leaves nothing in the user's working tree."""
    import tempfile

    here = os.getcwd()
    os.chdir(tempfile.gettempdir())
    try:
        import paddle.distributed.fleet.utils.http_server  # noqa: F401
    finally:
        os.chdir(here)


def all_reduce_sum(values, env: Env) -> np.ndarray:
    """Sum a small float64 vector over all ranks."""
    arr = np.asarray(values, dtype=np.float64)
    if env.world_size == 1:
        return arr
    t = paddle.to_tensor(arr)
    dist.all_reduce(t)
    return t.numpy()


def batch_norms(model: paddle.nn.Layer) -> list:
    """The model's BatchNorm layers (of any dimension), in ``sublayers()`` order."""
    return [m for m in model.sublayers() if isinstance(m, paddle.nn.layer.norm._BatchNormBase)]


def average_bn_buffers(model: paddle.nn.Layer, env: Env) -> None:
    """Average BatchNorm running statistics over ranks, so every rank evaluates and saves the same model."""
    if env.world_size == 1:
        return
    for layer in batch_norms(model):
        for buf in (layer._mean, layer._variance):
            dist.all_reduce(buf)
            buf.set_value(buf / env.world_size)
