"""The frames of many windows of one video, each frame decoded at most once however much the windows
overlap: one demuxing pass indexes the packets, then only the groups of pictures that hold a sampled
frame are decoded, without the non-reference pictures nobody samples (docs/inference.md "Each frame
decoded at most once")."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clipdata.video import VideoError, _disposable, _open, _to_rgb, probe, video_errors


@dataclass
class VideoIndex:
    """What one demuxing pass (no decoding) says of a video file: each packet's timestamp, whether it is
    a keyframe one may start decoding at, and whether it is a picture nothing else refers to."""

    path: str
    num_frames: int
    fps: float
    times: np.ndarray  # seconds of frame i (display order) from the first frame
    pts: np.ndarray | None  # display-order timestamps (None: frames are counted, not indexed)
    packet_pts: np.ndarray | None = None  # per packet in decode order
    clean_key: np.ndarray | None = None  # a keyframe nothing decoded later is shown before
    disposable: np.ndarray | None = None  # an H.264 non-reference picture

    @property
    def sparse(self) -> bool:
        return self.pts is not None

    def duration(self) -> float:
        return float(self.times[-1] + 1 / self.fps) if self.num_frames else 0.0


def index_video(path: str) -> VideoIndex:
    """The packet index of an H.264 video (mp4/mov/mkv...), read without decoding; other codecs, and
    streams whose packets do not map one to one onto frames, are counted by decoding (``video.probe``)."""
    container, stream = _open(path)
    try:
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        codec = stream.codec_context.name
        extradata = stream.codec_context.extradata or b""
        avcc = codec == "h264" and len(extradata) >= 7 and extradata[0] == 1
        length_size = (extradata[4] & 3) + 1 if avcc else 4
        pts, keys, disp = [], [], []
        ok = avcc
        if ok:
            for p in container.demux(stream):
                if not p.size:
                    continue
                if p.pts is None or p.is_discard:
                    ok = False
                    break
                pts.append(p.pts)
                keys.append(p.is_keyframe)
                disp.append(_disposable(bytes(p), length_size))
        time_base = float(stream.time_base)
    except Exception as e:  # noqa: BLE001 - PyAV raises many types for broken files
        raise VideoError(f"{path}: cannot read video ({e})") from None
    finally:
        container.close()
    order = np.sort(np.array(pts, np.int64))
    if not ok or not pts or len(np.unique(order)) != len(order):
        n = probe(path).frames
        return VideoIndex(path, n, fps, np.arange(n) / fps, None)
    packet_pts = np.array(pts, np.int64)
    # a keyframe is a clean start when nothing decoded after it is shown before it (no leading pictures)
    suffix_min = np.minimum.accumulate(packet_pts[::-1])[::-1]
    clean = np.array(keys) & (suffix_min == packet_pts)
    return VideoIndex(
        path,
        len(order),
        fps,
        (order - order[0]) * time_base,
        order,
        packet_pts,
        clean,
        np.array(disp),
    )


def packets_to_decode(index: VideoIndex, wanted: np.ndarray) -> np.ndarray:
    """Per packet (decode order), whether the wanted frames (display indices) need it decoded: every
    packet from the last clean keyframe before a wanted frame up to that frame's own packet, less the
    non-reference pictures nobody wants. GOPs holding no wanted frame are not decoded at all."""
    n = len(index.packet_pts)
    pos_of = {int(p): k for k, p in enumerate(index.packet_pts)}
    keys = np.flatnonzero(index.clean_key)
    mark = np.zeros(n + 1, np.int64)
    wanted_pts = set()
    for i in np.unique(wanted):
        pts = int(index.pts[i])
        wanted_pts.add(pts)
        pos = pos_of[pts]
        # the last clean keyframe shown no later than the frame, and decoded no later than it
        cands = keys[(keys <= pos) & (index.packet_pts[keys] <= pts)]
        start = int(cands[-1]) if len(cands) else 0
        mark[start] += 1
        mark[pos + 1] -= 1
    needed = np.cumsum(mark[:n]) > 0
    keep = np.array([p in wanted_pts for p in index.packet_pts.tolist()])
    return needed & (keep | ~index.disposable)


class DecodeStats:
    """What a reader decoded: frames out of the decoder, frames converted to RGB, most frames held."""

    def __init__(self):
        self.decoded, self.converted, self.held_max = 0, 0, 0


def read_windows(
    index: VideoIndex, samples: list[np.ndarray], stats: DecodeStats | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """(window number, its frames [T, H, W, 3] at ``samples[window]``) of each window, in order, decoding
    the video once: a frame is decoded at most once and kept only while a window still to come samples it.
    Windows must not go back in time (each one's last frame at or after the previous one's)."""
    windows = _Windows(samples, stats or DecodeStats())
    container, stream = _open(index.path)
    rgb = _to_rgb(index.path)
    decoded = _sparse_decode(index, container, stream, samples) if index.sparse else _full_decode(container, stream)
    try:
        with video_errors(f"{index.path}: decoding failed"):
            for frames in decoded:
                windows.take(frames, rgb)
                yield from windows.ready()
                if windows.done and not index.sparse:
                    break
    finally:
        container.close()
    if not windows.done:
        raise VideoError(
            f"{index.path}: decoding stopped before window {windows.next} (frames up to "
            f"{int(samples[windows.next].max())}) was complete; the file is damaged or shorter than its index says"
        )


def _sparse_decode(index: VideoIndex, container, stream, samples: list[np.ndarray]) -> Iterator[list]:
    """[(frame number or None, frame)] of each packet decoded: only those ``packets_to_decode`` names."""
    decode = packets_to_decode(index, np.concatenate(samples))
    frame_of = {int(p): i for i, p in enumerate(index.pts)}
    k = 0
    for packet in container.demux(stream):
        if packet.size:  # (an empty packet is the end: decoding it drains the reorder buffer)
            todo, k = decode[k], k + 1
            if not todo:
                continue
        yield [(frame_of.get(frame.pts), frame) for frame in packet.decode()]


def _full_decode(container, stream) -> Iterator[list]:
    """[(frame number, frame)] of every frame, one at a time: a video without a packet index."""
    for i, frame in enumerate(container.decode(stream)):
        yield [(i, frame)]


class _Windows:
    """The frames some window still to come samples, held until the last window that uses them."""

    def __init__(self, samples: list[np.ndarray], stats: DecodeStats):
        self.samples, self.stats = samples, stats
        self.users: dict[int, int] = {}
        for idx in samples:
            for i in set(idx.tolist()):
                self.users[i] = self.users.get(i, 0) + 1
        self.held: dict[int, np.ndarray] = {}
        self.next = 0  # the first window not yet given out

    @property
    def done(self) -> bool:
        return self.next == len(self.samples)

    def take(self, frames: list, rgb) -> None:
        """Count the decoded ``frames`` and keep (in RGB) those a window to come samples."""
        for i, frame in frames:
            self.stats.decoded += 1
            if i is not None and self.users.get(i) and i not in self.held:
                self.held[i] = rgb(frame)
                self.stats.converted += 1
                self.stats.held_max = max(self.stats.held_max, len(self.held))

    def ready(self) -> Iterator[tuple[int, np.ndarray]]:
        """The windows whose frames are all held now, in order; frames no later window uses are let go."""
        while not self.done and all(i in self.held for i in self.samples[self.next].tolist()):
            idx = self.samples[self.next].tolist()
            frames = np.stack([self.held[i] for i in idx])
            for i in set(idx):
                self.users[i] -= 1
                if not self.users[i]:
                    del self.held[i]
            yield self.next, frames
            self.next += 1
