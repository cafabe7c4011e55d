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

from .config import ConfigError

# run_dist.sh --rendezvous-timeout sets it; the same bound under mpirun and Slurm
RENDEZVOUS_TIMEOUT_ENV, DEFAULT_RENDEZVOUS_TIMEOUT = "TSN_RENDEZVOUS_TIMEOUT", 300.0


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
    device = resolve_device(device_pref)
    world = int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))
    device_id = None
    if device == "gpu":
        device_id = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
        paddle.set_device(f"gpu:{device_id}")
    else:
        paddle.set_device("cpu")
    if world > 1:
        from paddle.distributed import fleet

        _import_kv_server_outside_cwd()
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
    sys.stderr.flush()
    watchdog = os.fork()
    if watchdog == 0:  # the child touches nothing of the parent's state
        try:
            time.sleep(timeout)
            os.write(2, message.encode())
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


def average_bn_buffers(model: paddle.nn.Layer, env: Env) -> None:
    """Average BatchNorm running statistics over ranks, so every rank evaluates and saves the same model."""
    if env.world_size == 1:
        return
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.layer.norm._BatchNormBase):
            for buf in (layer._mean, layer._variance):
                dist.all_reduce(buf)
                buf.set_value(buf / env.world_size)
