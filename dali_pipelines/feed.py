"""The loader's host side: what each sample needs before DALI decodes it, computed off the training thread.

One sample is a pure function of its settings, its list entry and its place in the epoch
(``load_sample``): the sampled JPEGs of a pkl (read by offset through the frame index), the sampled
rawframe files, a video's bytes (GPU) or its sampled frames decoded with PyAV (CPU), plus the crop
window and flip. ``ParallelMap`` runs such calls in worker processes and hands the results back in
order, so what a batch holds never depends on the number of workers or on their timing.
docs/design.md "The host-side feed" says why this is not DALI's parallel external source.
"""

from __future__ import annotations

import collections
import ctypes
import os
import signal
import sys
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from launch import exits

from . import crops
from .formats import (
    DataFormatError,
    Sample,
    StaleIndexError,
    check_jpeg,
    jpeg_size,
    read_indexed_frames,
    read_pkl,
    read_pkl_index,
)
from .sampling import sample_indices
from .video import VideoError, VideoFacts, decode_frames, probe, resolution_change_message, stream_info


class LabelError(DataFormatError):
    """A label outside the model's classes: the list and the config disagree, so the run stops."""


class WorkerError(RuntimeError):
    """A loader worker process died or hung; the run stops rather than wait or train on less."""


class WorkerTimeout(WorkerError):
    """A loader worker returned nothing in time: a file that hangs (a FIFO, a stuck mount), not a crash."""


# seconds the other ranks wait in a collective for this one (trainer/dist.py sets it): the worker timeout
# must end before it, or the job ends there first without naming the file this rank was waiting for
COLLECTIVE_TIMEOUT_ENV = "TSN_COLLECTIVE_TIMEOUT"


def worker_timeout_within_collective(timeout: float) -> float:
    """``timeout``, cut to two thirds of the ranks' collective timeout when that is shorter."""
    collective = float(os.environ.get(COLLECTIVE_TIMEOUT_ENV) or "inf")
    return min(timeout, max(1.0, collective * 2 / 3))


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """How every sample of one loader is read and cut: the source, the frames and the views."""

    source: str  # the list's format: "pkl" | "rawframes" | "videos"
    # what the DALI graph decodes: "jpeg" (nvJPEG / libjpeg), "video" (NVDEC), or "frames" (nothing:
    # PyAV decoded them in the feed, the CPU path for videos)
    decode: str
    mode: str  # "train" | "val" | "test"
    num_segments: int
    target_size: int
    short_size: int
    num_clips: int = 1
    num_crops: int = 1
    crop: str = "multiscale"
    flip: bool = True
    sampling: str = "segment"
    dense_interval: int = 8
    num_classes: int | None = None
    allow_partial_videos: bool = False  # keep the decodable part of a video damaged before its end


def load_sample(spec: ClipSpec, s: Sample, key: tuple, facts: VideoFacts | None = None):
    """One sample's DALI inputs: ``(row, new_facts)``. ``key`` seeds its randomness (the loader passes
    (seed, rank, epoch, position)); ``facts`` is what an earlier probe knows of a video, and
    ``new_facts`` what this call had to establish again (the video was new or had changed), else None.
    Raises DataFormatError / VideoError / OSError for an unreadable sample, LabelError for a bad label."""
    rng = np.random.default_rng(key)
    label, new_facts = s.label, None
    if spec.source == "pkl":
        label, data = _pkl_frames(s.path, spec, rng)
        width, height = _frame_size(data)
    elif spec.source == "rawframes":
        data = []
        for i in _indices(spec, s.num_frames, rng):
            path = os.path.join(s.path, f"img_{i + 1:05d}.jpg")
            try:
                with open(path, "rb") as f:
                    data.append(check_jpeg(f.read()))
            except FileNotFoundError:
                raise DataFormatError(f"the list says {s.num_frames} frames but {path} is missing") from None
        width, height = _frame_size(data)
    elif spec.decode == "frames":
        num_frames = s.num_frames
        if not num_frames:  # the count came from a probe: trust it only for the file it was taken of
            current = _current(s.path, facts, os.stat(s.path), spec, need_packets=False)
            new_facts, num_frames = (current if current is not facts else None), current.frames
        data = [decode_frames(s.path, _indices(spec, num_frames, rng), num_frames, threads="NONE")]
        height, width = data[0].shape[1:3]
    else:
        with open(s.path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
        current = _current(s.path, facts, st, spec, need_packets=True, data=raw, listed=s.num_frames)
        new_facts = current if current is not facts else None
        num_frames = s.num_frames or current.frames
        if current.size_change:  # NVDEC is not known to rescale mid-stream: skipped rather than trusted
            raise VideoError(resolution_change_message(s.path, current))
        if current.packets < num_frames:  # NVDEC would pad silently: catch a wrong count here
            raise VideoError(f"{s.path}: has {current.packets} frames, fewer than the {num_frames} the list promised")
        # NVDEC ignores the display matrix: the graph turns the frames upright (loader._upright)
        data = [
            np.frombuffer(raw, np.uint8),
            _indices(spec, num_frames, rng),
            np.array(current.mirror, np.int32),
            np.array(90.0 * current.turns, np.float32),
        ]
        width, height = current.width, current.height
    if not (width > 0 and height > 0):  # the crop windows divide by them
        raise DataFormatError(f"frames of {width}x{height} pixels")
    if spec.num_classes is not None and not 0 <= label < spec.num_classes:
        raise LabelError(
            f"{s.path} (list line {s.line}): label {label} is outside "
            f"[0, {spec.num_classes}); check the list against the label file"
        )
    if spec.mode == "train":
        if spec.crop == "multiscale":
            win = crops.multiscale_window(width, height, rng, spec.target_size, spec.short_size)
        else:
            win = crops.random_resized_window(width, height, rng)
        views = [(win, spec.flip and rng.random() < 0.5)]
    else:
        views = crops.test_windows(width, height, spec.target_size, spec.short_size, spec.num_crops)
    if spec.decode == "jpeg":
        data = [np.frombuffer(d, np.uint8) for d in data]
    args = [a for win, flip in views for a in (win[:2], win[2:], np.array(flip, np.int32))]
    return (*data, *args, np.array(label, np.int64)), new_facts


def _indices(spec: ClipSpec, num_frames: int, rng) -> np.ndarray:
    return sample_indices(
        num_frames, spec.num_segments, spec.mode, rng, spec.num_clips, spec.sampling, spec.dense_interval
    )


def _pkl_frames(path: str, spec: ClipSpec, rng) -> tuple[int, list[bytes]]:
    """(label, the sampled JPEGs): through the frame index when the file has one made of it as it is,
    else read whole (an index older than the file's last change describes bytes that may be gone)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        st = os.fstat(fd)
        try:
            index = read_pkl_index(fd, st.st_size, st.st_mtime_ns)
        except StaleIndexError as e:
            index = None
            _note_stale_index(path, str(e))
        if index is not None:
            return index.label, read_indexed_frames(fd, index, _indices(spec, index.num_frames, rng))
    _, label, frames = read_pkl(path)
    if not frames:
        raise DataFormatError("the pkl holds no frames")
    return label, [check_jpeg(frames[i]) for i in _indices(spec, len(frames), rng)]


_stale_noted = []  # per process: the first pkl read whole for a stale index is named, the rest counted


def _note_stale_index(path: str, why: str) -> None:
    if not _stale_noted:
        print(
            f"dali_pipelines: {path}: {why}; read whole instead (slower, never the old frames). Give changed or "
            "copied files a new index: python preprocessing/build_list.py pkl DIR LIST --index N",
            file=sys.stderr,
            flush=True,
        )
    _stale_noted.append(path)


def _frame_size(jpegs: list[bytes]) -> tuple[int, int]:
    """The frames' common size: one crop window serves them all, so they must agree."""
    sizes = {jpeg_size(j) for j in jpegs}
    if len(sizes) != 1:
        raise DataFormatError(f"the sampled frames differ in size ({sorted(sizes)}); regenerate the clip")
    return sizes.pop()


def _current(
    path: str,
    facts: VideoFacts | None,
    st: os.stat_result,
    spec: ClipSpec,
    need_packets: bool,
    data: bytes | None = None,
    listed: int = 0,
) -> VideoFacts:
    """``facts`` if they were taken of this very file (size and mtime) and hold what is needed, else
    what probing the file now establishes: a changed file is probed again, never trusted. Facts that
    found the file unreadable raise its VideoError."""
    if facts is not None and facts.describes(st) and (facts.packets is not None or facts.error or not need_packets):
        if facts.error:
            raise VideoError(facts.error)
        return facts
    if data is not None and listed:  # the list gives the count; the GPU path needs the packets only
        packets, (width, height, turns, mirror) = stream_info(data, path)
        return VideoFacts(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            frames=listed,
            width=width,
            height=height,
            packets=packets,
            turns=turns,
            mirror=mirror,
        )
    return probe(path, spec.allow_partial_videos)


def fork_context():
    """The "fork" multiprocessing context, after freeing the garbage waiting in reference cycles: native
    objects in it (PyAV frames, whose side data refers back to them) would otherwise be freed in a child,
    which then hangs on thread state that only the parent has. Every worker pool forks through this."""
    import gc
    import multiprocessing

    gc.collect()
    return multiprocessing.get_context("fork")


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (no orphans after a kill -9)."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def default_num_workers() -> int:
    """A share of this host's cores per local rank, less one for the training process itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("PADDLE_LOCAL_SIZE") or 1))
    return max(1, cores // local_ranks - 1)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler the training process may have set
    die_with_parent()


def _run_chunk(fn, chunk):
    """Worker: ``fn`` on each item; an unreadable sample is an ("error", message) result, not a failure
    of the chunk. A LabelError is ("fatal", message): the run must stop."""
    out = []
    for args in chunk:
        try:
            out.append(("ok", fn(*args)))
        except LabelError as e:
            out.append(("fatal", str(e)))
        except (DataFormatError, VideoError, OSError) as e:
            out.append(("error", str(e)))
    return out


class _Inline:
    """A chunk computed when its result is asked for (``num_workers=0``: everything in this process)."""

    def __init__(self, fn, chunk):
        self._fn, self._chunk = fn, chunk

    def result(self, timeout=None):
        return _run_chunk(self._fn, self._chunk)

    def cancel(self):
        return True


class ParallelMap:
    """``fn(*item)`` over a stream of items in ``num_workers`` processes (0: in this one), at most
    ``ahead`` items in flight, results in submission order.

    A worker that dies (killed, out of memory) or returns nothing for ``timeout`` seconds raises
    WorkerError naming what it was reading; the pool is then killed, so nothing is left behind. Under
    run_dist.sh the files of the chunk it waits for are noted for the job's report (launch/exits.py
    ReadingNote): a rank stopped or stuck later is named with them."""

    def __init__(self, fn, num_workers: int, ahead: int, timeout: float, chunk: int = 8):
        self.fn, self.num_workers = fn, num_workers
        self.timeout = worker_timeout_within_collective(timeout)
        self._slow_hint = (
            "raise DATASET.worker_timeout if reads are this slow"
            if self.timeout == timeout
            else f"DATASET.worker_timeout is cut to 2/3 of the {os.environ[COLLECTIVE_TIMEOUT_ENV]} s the other "
            "ranks wait for this one in a collective"
        )
        self.chunk = chunk if num_workers else 1  # in this process, load nothing before it is asked for
        self.ahead = max(ahead, 2 * num_workers * self.chunk, self.chunk)
        self._pending: collections.deque = collections.deque()  # (future, items)
        self._ready: collections.deque = collections.deque()  # (item, result) of the head chunk
        self._in_flight = 0
        self._pool, self._procs = None, []
        self._note = exits.ReadingNote()
        if num_workers:
            # fork: the workers need no import of the training script and start in milliseconds;
            # they never touch CUDA or DALI, so forking after either is initialised is safe for them
            self._pool = ProcessPoolExecutor(num_workers, mp_context=fork_context(), initializer=_worker_init)
            self._finalizer = weakref.finalize(self, _kill_pool, self._pool, self._procs)
            self._pool.submit(int).result()  # start the workers now, before the DALI pipeline's threads
            self._procs.extend(self._pool._processes.values())  # a broken pool forgets them

    @property
    def worker_pids(self) -> list[int]:
        return [p.pid for p in self._procs] if self._pool is not None else []

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def want(self) -> int:
        """How many more items may be submitted now: whole chunks only, so workers get full chunks."""
        free = max(0, self.ahead - self._in_flight)
        return free - free % self.chunk

    def submit(self, items: list[tuple]) -> None:
        for i in range(0, len(items), self.chunk):
            chunk = items[i : i + self.chunk]
            if self._pool is None:
                fut = _Inline(self.fn, chunk)
            else:
                try:
                    fut = self._pool.submit(_run_chunk, self.fn, chunk)
                except BrokenProcessPool:
                    self._died(chunk)
            self._pending.append((fut, chunk))
            self._in_flight += len(chunk)

    def _died(self, chunk):
        """Stop the pool and raise the error that names the dead worker(s) and what was being read."""
        dead = [p for p in self._procs if p.exitcode is not None]
        if any(p.exitcode != -signal.SIGTERM for p in dead):  # the pool SIGTERMs the others when one dies
            dead = [p for p in dead if p.exitcode != -signal.SIGTERM]
        dead = [f"pid {p.pid} ({_how(p.exitcode)})" for p in dead]
        self.close()
        raise WorkerError(
            f"loader worker process {', '.join(dead) or ''} died while reading {_names(chunk)}; "
            "the run stops (if it was out of memory, lower DATASET.num_workers)".replace("  ", " ")
        )

    def next(self):
        """(item, (status, value)) of the oldest submitted item."""
        if not self._ready:
            if not self._pending:
                raise LookupError("ParallelMap.next: nothing submitted")
            fut, chunk = self._pending.popleft()
            self._note(_paths(chunk))  # before the wait: a rank stopped or stuck in it is named with these
            if self._pool is not None and any(p.exitcode is not None for p in self._procs):
                self._died(chunk)  # checked here too: the pool notices a death only when it has no result to hand
            try:
                results = fut.result(timeout=self.timeout)
            except BrokenProcessPool:
                self._died(chunk)
            except FutureTimeout:
                self.close()
                raise WorkerTimeout(
                    f"rank {os.environ.get('PADDLE_TRAINER_ID') or 0}: "
                    f"a loader worker returned nothing for {self.timeout:g} s while reading "
                    f"{_names(chunk, limit=len(chunk))}; one of them or the filesystem hangs. The workers were "
                    f"stopped ({self._slow_hint})"
                ) from None
            self._ready.extend(zip(chunk, results))
        self._in_flight -= 1
        return self._ready.popleft()

    def drop(self) -> None:
        """Forget everything in flight (an epoch ended early); running chunks finish unseen."""
        for fut, _ in self._pending:
            fut.cancel()
        self._pending.clear()
        self._ready.clear()
        self._in_flight = 0

    def close(self) -> None:
        if self._pool is not None:
            self._finalizer()
            self._pool = None


def _paths(chunk) -> list[str]:
    return [arg.path for item in chunk for arg in item if isinstance(arg, Sample)]


def _names(chunk, limit: int = 3) -> str:
    paths = _paths(chunk)
    return ", ".join(paths[:limit]) + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "") or "samples"


def _how(exitcode: int) -> str:
    if exitcode < 0:
        return f"killed by {signal.Signals(-exitcode).name}"
    return f"exit status {exitcode}"


def _kill_pool(pool: ProcessPoolExecutor, processes: list) -> None:
    for p in processes:
        if p.is_alive():
            p.kill()
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        p.join(timeout=5)
