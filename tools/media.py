"""Tiny media for the tests, the benchmarks and the GPU self-test: videos and JPEG sequences whose frames
carry their own index, made on the fly (nothing is committed); and untrained models made to look trained."""

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


def write_gop_video(path, n: int, gop: int = 12, width: int = 64, height: int = 48, fps: int = 25) -> str:
    """H.264 mp4 (B-frames, a keyframe every ``gop`` frames) whose frames all differ: a moving square on a
    grey level that changes with the index."""
    import av

    with av.open(str(path), "w", format="mp4") as out:
        s = out.add_stream("libx264", rate=fps, options={"crf": "18", "preset": "veryfast", "g": str(gop)})
        s.height, s.width, s.pix_fmt = height, width, "yuv420p"
        for i in range(n):
            img = np.full((height, width, 3), (i * 7) % 200 + 20, np.uint8)
            x = (i * 5) % (width - 8)
            img[8:16, x : x + 8] = (250, 30, 30)
            out.mux(s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(s.encode())
    return str(path)


def damaged_video(path, frames: int = 50):
    """An H.264 mp4 whose middle third of coded data is garbage (the container still states every frame)."""
    write_video(path, index_frames(frames))
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat")
    for k in range(start + (len(data) - start) // 3, start + (len(data) - start) // 2):
        data[k] = (data[k] * 7 + 13) & 0xFF
    path.write_bytes(bytes(data))
    return path


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


def randomise_bn(model, rng: np.random.Generator) -> None:
    """BatchNorm statistics and affine terms away from their initial values, as a trained model has them
    (so that folding them into convolutions matters): the tests' and reparam_bench's untrained models."""
    import paddle

    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            c = layer.weight.shape[0]
            layer.weight.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))
            layer.bias.set_value(rng.normal(0, 0.1, c).astype("float32"))
            layer._mean.set_value(rng.normal(0, 0.1, c).astype("float32"))
            layer._variance.set_value(rng.uniform(0.5, 1.5, c).astype("float32"))


def frame_levels(imgs) -> np.ndarray:
    """The mean grey level [N, T] of each frame of normalised batches [N, T, 3, H, W] (an array or a
    paddle tensor): with ``index_frames``' frames, ``level_to_index`` of it is the frame's index."""
    if not isinstance(imgs, np.ndarray):
        imgs = imgs.numpy()
    return pixel_levels(imgs).mean(axis=(2, 3, 4))
