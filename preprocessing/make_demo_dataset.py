"""Generate the small embedded demo datasets: labelled H.264 clips laid out like Kinetics-400.

    python preprocessing/make_demo_dataset.py data/demo [--seed 0]
    python preprocessing/make_demo_dataset.py data/motion --task motion

``appearance`` (the default): six classes differ in appearance (shape, colour) and motion (bouncing,
sliding, pulsing, spinning, blinking, scrolling) over random backgrounds.
``motion``: two classes differ only in the direction of motion: objects drifting right, and the same
kind of clip played backwards (drifting left). Every frame of one class is a frame the other class
could show, so a model that averages per-frame evidence (TSN) cannot beat chance; only temporal
modelling (TSM) can tell them apart.
Clips have 40-200 frames at 320x240 or 340x256 and are encoded with x264 (B-frames included). Writes
OUT/{train,val}/<label>/<id>_<start>_<end>.mp4 and OUT/kinetics_demo_{train,val}.csv
(label,youtube_id,time_start,time_end,split). Deterministic from the seed; a second run with the same
arguments does nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys

import numpy as np

from common import log as logs

log = logs.get_logger("preprocessing.make_demo_dataset")  # by name: run by path, __name__ is "__main__"

CLASSES = ("bouncing ball", "sliding square", "pulsing ring", "spinning bar", "blinking dots", "scrolling stripes")
BASE_COLOURS = {  # RGB of each class's object; jittered per clip
    "bouncing ball": (220, 50, 40),
    "sliding square": (40, 80, 220),
    "pulsing ring": (40, 200, 60),
    "spinning bar": (230, 210, 40),
    "blinking dots": (230, 230, 230),
    "scrolling stripes": (200, 50, 200),
}
MOTION_CLASSES = ("moving right", "moving left")
TASKS = {"appearance": CLASSES, "motion": MOTION_CLASSES}
SIZES = ((320, 240), (340, 256))
FPS = 25
GENERATOR_VERSION = 3  # bump when the clips change, so existing demo folders are regenerated


def _object_mask(cls: str, t: int, p: dict, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    """Coverage in [0, 1] of the class's object at frame ``t``."""
    h, w = yy.shape
    wave = np.sin(p["omega"] * t + p["phase"])
    if cls == "bouncing ball":
        cy = p["y0"] + p["amp"] * (2 * abs(wave) - 1)
        return ((yy - cy) ** 2 + (xx - p["x0"]) ** 2 < p["r"] ** 2).astype(np.float32)
    if cls == "sliding square":
        x = p["x0"] + p["amp"] * wave
        return ((abs(xx - x) < p["r"]) & (abs(yy - p["y0"]) < p["r"])).astype(np.float32)
    if cls == "pulsing ring":
        radius = p["r"] * (1.3 + 0.6 * wave)
        d = np.sqrt((yy - p["y0"]) ** 2 + (xx - p["x0"]) ** 2)
        return (abs(d - radius) < 5).astype(np.float32)
    if cls == "spinning bar":
        a = p["phase"] + 2 * p["omega"] * t
        dx, dy = np.cos(a), np.sin(a)
        along = (xx - p["x0"]) * dx + (yy - p["y0"]) * dy
        across = -(xx - p["x0"]) * dy + (yy - p["y0"]) * dx
        return ((abs(along) < p["r"] * 2) & (abs(across) < 6)).astype(np.float32)
    if cls == "blinking dots":
        mask = np.zeros((h, w), np.float32)
        for k, (gy, gx) in enumerate(p["grid"]):
            if np.sin(2 * p["omega"] * t + k * 1.3 + p["phase"]) > 0:
                mask[(yy - gy) ** 2 + (xx - gx) ** 2 < 100] = 1.0
        return mask
    if cls == "scrolling stripes":
        band = (xx + yy * p["slope"] - p["speed"] * t) % p["period"]
        return 0.7 * (band < p["period"] / 2).astype(np.float32)
    raise ValueError(cls)


def _clip_params(cls: str, w: int, h: int, rng: np.random.Generator) -> dict:
    # objects stay inside the central square, which every crop of the pipelines mostly covers
    # (x0 +- amp, y0 +- amp) stays within the central 80% of the short side, so that a moving object
    # never leaves the crops of the pipelines
    r = float(rng.uniform(16, 26))
    p = dict(
        r=r,
        x0=float(w / 2 + rng.uniform(-0.12, 0.12) * h),
        y0=float(h / 2 + rng.uniform(-0.08, 0.08) * h),
        omega=float(rng.uniform(0.08, 0.2)),
        phase=float(rng.uniform(0, 2 * np.pi)),
        speed=float(rng.uniform(2, 6)) * rng.choice([-1, 1]),
        amp=float(rng.uniform(0.15, 0.22) * h),
        slope=float(rng.uniform(-1, 1)),
        period=float(rng.uniform(18, 40)),
    )
    if cls == "blinking dots":
        gap = rng.uniform(24, 34)
        p["grid"] = [(p["y0"] + i * gap, p["x0"] + j * gap) for i in (-1, 0, 1) for j in (-1, 0, 1)]
    return p


def _background(yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random two-colour gradient with pixel noise, [H, W, 3] float."""
    height, width = yy.shape
    bg_a, bg_b = rng.uniform(0, 110, 3), rng.uniform(0, 110, 3)
    ramp = (xx / width * np.cos(rng.uniform(0, np.pi)) + yy / height * np.sin(rng.uniform(0, np.pi)))[..., None]
    return bg_a + (bg_b - bg_a) * np.clip(ramp, 0, 1) + rng.normal(0, 6, (height, width, 3))


def render_clip(cls: str, num_frames: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Frames [T, H, W, 3] uint8 of one clip of class ``cls``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = _background(yy, xx, rng)
    colour = np.clip(np.array(BASE_COLOURS[cls]) + rng.normal(0, 15, 3), 0, 255)
    p = _clip_params(cls, width, height, rng)
    grain = rng.normal(0, 3, (4, height, width, 1)).astype(np.float32)  # sensor noise, cycled
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        m = _object_mask(cls, t, p, yy, xx)[..., None]
        img = background * (1 - m) + colour * m + grain[t % 4]
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def render_motion_clip(cls: str, num_frames: int, width: int, height: int, rng: np.random.Generator) -> np.ndarray:
    """Frames [T, H, W, 3] of 2-4 discs and squares drifting right over a static background (about 0.3 to
    0.45 of the width over the clip, whatever its length); "moving left" is such a clip reversed in time,
    so both classes draw their frames from one distribution."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    background = _background(yy, xx, rng)
    travel = rng.uniform(0.3, 0.45) * width
    objects = []
    for _ in range(int(rng.integers(2, 5))):
        r = rng.uniform(14, 24)
        x0 = rng.uniform(width / 2 - 0.35 * height, width / 2 + 0.35 * height - travel)
        y0 = rng.uniform(height / 2 - 0.3 * height, height / 2 + 0.3 * height)
        objects.append((r, x0, y0, rng.uniform(-0.05, 0.05) * height, bool(rng.integers(2)), rng.uniform(120, 255, 3)))
    grain = rng.normal(0, 3, (4, height, width, 1)).astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        img = background.copy()
        f = t / max(1, num_frames - 1)
        for r, x0, y0, dy, square, colour in objects:
            x, y = x0 + travel * f, y0 + dy * f
            inside = ((abs(xx - x) < r) & (abs(yy - y) < r)) if square else ((xx - x) ** 2 + (yy - y) ** 2 < r * r)
            img[inside] = colour
        frames[t] = np.clip(img + grain[t % 4], 0, 255).astype(np.uint8)
    return frames[::-1] if cls == "moving left" else frames


def write_mp4(path: str, frames: np.ndarray, fps: int = FPS) -> None:
    """Encode RGB frames as H.264 (x264 defaults, so with B-frames) into ``path`` atomically."""
    import io

    import av

    from common.files import write_atomic

    encoded = io.BytesIO()  # the same bytes as a file: the mp4 muxer seeks back in either
    with av.open(encoded, "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=fps, options={"crf": "20", "preset": "veryfast"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())
    write_atomic(path, encoded.getvalue())


def _make_clip(job) -> None:
    path, cls, num_frames, width, height, render_seed = job
    render = render_motion_clip if cls in MOTION_CLASSES else render_clip
    write_mp4(path, render(cls, num_frames, width, height, np.random.default_rng(render_seed)))


ALPHABET = np.array(list(string.ascii_letters + string.digits + "-_"))


def _write_split(out_dir: str, split: str, classes, counts: dict, seed: int, frames: tuple[int, int]) -> list:
    """Write SPLIT's CSV; returns the clips of it still to render, as _make_clip jobs."""
    from common.files import write_atomic

    si = ("train", "val").index(split)
    rows = ["label,youtube_id,time_start,time_end,split"]
    todo = []
    for ci, cls in enumerate(classes):
        folder = os.path.join(out_dir, split, cls.replace(" ", "_"))
        os.makedirs(folder, exist_ok=True)
        for k in range(counts[split]):
            rng = np.random.default_rng([seed, si, ci, k])
            yid = "".join(rng.choice(ALPHABET, 11))
            start = int(rng.integers(0, 300))
            rows.append(f"{cls},{yid},{start},{start + 10},{split}")
            width, height = SIZES[int(rng.integers(len(SIZES)))]
            n = int(rng.integers(frames[0], frames[1] + 1))
            path = os.path.join(folder, f"{yid}_{start:06d}_{start + 10:06d}.mp4")
            if not os.path.exists(path):
                todo.append((path, cls, n, width, height, [seed, si, ci, k, 1]))
    write_atomic(os.path.join(out_dir, f"kinetics_demo_{split}.csv"), ("\n".join(rows) + "\n").encode())
    return todo


def make_dataset(
    out_dir: str,
    seed: int = 0,
    train_per_class: int = 20,
    val_per_class: int = 8,
    min_frames: int = 40,
    max_frames: int = 200,
    jobs: int | None = None,
    task: str = "appearance",
) -> dict:
    """Write the dataset; returns {split: csv path}. Skips work already done with the same arguments."""
    classes = TASKS[task]
    config = dict(
        version=GENERATOR_VERSION,
        seed=seed,
        train_per_class=train_per_class,
        val_per_class=val_per_class,
        min_frames=min_frames,
        max_frames=max_frames,
        classes=classes,
    )
    marker = os.path.join(out_dir, ".complete.json")
    csvs = {s: os.path.join(out_dir, f"kinetics_demo_{s}.csv") for s in ("train", "val")}
    try:
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == json.loads(json.dumps(config)):
                log.info(f"make_demo_dataset: {out_dir} is already complete")
                return csvs
    except (OSError, ValueError):
        pass

    from common.files import write_atomic
    from common.processes import fork_context
    from preprocessing.progress import progress

    counts = {"train": train_per_class, "val": val_per_class}
    todo = []
    for split in csvs:
        todo += _write_split(out_dir, split, classes, counts, seed, (min_frames, max_frames))
    total = len(classes) * (train_per_class + val_per_class)
    with (
        fork_context().Pool(jobs or os.cpu_count()) as pool,
        progress(total, "make_demo_dataset", initial=total - len(todo)) as bar,
    ):
        for _ in pool.imap_unordered(_make_clip, todo):
            bar.update()
    write_atomic(marker, json.dumps(config).encode())
    log.info(f"make_demo_dataset: {total} clips of {len(classes)} classes in {out_dir}")
    return csvs


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir", help="folder for the videos, the CSVs and the label file")
    p.add_argument("--seed", type=int, default=0, help="random seed of the clips (default 0)")
    p.add_argument("--train-per-class", type=int, default=20, help="training clips per class (default 20)")
    p.add_argument("--val-per-class", type=int, default=8, help="validation clips per class (default 8)")
    p.add_argument("--min-frames", type=int, default=40, help="shortest clip in frames (default 40)")
    p.add_argument("--max-frames", type=int, default=200, help="longest clip in frames (default 200)")
    p.add_argument("--jobs", type=int, default=None, help="parallel encoder processes (default: all cores)")
    p.add_argument(
        "--task",
        choices=sorted(TASKS),
        default="appearance",
        help="appearance: 6 classes told apart by any frame; motion: 2 classes told apart only by "
        "the direction of motion",
    )
    a = p.parse_args(argv)
    if not 1 <= a.min_frames <= a.max_frames:
        p.error("need 1 <= --min-frames <= --max-frames")
    if a.train_per_class < 1 or a.val_per_class < 1 or (a.jobs is not None and a.jobs < 1):
        p.error("--train-per-class, --val-per-class and --jobs take a number >= 1")
    make_dataset(a.out_dir, a.seed, a.train_per_class, a.val_per_class, a.min_frames, a.max_frames, a.jobs, a.task)
    return 0


if __name__ == "__main__":
    sys.exit(main())
