"""Tiny media for tests: videos and JPEG sequences whose frames carry their own index."""

from __future__ import annotations

import io
import subprocess

import numpy as np
from PIL import Image

from trainer.selftest import has_bframes, index_frames, level_to_index  # noqa: F401 - the tests' media, shared with the selftest


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
