"""Video -> JPEG frames with one ffmpeg process, driven through ffmpeg-python.

ffmpeg writes an MJPEG stream to a pipe (no temporary files); we split it into one JPEG per frame.
"""
from __future__ import annotations

import functools
import shutil


class ConversionError(RuntimeError):
    """ffmpeg could not turn a clip into frames; the message is one line for the failures file."""


@functools.lru_cache(maxsize=1)
def ffmpeg_exe() -> str:
    """The system ffmpeg if present, else the static binary shipped in imageio-ffmpeg."""
    exe = shutil.which("ffmpeg")
    if exe:
        return exe
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def short_side_scale(n: int) -> dict:
    """ffmpeg scale arguments resizing the short side to ``n`` (even long side, aspect kept)."""
    return {"w": f"if(gt(iw,ih),-2,{n})", "h": f"if(gt(iw,ih),{n},-2)"}


def extract_jpegs(path: str, qscale: int = 4, short_side: int | None = None,
                  fps: float | None = None) -> list[bytes]:
    """All frames of ``path`` in decode order as JPEG bytes (``qscale``: ffmpeg's -q:v, 2 best .. 31)."""
    import ffmpeg
    stream = ffmpeg.input(path)
    if short_side:
        stream = stream.filter("scale", **short_side_scale(short_side))
    if fps:
        stream = stream.filter("fps", fps=fps)
    out_args = {"format": "image2pipe", "vcodec": "mjpeg", "q:v": qscale}
    if not fps:
        out_args["fps_mode"] = "passthrough"  # one JPEG per decoded frame: no duplicates, no drops
    try:
        data, _ = stream.output("pipe:", **out_args).global_args("-nostdin", "-loglevel", "error").run(
            cmd=ffmpeg_exe(), capture_stdout=True, capture_stderr=True)
    except ffmpeg.Error as e:
        msg = (e.stderr or b"").decode("utf-8", "replace").strip().splitlines()
        raise ConversionError(f"ffmpeg failed: {msg[-1] if msg else 'no message'}") from None
    frames = split_jpeg_stream(data)
    if not frames:
        raise ConversionError("no decodable frames")
    return frames


def split_jpeg_stream(data: bytes) -> list[bytes]:
    """Split concatenated JPEGs. Header segments are skipped by their lengths (their tables may hold
    any byte pair); after the scan header, FF D9 can only be the EOI marker (entropy-coded data
    stuffs every FF with 00), so a plain search finds each image's end."""
    frames, i, n = [], 0, len(data)
    while i < n:
        if data[i:i + 2] != b"\xff\xd8":
            raise ConversionError(f"corrupt MJPEG stream at byte {i}")
        j = i + 2
        while j + 4 <= n and data[j + 1] != 0xDA:  # header segments up to SOS
            if data[j] != 0xFF:
                raise ConversionError(f"corrupt JPEG header at byte {j}")
            j += 2 + int.from_bytes(data[j + 2:j + 4], "big")
        end = data.find(b"\xff\xd9", j)
        if end < 0:
            raise ConversionError("truncated MJPEG stream")
        frames.append(data[i:end + 2])
        i = end + 2
    return frames
