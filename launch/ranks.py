"""How many ranks run_dist.sh starts on this host, and on which devices.

    python -m launch.ranks [--nproc N]     prints "N DEVICES" (DEVICES: 0,1,... on a GPU host, "cpu" without)

On a GPU host the default is one rank per GPU Paddle can see (CUDA_VISIBLE_DEVICES narrows it), and
asking for more ranks than GPUs is a one-line error (exit 2) instead of a launcher that waits for a
device that is not there. Without a GPU the default is 2 CPU processes, and any number is allowed.
"""

from __future__ import annotations

import argparse
import sys

CPU_DEFAULT = 2


def gpu_count() -> int:
    """GPUs this Paddle build can use here (0 with a CPU build, or without a driver)."""
    try:
        import paddle

        return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    except Exception:  # noqa: BLE001 - a CUDA build without a working driver: no usable GPU
        return 0


def plan(nproc: int | None, ngpu: int) -> tuple[int, str]:
    """(ranks, devices) for a request of `nproc` ranks (None: the default) on a host with `ngpu` GPUs."""
    if ngpu == 0:
        return (nproc or CPU_DEFAULT), "cpu"
    n = nproc or ngpu
    if n > ngpu:
        raise ValueError(
            f"--nproc {n} asks for {n} GPU ranks but this host has {ngpu} GPU{'s' * (ngpu != 1)} "
            f"(CUDA_VISIBLE_DEVICES counts): use --nproc {ngpu} or less, or leave --nproc out"
        )
    return n, ",".join(str(i) for i in range(n))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=None)
    args = p.parse_args(argv)
    try:
        n, devices = plan(args.nproc, gpu_count())
    except ValueError as e:
        print(f"run_dist.sh: {e}", file=sys.stderr)
        return 2
    print(n, devices)
    return 0


if __name__ == "__main__":
    sys.exit(main())
