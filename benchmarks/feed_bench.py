"""The loader's host-side feed rate: everything a sample costs before DALI decodes it.

    python benchmarks/feed_bench.py [--clips 24] [--copies 16] [--rounds 3] [--epochs 4] [--batches 48]

Data, made once under --work: Kinetics-like 10 s clips, 340x256 H.264 with B-frames (300 frames), and
their pkl files made by preprocessing/video2pkl.py (300 JPEGs each, with the frame index); a copy of
the pkl files without the index stands for the files of before. Each clip is copied --copies times
(distinct files, so a cold epoch reads each one from the disk).
What is timed: the loader's external source (``_ClipSource``: the worker processes, the in-order
gathering, the batch assembly) in train mode, 3 segments, batches of 8, --batches batches an epoch.
It stops where DALI starts: pkl -> the sampled JPEGs and the crop windows; videos -> what the GPU path
hands NVDEC (the file's bytes and the frame indices; the CPU path's PyAV decode is measured by
loader_bench.py).
Baseline, in the same run: the read of before, in the training process (0 workers): the whole pkl read
and unpickled for its 3 frames; for videos the whole file demuxed on every read to count its packets.
Warm: --epochs epochs with the whole files in the page cache. Cold: one epoch after evicting every file with
posix_fadvise(DONTNEED). Rounds alternate between the rows; the best round of each counts.
Bytes read per clip: rchar of /proc/PID/io of the processes that read the files (the workers; without
workers the training process), so the results the workers send back are not counted.
Last line: `feed_speed_ratio: X` = pkl warm, 1 worker, indexed / whole-file read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np

from clipdata.lists import read_list
from clipdata.pkl import frame_spans, read_pkl
from common.files import write_atomic
from dali_pipelines.feed import ClipSpec
from dali_pipelines.loader import _ClipSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEGMENTS, BATCH, FRAMES, FPS = 3, 8, 300, 30


def make_data(work: str, n: int, copies: int) -> dict[str, str]:
    """The three list files (pkl, legacy pkl, videos) over ``n * copies`` distinct files: ``n`` clips
    rendered and converted once, then copied (distinct files, so a cold round reads each from disk)."""
    from preprocessing import video2pkl
    from preprocessing.make_demo_dataset import CLASSES, render_clip, write_mp4

    src = os.path.join(work, "videos", "demo")
    os.makedirs(src, exist_ok=True)
    rows = []
    for i in range(n):
        path = os.path.join(src, f"clip{i:04d}_000000_000010.mp4")
        if not os.path.exists(path):
            write_mp4(path, render_clip(CLASSES[i % len(CLASSES)], FRAMES, 340, 256, np.random.default_rng(i)), fps=FPS)
        rows.append(f"demo,clip{i:04d},0,10,train\n")
    csv = os.path.join(work, "clips.csv")
    with open(csv, "w") as f:
        f.write("label,youtube_id,time_start,time_end,split\n" + "".join(rows))
    pkl_dir = os.path.join(work, "pkl")
    rc = video2pkl.main(
        [
            csv,
            os.path.join(work, "videos"),
            pkl_dir,
            str(os.cpu_count()),
            "--list-out",
            os.path.join(work, "unique_pkl.list"),
        ]
    )
    assert rc == 0, "video2pkl failed"
    sets = {"pkl": [], "legacy": [], "videos": []}
    for name, folder, ext in (("pkl", pkl_dir, ".pkl"), ("videos", src, ".mp4"), ("legacy", None, ".pkl")):
        out_dir = os.path.join(work, f"{name}_copies")
        os.makedirs(out_dir, exist_ok=True)
        for i in range(n):
            first = os.path.join(folder or pkl_dir, f"clip{i:04d}_000000_000010{ext}")
            for c in range(copies):
                out = os.path.join(out_dir, f"clip{i:04d}_{c}{ext}")
                if not os.path.exists(out):
                    _copy(first, out, strip_index=name == "legacy")
                sets[name].append(out)
    lists = {}
    for name, paths in sets.items():
        lists[name] = os.path.join(work, f"{name}.list")
        with open(lists[name], "w") as f:
            f.write("".join(p + (f" {FRAMES} 0" if name == "videos" else "") + "\n" for p in paths))
    return lists


def _copy(src: str, dst: str, strip_index: bool) -> None:
    """A copy of ``src`` with its modification time (the frame index is bound to it: a copy with another
    would be read whole as a stale index); with ``strip_index`` only its pickle (a pkl as written before
    the index)."""
    with open(src, "rb") as f:
        data = f.read()
    if strip_index:
        data = data[: frame_spans(data, len(read_pkl(src)[2]))[1]]
    write_atomic(dst, data, mtime_ns=os.stat(src).st_mtime_ns)


def rchar(pids) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/io") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("rchar"))
        except OSError:
            pass
    return total


def cache(samples) -> None:
    """Read every file whole, so that the page cache holds all of it (a sample reads parts)."""
    for s in samples:
        with open(s.path, "rb") as f:
            while f.read(1 << 20):
                pass


def evict(samples) -> None:
    for s in samples:
        fd = os.open(s.path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def source_for(list_file: str, source: str, workers: int, batches: int, facts: bool):
    samples = read_list(list_file, "pkl" if source == "legacy" else source)
    spec = ClipSpec(
        source="videos" if source == "videos" else "pkl",
        decode="video" if source == "videos" else "jpeg",
        mode="train",
        num_segments=SEGMENTS,
        target_size=224,
        short_size=256,
    )
    src = _ClipSource(
        samples,
        spec,
        batch_size=BATCH,
        rank=0,
        world_size=1,
        seed=0,
        drop_last=True,
        max_batches=batches,
        num_workers=workers,
    )
    if not facts:  # before: nothing established about a video is kept between reads
        src._new_facts = src.facts = _Forgetful()
    return src


class _Forgetful(dict):
    def __setitem__(self, key, value):
        pass


def run_epochs(src, first: int, epochs: int) -> tuple[int, float, int]:
    """(clips, seconds, bytes read) of ``epochs`` epochs of the external source."""
    pids = src.feed.worker_pids or [os.getpid()]  # the workers read the files, the trainer the results
    before, n, t = rchar(pids), 0, time.perf_counter()
    for epoch in range(first, first + epochs):
        src.epoch = epoch
        for it in range(src.num_batches):
            n += len(src(SimpleNamespace(iteration=it))[0])
    return n, time.perf_counter() - t, rchar(pids) - before


ROWS = (  # (source, read, list, workers, video facts kept)
    ("pkl", "whole file read (before)", "legacy", 0, False),
    ("pkl", "frame index", "pkl", 1, True),
    ("pkl", "frame index", "pkl", 2, True),
    ("videos", "demux per read (before)", "videos", 0, False),
    ("videos", "probe facts cached", "videos", 1, True),
    ("videos", "probe facts cached", "videos", 2, True),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=24, help="clips rendered")
    p.add_argument("--copies", type=int, default=16, help="distinct copies of each clip")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts (default 3)")
    p.add_argument("--epochs", type=int, default=4, help="warm epochs per round")
    p.add_argument("--batches", type=int, default=48, help="batches of 8 per timed epoch")
    p.add_argument(
        "--work", default=os.path.join(tempfile.gettempdir(), "feed_bench"), help="folder of the data, made once"
    )
    p.add_argument("--clean", action="store_true", help="remove the generated data afterwards")
    return p.parse_args()


def time_rows(sources, rounds: int, epochs: int) -> tuple[list[float], list[float], list[float]]:
    """(warm clips/s, cold clips/s, bytes per clip) of each source, the best of ``rounds`` rounds."""
    warm, cold, per_clip = ([0.0] * len(sources) for _ in range(3))
    for src in sources:
        run_epochs(src, 0, 1)  # workers started, video facts established, files in the page cache
    for r in range(rounds):  # rounds alternate between the rows, so drift hits them alike
        for i, src in enumerate(sources):
            evict(src.samples)
            n, dt, _ = run_epochs(src, 1 + r * (epochs + 1), 1)  # an epoch reads every file once
            cold[i] = max(cold[i], n / dt)
            cache(src.samples)
            n, dt, nbytes = run_epochs(src, 2 + r * (epochs + 1), epochs)
            warm[i], per_clip[i] = max(warm[i], n / dt), nbytes / n
    return warm, cold, per_clip


def print_table(a: argparse.Namespace, warm, cold, per_clip, sampled: float) -> None:
    print(
        f"{a.clips * a.copies} clips of {FRAMES} frames 340x256, {SEGMENTS} segments, batches of {BATCH}, "
        f"{os.cpu_count()} cores; best of {a.rounds} rounds (warm: {a.epochs} epochs of {a.batches} batches; "
        "cold: 1 epoch after evicting every file)"
    )
    print(f"{'source':7s} {'read':26s} {'workers':>7s} {'warm clips/s':>13s} {'cold clips/s':>13s} {'KB/clip':>8s}")
    results = {}
    for i, (source, what, list_name, workers, _) in enumerate(ROWS):
        results[(list_name, workers)] = warm[i]
        print(f"{source:7s} {what:26s} {workers:7d} {warm[i]:13.0f} {cold[i]:13.0f} {per_clip[i] / 1024:8.1f}")
        if list_name == "pkl" and workers == 1:
            index_kb = (FRAMES * 16 + 64) / 1024
            print(
                f"        (sampled JPEGs {sampled / 1024:.1f} KB + index {index_kb:.1f} KB per clip; "
                f"read {per_clip[i] / (sampled + index_kb * 1024):.2f}x that)"
            )
    for name in ("pkl", "videos"):
        print(f"{name}: 2 workers / 1 worker = {results[(name, 2)] / results[(name, 1)]:.2f}")
    print(f"videos_feed_ratio: {results[('videos', 1)] / results[('videos', 0)]:.3f}")
    print(f"feed_speed_ratio: {results[('pkl', 1)] / results[('legacy', 0)]:.3f}")


def main() -> None:
    a = parse_args()
    lists = make_data(a.work, a.clips, a.copies)
    sampled = np.mean(
        [sum(len(f) for f in frames) for frames in _sampled_jpegs(os.path.join(a.work, "unique_pkl.list"))]
    )
    sources = [
        source_for(lists[list_name], source, workers, a.batches, facts) for source, _, list_name, workers, facts in ROWS
    ]
    try:
        warm, cold, per_clip = time_rows(sources, a.rounds, a.epochs)
    finally:
        for src in sources:
            src.feed.close()
    print_table(a, warm, cold, per_clip, sampled)
    if a.clean:
        shutil.rmtree(a.work)


def _sampled_jpegs(list_file: str):
    """The JPEGs a train sample reads, for the bytes-per-clip figure (val sampling: the same sizes)."""
    from dali_pipelines.sampling import segment_indices

    for s in read_list(list_file, "pkl"):
        frames = read_pkl(s.path)[2]
        yield [frames[i] for i in segment_indices(len(frames), SEGMENTS, "val")]


if __name__ == "__main__":
    main()
