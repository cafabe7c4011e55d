"""The trainer under mpirun, exactly as run_dist.sh runs it under paddle.distributed.launch.

    mpirun -np 16 -npernode 8 -x PATH -x LD_LIBRARY_PATH python -m launch.mpi_train configs/tsn_dist_and_dali.yaml
    mpirun -np 2 --oversubscribe -x OMP_NUM_THREADS=1 python -m launch.mpi_train configs/tsn_demo.yaml -o epochs=5
    mpirun -np 2 python -m launch.mpi_train eval -c configs/tsn_demo.yaml      # any trainer mode

The first argument is a config (train) or a trainer mode followed by the trainer's own arguments.
Every rank maps its MPI rank to Paddle's variables (launch/mpi_env.py) before Paddle starts; rank 0
prints (first the hosts and the address the ranks meet at), every rank's errors reach mpirun, and a
rank that dies makes mpirun end the whole job.
"""

from __future__ import annotations

import os
import sys

from common import log as logs

log = logs.get_logger(__name__)


def _gpus_on_this_node() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        import paddle

        return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    except Exception:  # noqa: BLE001 - no usable CUDA means CPU ranks
        return 0


def main(argv=None) -> int:
    logs.setup()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):  # the trainer's own options: python trainer/main.py --help
        print(__doc__, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    # MPI before Paddle: Paddle 2.6's libpaddle.so exported its own zlib, which crashed a later zlib user
    from mpi4py import MPI  # noqa: F401

    from trainer.main import MODES

    if argv[0] not in MODES:
        argv = ["train", "-c", argv[0], *argv[1:]]
    from launch.mpi_env import paddle_env

    env = paddle_env(gpus_per_node=_gpus_on_this_node())
    os.environ.update(env)
    # each rank dies with the MPI daemon that started it (trainer/dist.py: common/lifeline.py), never
    # with a parent named by a run_dist.sh this mpirun may have been started under
    os.environ.pop("TSN_PARENT_PID", None)
    if env["PADDLE_TRAINER_ID"] == "0" and int(env["PADDLE_TRAINERS_NUM"]) > 1:
        from trainer.dist import DEFAULT_RENDEZVOUS_TIMEOUT, RENDEZVOUS_TIMEOUT_ENV

        hosts = list(dict.fromkeys(e.rsplit(":", 1)[0] for e in env["PADDLE_TRAINER_ENDPOINTS"].split(",")))
        timeout = float(os.environ.get(RENDEZVOUS_TIMEOUT_ENV) or DEFAULT_RENDEZVOUS_TIMEOUT)
        log.info(
            f"launch.mpi_train: {env['PADDLE_TRAINERS_NUM']} ranks on {len(hosts)} host(s) ({', '.join(hosts)}); "
            f"they meet at rank 0's TCP store {env['PADDLE_MASTER']} within {timeout:.0f}s ({RENDEZVOUS_TIMEOUT_ENV})"
        )
    from trainer.main import main as trainer_main

    return trainer_main(argv)


if __name__ == "__main__":
    sys.exit(main())
