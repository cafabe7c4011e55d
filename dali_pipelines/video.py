"""Video probing and CPU-side decoding with PyAV.

DALI has no operator that returns a frame count, and from DALI 2.1.1 its CPU decoder refuses H.264
(DESIGN §3). Counts come from here; on a machine without a GPU the sampled frames are decoded here too
and fed into the same DALI graph as raw frames.
"""
from __future__ import annotations

import json
import os

import numpy as np


class VideoError(RuntimeError):
    """A video that cannot be read; the message names the file."""


def _open(path: str):
    import av
    try:
        container = av.open(path)
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for broken files
        raise VideoError(f"{path}: cannot open video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream


def probe(path: str) -> tuple[int, int, int]:
    """(num_frames, width, height) counted by decoding, which is what every decoder will deliver."""
    container, stream = _open(path)
    n, size = 0, None
    try:
        for frame in container.decode(stream):
            size = size or (frame.width, frame.height)
            n += 1
    except Exception as e:  # noqa: BLE001
        if n == 0:
            raise VideoError(f"{path}: cannot decode ({e})") from None
        # a truncated tail: the decodable prefix is the video
    finally:
        container.close()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames")
    return n, size[0], size[1]


def probe_cached(paths: list[str], cache_file: str | None) -> dict[str, tuple[int, int, int]]:
    """Probe each video once; results are kept in ``cache_file`` (if given) keyed by path, size, mtime."""
    if cache_file is None:
        return {p: probe(p) for p in paths}
    try:
        with open(cache_file, encoding="utf-8") as f:
            cache = json.load(f)
    except (OSError, ValueError):
        cache = {}
    out, changed = {}, False
    for p in paths:
        st = os.stat(p)
        key = f"{p}|{st.st_size}|{int(st.st_mtime)}"
        if key not in cache:
            cache[key] = list(probe(p))
            changed = True
        out[p] = tuple(cache[key])
    if changed:
        from .formats import write_atomic
        try:
            write_atomic(cache_file, json.dumps(cache).encode())
        except OSError:
            pass  # a read-only data folder only costs a re-probe next time
    return out


def decode_frames(path: str, indices: np.ndarray, promised: int | None = None) -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed) as RGB, shape [T, H, W, 3];
    ``promised`` is the frame count the list gave, for the error when the video is shorter."""
    wanted = set(int(i) for i in indices)
    last = max(wanted)
    got: dict[int, np.ndarray] = {}
    container, stream = _open(path)
    try:
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= last:
                break
    except Exception as e:  # noqa: BLE001
        raise VideoError(f"{path}: decoding failed at frame {len(got)} ({e})") from None
    finally:
        container.close()
    if len(got) != len(wanted):
        raise VideoError(f"{path}: has fewer frames than the {promised or last + 1} the list promised")
    return np.stack([got[int(i)] for i in indices])


def stream_info(data: bytes, name: str) -> tuple[int, int, int]:
    """(packets, width, height) of an in-memory video's first video stream, demuxed without decoding."""
    import io
    import av
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise VideoError(f"{name}: no video stream")
            stream = container.streams.video[0]
            packets = sum(1 for p in container.demux(stream) if p.size)
            return packets, stream.codec_context.width, stream.codec_context.height
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for broken files
        raise VideoError(f"{name}: cannot read video ({e})") from None
