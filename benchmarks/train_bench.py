"""Training fed by our DALI loader, by the PaddleVideo-style baseline loader, and by a synthetic batch.

    python benchmarks/train_bench.py [--depth 18 --width 16 --size 112] [--steps 30] [--device cpu]
    python benchmarks/train_bench.py --depth 50 --width 64 --size 224 --device gpu --batch-size 32

The same TSN model (single process) trains for a fixed number of steps three times in one run: fed by
build_loader (pkl source), by the baseline of benchmarks/loader_bench.py (paddle.io.DataLoader worker
processes, Pillow decode and transforms), and by one batch kept in memory (the model's ceiling: no
data wait at all). Each prints samples/s and the share of step time spent waiting for data.
Last line: `train_speed_ratio: X` = ours / baseline samples per second. On a GPU the goal is that ours
reaches >= 0.95 of the synthetic ceiling (data wait <= 5%).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")


def endless(loader):
    while True:
        yield from loader


def run(model, opt, batches, steps: int, warmup: int = 3) -> tuple[float, float]:
    """(samples/s, data-wait share) over ``steps`` steps after ``warmup``."""
    import paddle.nn.functional as F

    data_s = total_s = 0.0
    n = 0
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        imgs, labels = next(batches)
        t1 = time.perf_counter()
        loss = F.cross_entropy(model(imgs), labels)
        loss.backward()
        opt.step()
        opt.clear_grad()
        float(loss)  # waits for the device, so the step is really over
        t2 = time.perf_counter()
        if i >= warmup:
            data_s, total_s, n = data_s + t1 - t0, total_s + t2 - t0, n + labels.shape[0]
    return n / total_s, data_s / total_s


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=18, choices=(18, 34, 50, 101), help="ResNet depth (default 18)")
    p.add_argument("--width", type=int, default=16, help="ResNet base channels (64 = standard)")
    p.add_argument("--size", type=int, default=112, help="crop size (the short side is size x 8/7)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    p.add_argument("--steps", type=int, default=30, help="training steps per feed (default 30)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count(), help="loader workers of both loaders (default: the cores)"
    )
    p.add_argument("--clips", type=int, default=48, help="clips made and read (default 48)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where the model trains (default cpu)")
    p.add_argument(
        "--work", default=os.path.join(tempfile.gettempdir(), "loader_bench"), help="folder of the data, made once"
    )
    return p.parse_args()


def make_feeds(a: argparse.Namespace, list_file: str, short: int) -> dict:
    """The three feeds by name, each a call that starts an endless iterator of (clips, labels) batches."""
    import loader_bench
    import numpy as np
    import paddle

    from dali_pipelines import build_loader

    synthetic = (
        paddle.to_tensor(
            np.random.default_rng(0).standard_normal([a.batch_size, 3, 3, a.size, a.size]).astype("float32")
        ),
        paddle.to_tensor(np.arange(a.batch_size) % 6),
    )
    return {
        "synthetic": lambda: iter(lambda: synthetic, None),
        "baseline": lambda: endless(
            paddle.io.DataLoader(
                loader_bench.PaddleVideoStyleDataset(list_file, "pkl"),
                batch_size=a.batch_size,
                shuffle=True,
                drop_last=True,
                num_workers=a.workers,
                persistent_workers=True,
            )
        ),
        "dali": lambda: endless(
            build_loader(
                list_file,
                "pkl",
                "train",
                batch_size=a.batch_size,
                num_segments=3,
                target_size=a.size,
                short_size=short,
                device=a.device,
                num_threads=a.workers,
            )
        ),
    }


def main() -> None:
    a = parse_args()
    import loader_bench
    import paddle

    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.solver import build_optimizer

    paddle.set_device("gpu" if a.device == "gpu" else "cpu")
    short = round(a.size * 8 / 7)
    loader_bench.TARGET, loader_bench.SHORT = a.size, short
    list_file = loader_bench.make_data(os.path.join(a.work, "pkl"), "pkl", a.clips, 250)
    cfg_path = os.path.join(tempfile.mkdtemp(), "bench.yaml")
    with open(cfg_path, "w") as f:
        f.write(f"MODEL:\n  backbone: {{depth: {a.depth}, base_channels: {a.width}}}\n  head: {{num_classes: 6}}\n")
    cfg = load_config(cfg_path)

    def fresh():
        paddle.seed(0)
        model = build_model(cfg)
        return model, build_optimizer(cfg.OPTIMIZER, 0.001, model)

    results = {}
    for name, feed in make_feeds(a, list_file, short).items():
        model, opt = fresh()
        results[name] = run(model, opt, feed(), a.steps)
        print(
            f"{name:<9s} {results[name][0]:7.1f} samples/s, data wait {100 * results[name][1]:5.1f}% of step time",
            flush=True,
        )
    print(
        f"TSN ResNet-{a.depth} (width {a.width}) at {a.size}x{a.size}, 3 segments, batch {a.batch_size}, "
        f"{a.steps} steps, device {a.device}, {a.workers} loader workers/threads"
    )
    print(f"ours / synthetic ceiling: {results['dali'][0] / results['synthetic'][0]:.3f}")
    print(f"train_speed_ratio: {results['dali'][0] / results['baseline'][0]:.3f}")


if __name__ == "__main__":
    main()
