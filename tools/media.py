"""Tiny media for the tests and the GPU self-test: videos and JPEG sequences whose frames carry their own
index, made on the fly (nothing is committed)."""

from __future__ import annotations

import io
import subprocess

import numpy as np
from PIL import Image


def jpeg(img: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_video(path: str, frames: np.ndarray) -> None:
    """H.264 mp4; with x264's defaults the stream has B-frames (reordered decode)."""
    from preprocessing.make_demo_dataset import write_mp4

    write_mp4(str(path), frames)


def quadrant_frames(n: int = 12, width: int = 64, height: int = 48) -> np.ndarray:
    """Frames whose four quadrants have four colours: any turn or mirror of them shows."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 2] = (230, 230, 230)
    img[: height // 2, width // 2 :] = (200, 30, 30)
    img[height // 2 :, : width // 2] = (30, 200, 30)
    img[height // 2 :, width // 2 :] = (30, 30, 200)
    return np.stack([img] * n)


def ffmpeg(*args) -> None:
    """Run the ffmpeg the preprocessing uses, quietly, overwriting outputs; a failure fails the test."""
    from preprocessing.frames import ffmpeg_exe

    subprocess.run([ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", *map(str, args)], check=True)


def remux(src, dst, *input_options) -> None:
    """The same coded pictures in a new container, e.g. with a display matrix (``-display_rotation 90``)."""
    ffmpeg(*input_options, "-i", src, "-c", "copy", dst)


def index_frames(n: int, width: int = 64, height: int = 48) -> np.ndarray:
    """Frames [n, H, W, 3] whose uniform grey level encodes the index: level(i) = 20 + 4 * i (n <= 55)."""
    if n > 55:
        raise ValueError("index_frames encodes at most 55 frames")
    return np.stack([np.full((height, width, 3), 20 + 4 * i, np.uint8) for i in range(n)])


def level_to_index(level: float) -> int:
    return int(round((level - 20) / 4))


def pixel_levels(imgs: np.ndarray) -> np.ndarray:
    """Normalised batches [N, T, 3, H, W] back to grey levels 0..255."""
    from dali_pipelines.clipspec import MEAN, STD

    shape = (1, 1, 3, 1, 1)
    return (imgs.astype(np.float32) * np.array(STD).reshape(shape) + np.array(MEAN).reshape(shape)) * 255


def has_bframes(path: str) -> bool:
    import av

    with av.open(str(path)) as c:
        return any(int(getattr(f.pict_type, "value", f.pict_type)) == 3 for f in c.decode(video=0))  # AV_PICTURE_TYPE_B
