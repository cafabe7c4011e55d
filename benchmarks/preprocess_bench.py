"""video2pkl against plain ffmpeg, on the same clips at the same parallelism.

    python benchmarks/preprocess_bench.py [--clips 16] [--frames 250] [--nproc 2] [--rounds 3]

The baseline is what a shell loop would do: `ffmpeg -i clip.mp4 -q:v Q out/%05d.jpg` for every clip,
NPROC at a time. Ours is the real command, `python preprocessing/video2pkl.py CSV SRC DST NPROC`, so
its figure includes Python start-up, CSV reading, pickling, atomic renames and the failure checks.
Rounds alternate between the two and the best round of each counts (the machine is shared and noisy).
Last line: `preprocess_speed_ratio: X` = ours / plain ffmpeg frames per second.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from preprocessing.frames import ffmpeg_exe
from preprocessing.make_demo_dataset import CLASSES, render_clip, write_mp4

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_clips(work: str, n: int, frames: int) -> str:
    """Kinetics-like clips (340x256, H.264 with B-frames) and their CSV; kept for reruns."""
    import numpy as np

    src = os.path.join(work, "src")
    os.makedirs(src, exist_ok=True)
    rows = ["label,youtube_id,time_start,time_end,split"]
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        path = os.path.join(src, f"bench{i:06d}_000000_000010.mp4")
        if not os.path.exists(path):
            write_mp4(path, render_clip(cls, frames, 340, 256, np.random.default_rng(i)))
        rows.append(f"{cls},bench{i:06d},0,10,train")
    csv = os.path.join(work, "bench.csv")
    with open(csv, "w") as f:
        f.write("\n".join(rows) + "\n")
    return csv


def plain_ffmpeg(src: str, out: str, nproc: int, q: int) -> tuple[float, int]:
    clips = sorted(os.listdir(src))

    def one(name):
        folder = os.path.join(out, name[:-4])
        os.makedirs(folder)
        subprocess.run(
            [
                ffmpeg_exe(),
                "-nostdin",
                "-loglevel",
                "error",
                "-i",
                os.path.join(src, name),
                "-q:v",
                str(q),
                os.path.join(folder, "%05d.jpg"),
            ],
            check=True,
        )
        return len(os.listdir(folder))

    t = time.perf_counter()
    with ThreadPoolExecutor(nproc) as pool:  # threads only wait on the ffmpeg processes
        frames = sum(pool.map(one, clips))
    return time.perf_counter() - t, frames


def ours(csv: str, src: str, out: str, nproc: int, q: int) -> tuple[float, int]:
    t = time.perf_counter()
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "preprocessing", "video2pkl.py"),
            csv,
            src,
            out,
            str(nproc),
            "--jpeg-quality",
            str(q),
        ],
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - t
    if result.returncode != 0:
        raise SystemExit(f"video2pkl failed:\n{result.stdout}\n{result.stderr}")
    frames = int(result.stdout.split(" converted, ")[1].split(" frames")[0])
    return elapsed, frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=16, help="clips converted (default 16)")
    p.add_argument("--frames", type=int, default=250, help="frames per clip (Kinetics: ~250)")
    p.add_argument(
        "--nproc", type=int, default=os.cpu_count(), help="ffmpeg processes at once, both sides (default: the cores)"
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts (default 3)")
    p.add_argument("--quality", type=int, default=4, help="JPEG -q:v for both")
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "preprocess_bench"),
        help="folder of the clips and the outputs",
    )
    a = p.parse_args()
    csv = make_clips(a.work, a.clips, a.frames)
    src = os.path.join(a.work, "src")
    best = {"plain ffmpeg": float("inf"), "video2pkl": float("inf")}
    frames = {}
    for r in range(a.rounds):
        order = ["plain ffmpeg", "video2pkl"] if r % 2 == 0 else ["video2pkl", "plain ffmpeg"]
        for name in order:
            out = os.path.join(a.work, "out")
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out + ".list", ignore_errors=True)
            t, n = (
                plain_ffmpeg(src, out, a.nproc, a.quality)
                if name == "plain ffmpeg"
                else ours(csv, src, out, a.nproc, a.quality)
            )
            best[name], frames[name] = min(best[name], t), n
            print(f"round {r + 1} {name:<13s} {n} frames in {t:6.2f}s = {n / t:7.0f} frames/s", flush=True)
    if frames["plain ffmpeg"] != frames["video2pkl"]:
        raise SystemExit(f"frame counts differ: {frames}")
    fps = {k: frames[k] / v for k, v in best.items()}
    print(
        f"{a.clips} clips x {a.frames} frames, 340x256 H.264, {a.nproc} processes, q:v {a.quality}; best of {a.rounds}:"
    )
    for k, v in fps.items():
        print(f"  {k:<13s} {v:7.0f} frames/s")
    print(f"preprocess_speed_ratio: {fps['video2pkl'] / fps['plain ffmpeg']:.3f}")


if __name__ == "__main__":
    main()
