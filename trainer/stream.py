"""Live sources as a timeline: a pipe, a FIFO or a network stream decoded in a reader thread into a ring
buffer, each window scored as soon as its last frame has arrived (docs/inference.md "Live streams")."""

from __future__ import annotations

import collections
import os
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from clipdata.video import VideoError, _to_rgb

from . import clip_scorer, reports
from .timeline import Span, Timeline

NETWORK = ("udp://", "rtp://", "rtsp://", "http://", "https://", "tcp://", "srt://", "rtmp://", "hls+http://")


class StreamError(VideoError):
    """A live source that cannot be opened, never sends, or stalls; the message names it."""


def is_live(source: str) -> bool:
    """A pipe (``-``), a FIFO, or a network address: read as it comes, never seeked."""
    if source == "-" or source.lower().startswith(NETWORK):
        return True
    try:
        return stat.S_ISFIFO(os.stat(source).st_mode)
    except OSError:
        return False


class _PatientFile:
    """A pipe or FIFO as a file object for PyAV: each read waits at most ``timeout`` seconds for data
    (PyAV's own timeout cannot interrupt a read from a file descriptor), and ``stop`` ends it."""

    def __init__(self, fd: int, name: str, timeout: float, stop: threading.Event):
        self.fd, self.name, self.timeout, self.stop = fd, name, timeout, stop
        self.received = 0

    def read(self, n: int) -> bytes:
        deadline = time.monotonic() + self.timeout
        while True:
            if self.stop.is_set():
                return b""
            ready, _, _ = select.select([self.fd], [], [], min(0.2, max(0.0, deadline - time.monotonic())))
            if ready:
                try:
                    data = os.read(self.fd, n)
                except BlockingIOError:
                    continue
                self.received += len(data)
                return data
            if time.monotonic() >= deadline:
                what = "sent nothing" if not self.received else "stalled"
                raise StreamError(f"{self.name}: {what} for {self.timeout:g}s")

    def seekable(self) -> bool:
        return False


def open_live(source: str, timeout: float, stop: threading.Event):
    """(container, video stream) of a live source; a source that does not answer or sends nothing within
    ``timeout`` seconds is a StreamError naming it."""
    import av

    fobj = None
    if source == "-" or not source.lower().startswith(NETWORK):
        if source == "-":
            fd, name = os.dup(sys.stdin.fileno()), "standard input"
        else:
            fd, name = os.open(source, os.O_RDONLY | os.O_NONBLOCK), source  # a FIFO: no wait for a writer
        os.set_blocking(fd, False)
        fobj = _PatientFile(fd, name, timeout, stop)
    try:
        container = av.open(fobj or source, timeout=None if fobj else (timeout, timeout))
    except StreamError:
        raise
    except Exception as e:  # noqa: BLE001 - PyAV raises many types
        if fobj is not None:
            os.close(fobj.fd)
        reason = getattr(e, "strerror", None) or str(e)
        if isinstance(e, av.ExitError) or "Immediate exit" in reason:
            reason = f"no answer within {timeout:g}s"
        raise StreamError(f"{source}: cannot open the stream ({reason})") from None
    if not container.streams.video:
        container.close()
        raise StreamError(f"{source}: the stream holds no video")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    return container, stream, fobj


class Ring:
    """The frames the windows sample, between the reader thread and the scoring loop: at most
    ``capacity`` of them; when the scoring falls behind, the oldest are dropped (and counted)."""

    def __init__(self, capacity: int):
        self.capacity, self.dropped = capacity, 0
        self._items: collections.deque = collections.deque()
        self._cond = threading.Condition()
        self.closed, self.error = False, None

    def put(self, item) -> None:
        with self._cond:
            if item[1] is not None and sum(1 for i in self._items if i[1] is not None) >= self.capacity:
                for k, old in enumerate(self._items):
                    if old[1] is not None:
                        del self._items[k]
                        self.dropped += 1
                        break
            self._items.append(item)
            self._cond.notify()

    def close(self, error: Exception | None = None) -> None:
        with self._cond:
            self.closed, self.error = True, error
            self._cond.notify()

    def get(self, stop: threading.Event):
        """The oldest item, or None once the reader has ended and everything was taken (or on ``stop``)."""
        with self._cond:
            while not self._items:
                if self.closed or stop.is_set():
                    return None
                self._cond.wait(0.2)
            return self._items.popleft()


class LiveWindows:
    """Windows of ``window`` frames every ``stride`` frames of a live stream, counted from its first frame."""

    def __init__(self, spec, window: int, stride: int):
        self.window, self.stride = window, stride
        self.rel = clip_scorer.window_indices(spec, 0, window)
        self._rel_set = sorted(set(self.rel.tolist()))

    def sampled(self, n: int) -> bool:
        """Whether frame ``n`` is sampled by some window."""
        return any(n >= r and (n - r) % self.stride == 0 for r in self._rel_set)

    def ending(self, n: int) -> int | None:
        """The window whose last frame is ``n``, if any."""
        s = n - self.window + 1
        return s // self.stride if s >= 0 and s % self.stride == 0 else None

    def indices(self, j: int) -> np.ndarray:
        return j * self.stride + self.rel


def _reader(
    container,
    stream,
    windows: LiveWindows,
    ring: Ring,
    stop: threading.Event,
    fps: float,
    times: dict,
    *,
    source: str,
    timeout: float,
):
    """Decode every frame; hand over the sampled ones (as RGB) and a marker when a window's last frame arrives."""
    rgb = _to_rgb(container.name)
    first_pts = None
    try:
        for n, frame in enumerate(container.decode(stream)):
            now = time.monotonic()
            if frame.pts is not None and frame.time_base is not None:
                first_pts = frame.pts if first_pts is None else first_pts
                times[n] = float((frame.pts - first_pts) * frame.time_base)
            else:
                times[n] = n / fps
            if windows.sampled(n):
                ring.put((n, rgb(frame), now))
            j = windows.ending(n)
            if j is not None:
                ring.put((n, None, now, j))
            if stop.is_set():
                break
        ring.close()
    except Exception as e:  # noqa: BLE001 - a stall, a broken stream: the windows so far stand
        if not isinstance(e, StreamError):
            if "Immediate exit" in str(e):  # PyAV's read timeout interrupted ffmpeg
                e = StreamError(f"{source}: sent nothing for {timeout:g}s; the source stalled or ended")
            else:
                e = StreamError(f"{source}: the stream broke ({e})")
        ring.close(e)
    finally:
        container.close()


@dataclass(kw_only=True)
class _Live:
    """One live run's state: the windows, the ring the reader thread fills, when each frame came, the
    timeline so far and its figures, and why the run ended (a signal, --max-seconds, the stream's end)."""

    windows: LiveWindows
    ring: Ring
    tl: Timeline
    stats: dict
    stop: threading.Event
    why: dict
    times: dict[int, float] = field(default_factory=dict)
    started: float = 0.0

    def clips(self, max_seconds: float | None, print_line) -> Iterator:
        """Each window's ((index, arrival), sampled frames) as soon as its last frame has come, then FLUSH;
        a window some of whose frames were dropped is skipped and counted."""
        held: dict[int, np.ndarray] = {}
        while True:
            if max_seconds is not None and time.monotonic() - self.started >= max_seconds:
                self.why["reason"] = f"--max-seconds {max_seconds:g} reached"
                self.stop.set()
            item = self.ring.get(self.stop)
            if item is None:
                return
            if item[1] is not None:
                held[item[0]] = item[1]
                continue
            n, _, arrived, j = item
            idx = self.windows.indices(j).tolist()
            if all(i in held for i in idx):
                yield (j, arrived), np.stack([held[i] for i in idx])
                yield clip_scorer.FLUSH
            else:
                self.stats["skipped_windows"] += 1  # frames it samples were dropped: the model is behind
                if self.stats["skipped_windows"] in (1, 10, 100, 1000):
                    print_line(
                        f"{'':9s}window {j} skipped: {self.ring.dropped} frame(s) dropped so far, the model is "
                        "slower than the stream"
                    )
            low = (j + 1) * self.windows.stride
            for i in [i for i in held if i < low]:
                del held[i]

    def add(self, j: int, arrived: float, logits, top_k: int) -> str:
        """Window ``j``'s scores into the timeline; returns its line: its span, top classes and latency."""
        latency = time.monotonic() - arrived
        w, s, fps = self.windows.window, self.windows.stride, self.tl.fps
        first, last = j * s, j * s + w - 1
        start_s = self.times.get(first, first / fps)
        end_s = self.times.get(last, last / fps) + 1 / fps
        probs = reports.softmax(logits)
        self.tl.starts.append(start_s)
        self.tl.ends.append(end_s)
        self.tl.probs.append(probs)
        self.tl.latency.append(latency)
        names = self.tl.names
        top = np.argsort(-probs)[: min(top_k, len(names))]
        return (
            f"{start_s:9.2f}-{end_s:.2f}s  "
            + ", ".join(f"{names[i]} {probs[i]:.3f}" for i in top)
            + f"  latency {latency * 1000:.0f} ms"
        )

    def finish(self) -> None:
        """The closing figures: frames dropped and read, windows scored, seconds, and why the run ended."""
        self.stats.update(
            dropped_frames=self.ring.dropped,
            windows=len(self.tl),
            frames=len(self.times),
            seconds=time.monotonic() - self.started,
        )
        self.stats["reason"] = self.why["reason"]
        if self.ring.error is not None and self.why["reason"] == "the stream ended":
            self.stats["reason"], self.stats["error"] = "stopped early", self.ring.error


def _live(spec, fps: float, *, source: str, window: Span, stride: Span, names: list[str], stop, why) -> _Live:
    """The state of a run over ``source`` at ``fps``: its ring holds the sampled frames of a window and a
    stride's more."""
    w, s = window.frames(fps), stride.frames(fps)
    windows = LiveWindows(spec, w, s)
    per_window = len(set(windows.rel.tolist()))
    return _Live(
        windows=windows,
        ring=Ring(capacity=per_window * (-(-w // s) + 1)),
        tl=Timeline(source, fps, str(window), str(stride), names, [], [], [], latency=[]),
        stats={"fps": fps, "window_frames": w, "stride_frames": s, "skipped_windows": 0},
        stop=stop,
        why=why,
    )


def run_stream(
    cfg,
    scorer,
    names: list[str],
    source: str,
    window: Span,
    stride: Span,
    out_dir: str,
    top_k: int,
    *,
    max_seconds: float | None = None,
    timeout: float = 10.0,
    print_line=print,
) -> tuple[list[str], Timeline, dict]:
    """Score a live source window by window until it ends, ``max_seconds`` pass, or SIGINT/SIGTERM; print
    one line per window and write the timeline so far. Returns (paths, timeline, stats); a source that
    stalls ends the run with its StreamError after the timeline is written."""
    from common.files import check_writable

    check_writable(out_dir, "the timeline folder")
    spec = clip_scorer.clip_spec(cfg)
    stop = threading.Event()
    why = {"reason": "the stream ended"}

    def on_signal(signum, frame):
        why["reason"] = f"stopped by {signal.Signals(signum).name}"
        stop.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        container, stream, fobj = open_live(source, timeout, stop)
        fps = float(stream.average_rate or stream.guessed_rate or 0) or 25.0
        live = _live(spec, fps, source=source, window=window, stride=stride, names=names, stop=stop, why=why)
        reader = threading.Thread(
            target=_reader,
            args=(container, stream, live.windows, live.ring, stop, fps, live.times),
            kwargs=dict(source=source, timeout=timeout),
            daemon=True,
            name="stream-reader",
        )
        # one clip through the graph and the model first: the first window's latency is not their start-up
        warm = np.zeros((len(live.windows.rel), 64, 64, 3), np.uint8)
        for _ in clip_scorer.score_clips(spec, scorer, [(None, warm)], batch_size=1, prefetch=1):
            pass
        live.started = time.monotonic()
        reader.start()
        try:
            clips = live.clips(max_seconds, print_line)
            for (j, arrived), logits in clip_scorer.score_clips(spec, scorer, clips, batch_size=1, prefetch=1):
                print_line(live.add(j, arrived, logits, top_k))
        finally:
            stop.set()
            reader.join(timeout=max(2.0, timeout))
            live.finish()
            paths = reports.write_timeline(live.tl, out_dir, top_k) if len(live.tl) else []
        return paths, live.tl, live.stats
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
