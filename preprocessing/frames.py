"""Video -> JPEG frames with one ffmpeg process, driven through ffmpeg-python.

ffmpeg writes an MJPEG stream to a pipe (no temporary files); we split it into one JPEG per frame.
"""

from __future__ import annotations

import functools
import shutil
import subprocess

from common.processes import die_with_parent


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


def ffmpeg_command(path: str, qscale: int = 4, short_side: int | None = None, fps: float | None = None) -> list[str]:
    """The ffmpeg command line that writes every frame of ``path`` as MJPEG to stdout."""
    import ffmpeg

    stream = ffmpeg.input(path)
    if short_side:
        stream = stream.filter("scale", **short_side_scale(short_side))
    if fps:
        stream = stream.filter("fps", fps=fps)
    out_args = {"format": "image2pipe", "vcodec": "mjpeg", "q:v": qscale}
    if not fps:
        out_args["fps_mode"] = "passthrough"  # one JPEG per decoded frame: no duplicates, no drops
    out = stream.output("pipe:", **out_args).global_args("-nostdin", "-loglevel", "error")
    return out.compile(cmd=ffmpeg_exe())


def extract_jpegs(
    path: str,
    qscale: int = 4,
    short_side: int | None = None,
    fps: float | None = None,
    allow_decode_errors: bool = False,
) -> list[bytes]:
    """All frames of ``path`` in decode order as JPEG bytes (``qscale``: ffmpeg's -q:v, 2 best .. 31).

    ffmpeg exits 0 on a truncated or damaged stream and decodes what it can; any error it reports
    fails the clip unless ``allow_decode_errors`` (a half-decoded clip must not pass as complete).
    """
    proc = subprocess.run(
        ffmpeg_command(path, qscale, short_side, fps), capture_output=True, preexec_fn=die_with_parent
    )
    errors = proc.stderr.decode("utf-8", "replace").strip().splitlines()
    if proc.returncode != 0 and (kinds := _stream_kinds(path)) is not None and "video" not in kinds:
        raise ConversionError(f"no video stream (the file holds {', '.join(kinds) or 'no streams'})")
    if proc.returncode != 0 or (errors and not allow_decode_errors):
        reason = errors[-1] if proc.returncode != 0 and errors else (errors[0] if errors else "no message")
        raise ConversionError(f"ffmpeg failed (exit {proc.returncode}): {reason}")
    frames = split_jpeg_stream(proc.stdout)
    if not frames:
        raise ConversionError("no decodable frames")
    return frames


def _stream_kinds(path: str) -> list[str] | None:
    """The kinds of stream a media file holds ("audio", "video", ...), or None when it does not open:
    asked only after ffmpeg failed, so an audio-only file is named for what it is."""
    import av

    try:
        with av.open(path) as container:
            return sorted({s.type for s in container.streams})
    except (av.FFmpegError, OSError, ValueError):
        return None


def split_jpeg_stream(data: bytes) -> list[bytes]:
    """Split concatenated JPEGs. Header segments are skipped by their lengths (their tables may hold
    any byte pair); after the scan header, FF D9 can only be the EOI marker (entropy-coded data
    stuffs every FF with 00), so a plain search finds each image's end."""
    frames, i, n = [], 0, len(data)
    while i < n:
        if data[i : i + 2] != b"\xff\xd8":
            raise ConversionError(f"corrupt MJPEG stream at byte {i}")
        j = i + 2
        while j + 4 <= n and data[j + 1] != 0xDA:  # header segments up to SOS
            if data[j] != 0xFF:
                raise ConversionError(f"corrupt JPEG header at byte {j}")
            j += 2 + int.from_bytes(data[j + 2 : j + 4], "big")
        end = data.find(b"\xff\xd9", j)
        if end < 0:
            raise ConversionError("truncated MJPEG stream")
        frames.append(data[i : end + 2])
        i = end + 2
    return frames
