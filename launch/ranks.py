"""How many ranks run_dist.sh starts on this host, and on which devices.

    python -m launch.ranks [--nproc N]     prints "N DEVICES CVD"

DEVICES is "cpu" without a usable GPU, else the first N entries of CUDA_VISIBLE_DEVICES as Paddle's
launcher reads them (its --devices names entries of CUDA_VISIBLE_DEVICES, not CUDA's ordinals:
paddle/distributed/launch/context/device.py, Device.get_selected_devices -> labels.index). CVD says
what the launcher must do with CUDA_VISIBLE_DEVICES: "keep" it, or "unset" it for CPU ranks of a CPU
build of Paddle (the launcher would otherwise take its entries for GPUs and fail to start more ranks
than it has entries). On a GPU host the default is one rank per GPU Paddle can see, and asking for
more ranks than GPUs is a one-line error (exit 2) instead of a launcher that waits for a device that
is not there. Without a GPU the default is 2 CPU processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import log as logs

log = logs.get_logger(__name__)
CPU_DEFAULT = 2


def gpu_count() -> int:
    """GPUs this Paddle build can use here (0 with a CPU build, or without a driver)."""
    try:
        import paddle

        return paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
    except Exception:  # noqa: BLE001 - a CUDA build without a working driver: no usable GPU
        return 0


def launcher_labels() -> list[str]:
    """The device labels Paddle's launcher will see on this host: its own parsing of the environment
    (CUDA_VISIBLE_DEVICES entries as written, or 0..count-1 when it is unset)."""
    from paddle.distributed.launch.context.device import Device

    return list(Device.parse_device().labels)


def plan(nproc: int | None, ngpu: int, labels: list[str] | None = None) -> tuple[int, str]:
    """(ranks, devices) for a request of `nproc` ranks (None: the default) on a host with `ngpu` GPUs
    whose launcher labels are `labels` (default 0..ngpu-1: CUDA_VISIBLE_DEVICES unset)."""
    if ngpu == 0:
        return (nproc or CPU_DEFAULT), "cpu"
    n = nproc or ngpu
    if n > ngpu:
        raise ValueError(
            f"--nproc {n} asks for {n} GPU ranks but this host has {ngpu} GPU{'s' * (ngpu != 1)} "
            f"(CUDA_VISIBLE_DEVICES counts): use --nproc {ngpu} or less, or leave --nproc out"
        )
    labels = [str(i) for i in range(ngpu)] if labels is None else labels
    # CUDA stops at the first entry it cannot use, so the GPUs it sees are the first ngpu entries
    chosen = labels[:n]
    if len(chosen) < n or any(not d or d != d.strip() or "," in d for d in chosen):
        raise ValueError(
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '')!r} does not name the {n} GPUs "
            "Paddle sees one per entry: write it as indices or GPU UUIDs separated by commas, without spaces "
            "(e.g. 2,3)"
        )
    return n, ",".join(chosen)


def cpu_ranks_env(n: int, compiled_with_cuda: bool, labels: list[str]) -> str:
    """What the launcher must do with CUDA_VISIBLE_DEVICES for `n` CPU ranks: "keep" or "unset".

    When it is set, Paddle's launcher types the node's devices as GPUs whatever the build
    (Device.parse_device) and hands rank i the i-th entry: fewer entries than ranks is an IndexError
    before any rank starts (CUDA_VISIBLE_DEVICES="" or "0" with 2 ranks)."""
    if "CUDA_VISIBLE_DEVICES" not in os.environ or n <= max(1, len(labels)):
        return "keep"
    if not compiled_with_cuda:
        return "unset"  # it means nothing to a CPU build
    raise ValueError(
        f"CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']!r} hides the GPUs from this CUDA build of "
        f"Paddle, and its launcher starts at most {max(1, len(labels))} CPU rank(s) so: use --nproc "
        f"{max(1, len(labels))}, or unset CUDA_VISIBLE_DEVICES"
    )


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.partition("\n\n")[2],
    )
    p.add_argument("--nproc", type=int, default=None, help="ranks asked for (default: one per GPU, else 2)")
    args = p.parse_args(argv)
    try:
        ngpu = gpu_count()
        labels = launcher_labels()
        n, devices = plan(args.nproc, ngpu, labels)
        if devices == "cpu":
            import paddle

            cvd = cpu_ranks_env(n, paddle.is_compiled_with_cuda(), labels)
        else:
            cvd = "keep"
    except ValueError as e:
        log.error(f"run_dist.sh: {e}")
        return 2
    print(n, devices, cvd)  # the plan run_dist.sh reads, not a message
    return 0


if __name__ == "__main__":
    sys.exit(main())
