"""Our DALI loader against a loader built the way PaddleVideo's CPU loader works, in the same run.

    python benchmarks/loader_bench.py --source pkl --device cpu [--clips 48] [--epochs 3] [--workers 2]

Baseline: paddle.io.DataLoader with `--workers` worker processes; each sample reads its file, decodes
the sampled frames one by one (Pillow for JPEGs; PyAV for mp4, frame by frame up to the last sampled
one), resizes the short side, cuts the TSN multi-scale crop, resizes it, flips and normalises with
Pillow/NumPy (PaddleVideo's Scale, MultiScaleCrop, RandomFlip, Image2Array, Normalization). Ours:
build_loader with `--workers` DALI threads and `--workers` feed worker processes (file reads; on the
CPU the sparse PyAV decode of mp4). Both: train mode, TSN sampling, 3 segments, 224x224 from frames
whose short side is 256, the same crop windows, batches of [N, 3, 3, 224, 224] float32. Clips are
Kinetics-like: 340x256, 250 frames. Rounds alternate between the two; the best round of each counts.
Last line: `loader_speed_ratio: X` = ours / baseline clips per second.

`--source videos --decode-only` times the decode alone (CPU ms per clip, ours against decord's
get_batch of the same indices, in one process; last line `decode_vs_decord_ratio: X`).
With `--source videos` a second baseline runs in the same rounds (when decord is installed: `pip install
-e .[bench]`): PaddleVideo's decord pipeline, i.e. the same DataLoader, workers and Pillow transforms, the
frames read by decord's `VideoReader(path, num_threads=--decord-threads).get_batch` of the TSN-sampled
indices (PaddleVideo's `VideoDecoder` with `backend: decord`). Last lines then:
`videos_vs_decord_cpu_ratio: X` = clips per CPU-second, ours / decord baseline (the CPU time of the
loader's process and all its workers per clip), and `videos_vs_decord_ratio: X` = ours / decord baseline
clips per second. Loading is CPU-bound, so on a host whose cores do nothing else the two agree; where
other work shares the cores, clips per second measure how much of them each loader's processes win, and
only the CPU time still compares: measure on a quiet host (docs/decoding.md "Measured figures").
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")  # before DALI's and Paddle's imports: they warn at import

from clipdata.lists import read_list  # noqa: E402
from clipdata.pkl import read_pkl, write_pkl  # noqa: E402
from dali_pipelines import crops  # noqa: E402
from dali_pipelines.reference import normalise  # noqa: E402
from dali_pipelines.sampling import segment_indices  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SEGMENTS, TARGET, SHORT = 3, 224, 256


def make_data(work: str, source: str, n: int, frames: int) -> str:
    """n Kinetics-like clips in the source's format, and their list file (kept for reruns)."""
    from PIL import Image

    from preprocessing.make_demo_dataset import CLASSES, render_clip, write_mp4

    os.makedirs(work, exist_ok=True)
    lines = []
    for i in range(n):
        base = os.path.join(work, f"clip{i:04d}")
        cls = i % len(CLASSES)
        done = {"pkl": base + ".pkl", "videos": base + ".mp4", "rawframes": base}[source]
        if not os.path.exists(done):
            clip = render_clip(CLASSES[cls], frames, 340, 256, np.random.default_rng(i))
            if source == "videos":
                write_mp4(done, clip)
            else:
                jpegs = []
                for f in clip:
                    buf = io.BytesIO()
                    Image.fromarray(f).save(buf, "JPEG", quality=90)
                    jpegs.append(buf.getvalue())
                if source == "pkl":
                    write_pkl(done, f"clip{i:04d}", cls, jpegs)
                else:
                    os.makedirs(done + ".tmp", exist_ok=True)
                    for k, j in enumerate(jpegs, 1):
                        with open(os.path.join(done + ".tmp", f"img_{k:05d}.jpg"), "wb") as fh:
                            fh.write(j)
                    os.rename(done + ".tmp", done)
        lines.append({"pkl": done, "videos": f"{done} {frames} {cls}", "rawframes": f"{done} {frames} {cls}"}[source])
    list_file = os.path.join(work, f"{source}.list")
    with open(list_file, "w") as f:
        f.write("\n".join(lines) + "\n")
    return list_file


def decode_in_order(path: str, indices) -> list[np.ndarray]:
    """PyAV as PaddleVideo's decoders use it (default threading): every frame in order, up to the last
    sampled one (PaddleVideo's own decoders even decode the whole clip), the sampled ones as RGB."""
    import av

    wanted, got = set(int(i) for i in indices), {}
    with av.open(path) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(wanted):
                break
    return [got[int(i)] for i in indices]


class PaddleVideoStyleDataset:
    """One clip per item, decoded and transformed frame by frame in the worker process."""

    def __init__(self, list_file: str, source: str, decord_threads: int | None = None):
        self.samples, self.source = read_list(list_file, source), source
        self.decord_threads = decord_threads  # None: PyAV in order; else decord with this many threads
        self.epoch = 0

    def __len__(self):
        return len(self.samples)

    def _frames(self, s, rng):
        from PIL import Image

        if self.source == "videos" and self.decord_threads is not None:
            import decord

            idx = segment_indices(s.num_frames, SEGMENTS, "train", rng)
            frames = decord.VideoReader(s.path, num_threads=self.decord_threads).get_batch(list(idx)).asnumpy()
            return [Image.fromarray(f) for f in frames], s.label
        if self.source == "videos":
            idx = segment_indices(s.num_frames, SEGMENTS, "train", rng)
            return [Image.fromarray(f) for f in decode_in_order(s.path, idx)], s.label
        if self.source == "pkl":
            _, label, jpegs = read_pkl(s.path)
            idx = segment_indices(len(jpegs), SEGMENTS, "train", rng)
            return [Image.open(io.BytesIO(jpegs[i])).convert("RGB") for i in idx], label
        idx = segment_indices(s.num_frames, SEGMENTS, "train", rng)
        return [Image.open(os.path.join(s.path, f"img_{i + 1:05d}.jpg")).convert("RGB") for i in idx], s.label

    def __getitem__(self, i):
        from PIL import Image

        rng = np.random.default_rng([i, os.getpid(), int(time.time() * 1e6) % 2**31])
        imgs, label = self._frames(self.samples[i], rng)
        w, h = imgs[0].size
        k = SHORT / min(w, h)
        rw, rh = int(round(w * k)), int(round(h * k))
        win = crops.multiscale_window(w, h, rng, TARGET, SHORT)
        box = (int(win[0] * rw), int(win[1] * rh), int((win[0] + win[2]) * rw), int((win[1] + win[3]) * rh))
        flip = rng.random() < 0.5
        out = []
        for img in imgs:
            img = img.resize((rw, rh), Image.BILINEAR).crop(box).resize((TARGET, TARGET), Image.BILINEAR)
            if flip:
                img = img.transpose(Image.FLIP_LEFT_RIGHT)
            out.append(normalise(np.asarray(img)))
        return np.stack(out), np.int64(label)


def clips_per_second(loader, epochs: int, batch_size: int) -> tuple[float, float]:
    """(clips per second, CPU milliseconds per clip) over whole epochs after a warm-up epoch (workers
    started, pipelines filled, files in the page cache). The CPU time is this process's and its workers'
    together: on a host whose cores other work shares, it is the figure that still compares."""
    for _ in loader:
        pass
    n, t, cpu = 0, time.perf_counter(), tree_cpu_seconds()
    for _ in range(epochs):
        for imgs, _ in loader:
            n += imgs.shape[0]
    cpu, t = tree_cpu_seconds() - cpu, time.perf_counter() - t
    assert list(imgs.shape[1:]) == [SEGMENTS, 3, TARGET, TARGET], imgs.shape
    return n / t, 1000 * cpu / n


def tree_cpu_seconds() -> float:
    """CPU seconds used so far by this process and its live descendants (loader workers), from /proc."""
    tick, procs = os.sysconf("SC_CLK_TCK"), {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    tree, total, grew = {os.getpid()}, 0.0, True
    while grew:
        grew = False
        for pid, (ppid, _) in procs.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                grew = True
    for pid in tree:
        total += procs.get(pid, (0, 0.0))[1]
    return total


def decode_only(list_file: str, rounds: int, decord_threads: int) -> None:
    """CPU milliseconds per clip to decode 3 TSN-sampled frames (train sampling, two draws per clip):
    video.decode_frames (one thread, and with frame threads) against decord's get_batch of the same
    indices, frames compared.
    Last line: `decode_vs_decord_ratio: X` = decord's CPU time / ours."""
    import decord

    from clipdata.video import decode_frames

    rng = np.random.default_rng(0)
    jobs = [(s, segment_indices(s.num_frames, SEGMENTS, "train", rng)) for s in read_list(list_file, "videos")] * 2
    fns = {
        "ours": lambda s, idx: decode_frames(s.path, idx, s.num_frames),
        "frame": lambda s, idx: decode_frames(s.path, idx, s.num_frames, threads="FRAME"),
        "decord": lambda s, idx: decord.VideoReader(s.path, num_threads=decord_threads).get_batch(list(idx)).asnumpy(),
    }
    for s, idx in jobs[:8]:
        for name in ("frame", "decord"):
            assert np.array_equal(fns["ours"](s, idx), fns[name](s, idx)), f"{s.path}: ours and {name} disagree"
    best = dict.fromkeys(fns, float("inf"))
    for r in range(rounds):
        for name, fn in fns.items() if r % 2 == 0 else list(fns.items())[::-1]:
            t = time.process_time()
            for s, idx in jobs:
                fn(s, idx)
            best[name] = min(best[name], 1000 * (time.process_time() - t) / len(jobs))
            print(f"round {r + 1} {name:<8s} {best[name]:7.1f} CPU ms/clip", flush=True)
    print(f"decode of {SEGMENTS} sampled frames, {len(jobs)} draws, best of {rounds}: CPU ms per clip")
    print(f"  ours (video.decode_frames, 1 thread)  {best['ours']:7.1f}")
    print(f"  ours with frame threads (FRAME)       {best['frame']:7.1f}")
    print(f"  decord (get_batch, {decord_threads} thread(s))        {best['decord']:7.1f}")
    print(f"decode_vs_decord_ratio: {best['decord'] / best['ours']:.3f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--source", choices=("pkl", "videos", "rawframes"), default="pkl", help="the data format read (default pkl)"
    )
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where DALI runs (default cpu)")
    p.add_argument("--clips", type=int, default=48, help="clips made and read (default 48)")
    p.add_argument("--frames", type=int, default=250, help="frames per clip (default 250)")
    p.add_argument("--batch-size", type=int, default=8, help="clips per batch (default 8)")
    p.add_argument("--epochs", type=int, default=3, help="timed epochs per round")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count(),
        help="baseline worker processes = our feed workers = DALI threads",
    )
    p.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts (default 3)")
    p.add_argument(
        "--decord-threads", type=int, default=1, help="decord's decoding threads per worker (videos; 0: decord's auto)"
    )
    p.add_argument(
        "--work", default=os.path.join(tempfile.gettempdir(), "loader_bench"), help="folder of the data, made once"
    )
    p.add_argument(
        "--decode-only",
        action="store_true",
        help="videos: only the decode of each clip's sampled frames, in this process, ours against decord",
    )
    return p.parse_args()


def loader_factories(a: argparse.Namespace, list_file: str) -> dict:
    """The loaders timed, by name: each a call that builds a fresh one (the decord baseline only for
    videos, when decord is installed)."""
    import paddle

    from dali_pipelines import build_loader

    def ours():
        return build_loader(
            list_file,
            a.source,
            "train",
            batch_size=a.batch_size,
            num_segments=SEGMENTS,
            target_size=TARGET,
            short_size=SHORT,
            device=a.device,
            num_threads=a.workers,
            num_workers=a.workers,
        )

    def baseline(decord_threads=None):
        return paddle.io.DataLoader(
            PaddleVideoStyleDataset(list_file, a.source, decord_threads),
            batch_size=a.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=a.workers,
            persistent_workers=True,
        )

    loaders = {"baseline": baseline, "dali": ours}
    if a.source == "videos":
        try:
            import decord  # noqa: F401
        except ImportError:
            print("no decord baseline: decord is not installed (pip install -e .[bench])", file=sys.stderr)
        else:
            loaders["decord"] = lambda: baseline(a.decord_threads)
    return loaders


def time_loaders(loaders: dict, a: argparse.Namespace) -> tuple[dict, dict]:
    """(best clips/s, least CPU ms per clip) of each loader over rounds that alternate their order."""
    best, cpu = dict.fromkeys(loaders, 0.0), dict.fromkeys(loaders, float("inf"))
    for r in range(a.rounds):
        for name in list(loaders) if r % 2 == 0 else list(loaders)[::-1]:
            rate, ms = clips_per_second(loaders[name](), a.epochs, a.batch_size)
            best[name], cpu[name] = max(best[name], rate), min(cpu[name], ms)
            print(f"round {r + 1} {name:<8s} {rate:7.1f} clips/s {ms:7.1f} CPU ms/clip", flush=True)
    return best, cpu


def main() -> None:
    a = parse_args()
    list_file = make_data(os.path.join(a.work, a.source), a.source, a.clips, a.frames)
    if a.decode_only:
        decode_only(list_file, a.rounds, a.decord_threads)
        return
    best, cpu = time_loaders(loader_factories(a, list_file), a)
    print(
        f"source {a.source}, device {a.device}, {a.workers} workers/threads, batch {a.batch_size}, "
        f"{SEGMENTS} segments, {TARGET}x{TARGET} from 340x256, best of {a.rounds}:"
    )
    print(f"  baseline (paddle.io.DataLoader + Pillow) {best['baseline']:7.1f} clips/s")
    print(f"  ours (DALI)                              {best['dali']:7.1f} clips/s")
    if "decord" in best:
        print(f"  decord baseline (get_batch + Pillow)     {best['decord']:7.1f} clips/s")
    print("  CPU ms per clip (all processes): " + ", ".join(f"{k} {v:.1f}" for k, v in cpu.items()))
    print(f"loader_speed_ratio: {best['dali'] / best['baseline']:.3f}")
    if "decord" in best:
        print(f"videos_vs_decord_cpu_ratio: {cpu['decord'] / cpu['dali']:.3f}")
        print(f"videos_vs_decord_ratio: {best['dali'] / best['decord']:.3f}")


if __name__ == "__main__":
    main()
