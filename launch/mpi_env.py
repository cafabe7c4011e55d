"""Turn an MPI job's rank variables into the ones Paddle's collective mode reads
(docs/design.md "Dependencies and the facts they rest on").

Paddle does not read Open MPI's variables. Under mpirun each rank finds its rank, world size and
node-local rank (Open MPI, MPICH/Hydra, Slurm or PMIx spellings), opens a free port on its host,
exchanges "host:port" with every other rank through mpi4py (the host: the address on the network every
rank reaches rank 0 on, launch/hosts.py; PADDLE_HOST overrides), and sets what paddle.distributed.launch
would: PADDLE_TRAINER_ID, PADDLE_TRAINERS_NUM, PADDLE_TRAINER_ENDPOINTS, PADDLE_CURRENT_ENDPOINT,
PADDLE_MASTER (rank 0's rendezvous store), PADDLE_LOCAL_RANK, the backend (gloo on CPU, nccl on GPU)
and, on GPU hosts, FLAGS_selected_gpus.
"""

from __future__ import annotations

import os
import socket

from common.log import get_logger
from launch.hosts import address_warning, mpi_address

log = get_logger(__name__)

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
SIZE_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_NTASKS")
LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "SLURM_LOCALID")


def _first(names, env) -> int | None:
    for name in names:
        if env.get(name, "").strip().isdigit():
            return int(env[name])
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def paddle_env(env=None, gpus_per_node: int = 0) -> dict:
    """The PADDLE_* variables of this rank; exchanges endpoints with the other ranks through mpi4py."""
    env = os.environ if env is None else env
    rank, size = _first(RANK_VARS, env), _first(SIZE_VARS, env)
    if rank is None or size is None:
        raise RuntimeError(
            "launch.mpi_env: no MPI rank variables (OMPI_COMM_WORLD_RANK, PMI_RANK, ...); "
            "start this under mpirun/srun, or use run_dist.sh"
        )
    local_rank = _first(LOCAL_RANK_VARS, env) or 0
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.Get_rank() != rank or comm.Get_size() != size:
        raise RuntimeError(
            f"launch.mpi_env: environment says rank {rank}/{size}, MPI says {comm.Get_rank()}/{comm.Get_size()}"
        )
    host, interface = ("127.0.0.1", "lo") if size == 1 else mpi_address(comm)
    warning = address_warning(host) if interface and not env.get("GLOO_SOCKET_IFNAME") else ""
    if warning:
        log.warning(f"launch.mpi_env: rank {rank}: warning: {warning}")
    endpoints = comm.allgather(f"{host}:{_free_port()}")
    master = comm.bcast(f"{host}:{_free_port()}" if rank == 0 else None, root=0)  # rank 0's TCP store
    hosts = [e.rsplit(":", 1)[0] for e in endpoints]
    out = {
        "PADDLE_TRAINER_ID": str(rank),
        "PADDLE_TRAINERS_NUM": str(size),
        "PADDLE_GLOBAL_RANK": str(rank),
        "PADDLE_GLOBAL_SIZE": str(size),
        "PADDLE_TRAINER_ENDPOINTS": ",".join(endpoints),
        "PADDLE_CURRENT_ENDPOINT": endpoints[rank],
        "PADDLE_MASTER": master,
        "PADDLE_NNODES": str(len(set(hosts))),
        "PADDLE_LOCAL_RANK": str(local_rank),
        "PADDLE_RANK_IN_NODE": str(local_rank),
        "PADDLE_LOCAL_SIZE": str(hosts.count(host)),
        "PADDLE_DISTRI_BACKEND": "nccl" if gpus_per_node else "gloo",
    }
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):  # else they use what the hostname resolves to
        if interface and not env.get(name):
            out[name] = interface
    if gpus_per_node:
        out["FLAGS_selected_gpus"] = str(local_rank % gpus_per_node)
    return out
