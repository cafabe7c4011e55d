"""Video probing and CPU-side decoding with PyAV.

DALI has no operator that returns a frame count, and from DALI 2.1.1 its CPU decoder refuses H.264
(docs/design.md "Dependencies and the facts they rest on"). Counts come from here; on a machine
without a GPU the sampled frames are decoded here too and fed into the same DALI graph as raw frames.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np


class VideoError(RuntimeError):
    """A video that cannot be read; the message names the file."""


@contextlib.contextmanager
def video_errors(what: str):
    """Whatever a decoder raises inside as a VideoError "WHAT (its message)" (PyAV raises many types for a
    broken file); a VideoError passes as it is."""
    try:
        yield
    except VideoError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for broken files
        raise VideoError(f"{what} ({e})") from None


def _open(path: str, threads: str = "AUTO"):
    """The container and its first video stream; ``threads`` is PyAV's decoder thread_type (the loader's
    workers decode with one thread, NONE: the workers are the parallelism, and frame or slice threads
    cost CPU; docs/decoding.md)."""
    import av

    with video_errors(f"{path}: cannot open video"):
        container = av.open(path)
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = threads
    return container, stream


# The 2x2 part of a display matrix (signs of a, b, c, d) -> (quarter turns counter-clockwise, mirrored
# before turning): what ffmpeg's autorotate does with it, measured with ffmpeg's -display_rotation,
# -display_hflip and -display_vflip (docs/design.md "Rotated videos").
_ORIENTATIONS = {
    (1, 0, 0, 1): (0, False),
    (0, -1, 1, 0): (1, False),
    (-1, 0, 0, -1): (2, False),
    (0, 1, -1, 0): (3, False),
    (-1, 0, 0, 1): (0, True),
    (0, 1, 1, 0): (1, True),
    (1, 0, 0, -1): (2, True),
    (0, -1, -1, 0): (3, True),
}


def orientation(frame, name: str) -> tuple[int, bool]:
    """(quarter turns counter-clockwise, mirror first) that make a decoded PyAV frame upright, from the
    display matrix the container gives it; (0, False) without one. Other angles are a VideoError."""
    matrix = frame.side_data.get("DISPLAYMATRIX")
    if matrix is None:
        return 0, False
    a, b, _, c, d = struct.unpack("=9i", bytes(matrix))[:5]  # 16.16 fixed point
    key = tuple(round(v / 65536) for v in (a, b, c, d))
    if key not in _ORIENTATIONS or any(abs(v - k * 65536) > 655 for v, k in zip((a, b, c, d), key)):
        raise VideoError(
            f"{name}: its display matrix turns it by {frame.rotation:g} degrees; only multiples "
            "of 90 (and mirrors) are supported: re-encode it upright (ffmpeg -i IN OUT)"
        )
    return _ORIENTATIONS[key]


def upright(frames: np.ndarray, turns: int, mirror: bool) -> np.ndarray:
    """Frames [..., H, W, C] turned upright: mirrored left-right, then ``turns`` quarter turns counter-clockwise."""
    if mirror:
        frames = frames[..., ::-1, :]
    return np.rot90(frames, turns, axes=(-3, -2)) if turns else frames


def _to_rgb(name: str, size: tuple[int, int] | None = None):
    """A function turning a stream's decoded frames into upright RGB arrays [H, W, 3], as ffmpeg
    (video2pkl, vid2img) shows them; the orientation is read once, from the first frame. A frame whose
    coded size is not ``size`` (width, height; default: the first frame's) is scaled to it, bicubic, as
    ffmpeg scales a stream whose resolution changes mid-way (docs/decoding.md "Resolution changes")."""
    layout = []

    def rgb(frame) -> np.ndarray:
        if not layout:
            layout.append((orientation(frame, name), size or (frame.width, frame.height)))
        (turns, mirror), (width, height) = layout[0]
        if (frame.width, frame.height) == (width, height):
            img = frame.to_ndarray(format="rgb24")
        else:
            img = frame.reformat(width, height, "rgb24", interpolation="BICUBIC").to_ndarray()
        return np.ascontiguousarray(upright(img, turns, mirror))

    return rgb


@dataclass(frozen=True)
class VideoFacts:
    """What probing established about one version of a video file (its size and mtime)."""

    size: int
    mtime_ns: int
    frames: int  # frames the decoder delivers
    width: int  # upright, as displayed (the decoder's frames turned by turns/mirror)
    height: int
    packets: int | None  # video packets in the container: NVDEC pads silently past the last one
    error: str | None = None  # why the file is unreadable (then the counts are 0): kept, not re-probed
    turns: int = 0  # quarter turns counter-clockwise that make decoded frames upright
    mirror: bool = False  # mirror left-right before turning
    # "WxH to WxH at frame N" where the coded frame size first changes mid-stream (a concatenation): the
    # CPU path scales such frames to the first size as ffmpeg does; NVDEC does not, so the GPU path skips it
    size_change: str | None = None

    @classmethod
    def of_file(
        cls, st: os.stat_result, *, frames: int, packets: int | None, layout: tuple[int, int, int, bool], **more
    ) -> VideoFacts:
        """The facts of the file ``st`` was taken of: ``frames`` decoded, ``packets`` demuxed, its upright
        ``layout`` (width, height, turns, mirror); ``more``: error, size_change."""
        width, height, turns, mirror = layout
        return cls(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            frames=frames,
            width=width,
            height=height,
            packets=packets,
            turns=turns,
            mirror=mirror,
            **more,
        )

    def describes(self, st: os.stat_result) -> bool:
        """Whether these facts were taken of the file as it is now (same size and mtime)."""
        return (self.size, self.mtime_ns) == (st.st_size, st.st_mtime_ns)


def probe(path: str, allow_partial: bool = False) -> VideoFacts:
    """Count frames by decoding (what every decoder will deliver) and packets by demuxing, once.

    A decode error before the end the container states (a damaged middle, a cut download) makes the
    video unreadable: using the decodable part as the clip would score a fraction of it as the whole.
    ``allow_partial`` keeps that part instead."""
    st = os.stat(path)
    container, stream = _open(path)
    n, packets, first, stated, coded, change = 0, 0, None, stream.frames, None, None
    try:
        for packet in container.demux(stream):
            packets += 1 if packet.size else 0
            for frame in packet.decode():
                first = first or _layout(frame, path)
                coded = coded or (frame.width, frame.height)
                if change is None and (frame.width, frame.height) != coded:
                    change = f"{coded[0]}x{coded[1]} to {frame.width}x{frame.height} at frame {n}"
                n += 1
    except VideoError:
        raise  # a display matrix at an angle we do not turn
    except Exception as e:  # noqa: BLE001
        if n == 0:
            raise VideoError(f"{path}: cannot decode ({e})") from None
        if stated > n and not allow_partial:
            raise VideoError(
                f"{path}: decoding fails after {n} of the {stated} frames the container states "
                f"({e}); the file is damaged (DATASET.allow_partial_videos keeps the "
                "decodable part)"
            ) from None
    finally:
        container.close()
    if n == 0:
        raise VideoError(f"{path}: no decodable frames")
    return VideoFacts.of_file(st, frames=n, packets=packets, layout=first, size_change=change)


def resolution_change_message(path: str, facts: VideoFacts) -> str:
    """What a user is told about a video whose frame size changes mid-stream, and the fix."""
    w, h = facts.width, facts.height
    return (
        f"{path}: its frame size changes mid-stream ({facts.size_change}); the CPU path scales every frame to "
        f"{w}x{h} as ffmpeg (video2pkl, vid2img) does, the GPU decoder (NVDEC) skips it: re-encode it at one "
        f"size (ffmpeg -i IN -vf scale={w}:{h} OUT)"
    )


def _layout(frame, name: str) -> tuple[int, int, int, bool]:
    """(upright width, upright height, turns, mirror) of a decoded frame."""
    turns, mirror = orientation(frame, name)
    w, h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
    return w, h, turns, mirror


def broken(path: str, why: VideoError) -> VideoFacts:
    """The facts of an unreadable video: kept like any others, so it is not probed again until it changes."""
    st = os.stat(path)
    return VideoFacts.of_file(st, frames=0, packets=None, layout=(0, 0, 0, False), error=str(why))


CACHE_VERSION = 4


def load_probe_cache(cache_file: str | None) -> dict[str, VideoFacts]:
    """The facts a probe cache file holds, by path; {} when it is missing, unreadable or older."""
    try:
        with open(cache_file, encoding="utf-8") as f:
            data = json.load(f)
        if data.get("version") != CACHE_VERSION:
            return {}
        return {p: VideoFacts(*v) for p, v in data["videos"].items()}
    except (OSError, ValueError, TypeError, AttributeError, KeyError):
        return {}


def save_probe_cache(cache_file: str | None, facts: dict[str, VideoFacts]) -> None:
    """Merge ``facts`` into the cache file (another rank may have written it meanwhile), atomically."""
    if cache_file is None:
        return
    merged = {**load_probe_cache(cache_file), **facts}
    from common.files import write_atomic

    try:
        write_atomic(
            cache_file,
            json.dumps(
                {
                    "version": CACHE_VERSION,
                    "videos": {
                        p: [
                            f.size,
                            f.mtime_ns,
                            f.frames,
                            f.width,
                            f.height,
                            f.packets,
                            f.error,
                            f.turns,
                            f.mirror,
                            f.size_change,
                        ]
                        for p, f in merged.items()
                    },
                }
            ).encode(),
        )
    except OSError:
        pass  # a read-only data folder only costs a re-probe next time


def probe_cached(
    paths: list[str], cache_file: str | None, known: dict[str, VideoFacts] | None = None, allow_partial: bool = False
) -> dict[str, VideoFacts]:
    """Facts of each video, probed only where the cache holds none for the file as it is now (same
    size and mtime); new facts are written back to ``cache_file``. An unreadable video gets facts with
    its ``error``: the loader skips and reports it when it comes up, instead of failing the start."""
    known = load_probe_cache(cache_file) if known is None else known
    out, new = {}, {}
    for p in paths:
        st, f = os.stat(p), known.get(p)
        if f is None or not f.describes(st) or (allow_partial and f.error):
            try:
                f = probe(p, allow_partial)
            except VideoError as e:
                f = broken(p, e)
            if not allow_partial:  # the cache holds strict verdicts only
                new[p] = f
        out[p] = f
    if new:
        save_probe_cache(cache_file, new)
    return out


def decode_frames(path: str, indices: np.ndarray, promised: int | None = None, *, threads: str = "NONE") -> np.ndarray:
    """Decode the frames at ``indices`` (any order, repeats allowed) as upright RGB, shape [T, H, W, 3];
    ``promised`` is the frame count the list gave, for the error when the video is shorter.

    An H.264 mp4 whose packets map one to one onto the ``promised`` frames is decoded sparsely: each
    wanted frame from the last clean keyframe before it, each group of pictures once for all the wanted
    frames it holds, groups without one not at all, and without the non-reference pictures nobody wants
    (docs/decoding.md). Anything else is decoded frame by frame from the start. ``threads`` is PyAV's
    thread_type: "NONE" (one thread: where processes are the parallelism, as in the loader's workers,
    it costs the least CPU), "FRAME" or "AUTO" where idle cores would otherwise wait; the frames are the
    same either way."""
    wanted = set(int(i) for i in indices)
    container, stream = _open(path, threads)
    try:
        got = _decode_sparse(container, stream, wanted, promised)
    except VideoError:
        raise
    except Exception:  # noqa: BLE001 - whatever went wrong, the in-order decode decides
        got = None
    finally:
        container.close()
    if got is None:
        container, stream = _open(path, threads)
        try:
            with video_errors(f"{path}: decoding failed"):
                got = _decode_in_order(container, stream, wanted)
        finally:
            container.close()
    if len(got) != len(wanted):
        raise VideoError(f"{path}: has fewer frames than the {promised or max(wanted) + 1} the list promised")
    return np.stack([got[int(i)] for i in indices])


def _first_size(stream) -> tuple[int, int] | None:
    """The coded (width, height) of a stream's first frames, which opening it establishes (ffmpeg's output
    size when the resolution changes later); None when unknown."""
    cc = stream.codec_context
    return (cc.width, cc.height) if cc.width and cc.height else None


def _decode_in_order(container, stream, wanted: set[int]) -> dict[int, np.ndarray]:
    rgb = _to_rgb(container.name, _first_size(stream))
    got, last = {}, max(wanted)
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            got[i] = rgb(frame)
        if i >= last:
            break
    return got


def _decode_sparse(container, stream, wanted: set[int], promised: int | None) -> dict[int, np.ndarray] | None:
    """The wanted frames of an H.264 stream in an ISO/MP4 (avcC) container, decoding only what they need;
    None when the stream does not allow it safely (then everything is decoded in order)."""
    extradata = stream.codec_context.extradata or b""
    if stream.codec_context.name != "h264" or len(extradata) < 7 or extradata[0] != 1 or not promised:
        return None
    length_size, rgb = (extradata[4] & 3) + 1, _to_rgb(container.name, _first_size(stream))
    packets = [p for p in container.demux(stream) if p.size]
    shown = [p for p in packets if not p.is_discard]
    if any(p.pts is None for p in shown) or len(shown) != promised:
        return None  # frames the decoder delivers are not the packets' timestamps one to one
    order = sorted(p.pts for p in shown)
    stamped = [p.pts for p in packets if p.pts is not None]
    if len(set(stamped)) != len(stamped):
        return None  # two packets shown at one time: which one a frame came from would be a guess
    index_of = {pts: i for i, pts in enumerate(order)}
    wanted_pts = {order[i] for i in wanted if i < len(order)}
    if len(wanted_pts) != len(wanted):
        return None  # a wanted frame beyond the end: the in-order decode reports it
    ranges = decode_ranges([(p.pts, p.is_keyframe) for p in packets], wanted_pts)
    got, codec = {}, stream.codec_context

    def take(frames):
        for frame in frames:
            i = index_of.get(frame.pts)
            if i in wanted:
                got[i] = rgb(frame)

    for n, (first, last) in enumerate(ranges):
        if n:  # a clean start further on: empty the decoder and start it afresh there
            take(codec.decode(None))
            codec.flush_buffers()
        for p in packets[first : last + 1]:
            if p.pts not in wanted_pts and _disposable(bytes(p), length_size):
                continue  # a picture no other picture refers to, and not wanted
            take(p.decode())
            if len(got) == len(wanted):
                return got
    take(codec.decode(None))  # drain the reorder buffer
    return got if len(got) == len(wanted) else None


def decode_ranges(packets: list[tuple[int | None, bool]], wanted_pts: set[int]) -> list[tuple[int, int]]:
    """The spans of packets (first, last position in decode order, inclusive) to decode for the frames
    shown at ``wanted_pts``, from (pts, is_keyframe) of each packet in decode order: one span per clean
    start that a wanted frame needs, so each group of pictures is decoded once for all the wanted frames
    it holds and those between wanted frames are not decoded at all (docs/decoding.md).

    A clean start is a keyframe that nothing decoded after it is shown before (no leading pictures that
    would need what comes earlier); a wanted frame needs the last clean start no later than it, in
    decode order and in display order (none: the first packet). Spans that touch are merged."""
    later_min, suffix_min = math.inf, [0.0] * len(packets)
    for k in range(len(packets) - 1, -1, -1):
        pts = packets[k][0]
        later_min = min(later_min, pts if pts is not None else -math.inf)
        suffix_min[k] = later_min
    starts = [k for k, (pts, key) in enumerate(packets) if key and pts is not None and suffix_min[k] == pts]
    position = {pts: k for k, (pts, _) in enumerate(packets) if pts in wanted_pts}
    spans = []
    for pts in wanted_pts:
        at = position[pts]
        first = max((k for k in starts if k <= at and packets[k][0] <= pts), default=0)
        spans.append((first, at))
    merged: list[tuple[int, int]] = []
    for first, last in sorted(spans):
        if merged and first <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _disposable(data: bytes, length_size: int) -> bool:
    """Whether an H.264 access unit (length-prefixed NAL units) holds only non-reference slices
    (nal_ref_idc 0): no other picture is predicted from it, so leaving it out changes nothing else."""
    pos, slices = 0, 0
    while pos + length_size < len(data):
        n = int.from_bytes(data[pos : pos + length_size], "big")
        header = data[pos + length_size]
        if 1 <= header & 0x1F <= 5:  # a coded slice
            if header >> 5 & 3:
                return False
            slices += 1
        pos += length_size + n
    return slices > 0 and pos == len(data)


def stream_info(data: bytes, name: str) -> tuple[int, tuple[int, int, int, bool]]:
    """(packets, (upright width, upright height, turns, mirror)) of an in-memory video's first video
    stream: demuxed, with only its first frame decoded (for the display matrix the frames carry)."""
    import io

    import av

    with video_errors(f"{name}: cannot read video"), av.open(io.BytesIO(data)) as container:
        if not container.streams.video:
            raise VideoError(f"{name}: no video stream")
        stream = container.streams.video[0]
        packets, layout = 0, None
        for packet in container.demux(stream):
            packets += 1 if packet.size else 0
            if layout is None:
                layout = next((_layout(f, name) for f in packet.decode()), None)
        if layout is None:
            raise VideoError(f"{name}: no decodable frames")
        return packets, layout
