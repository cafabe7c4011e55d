"""Worker processes: a fork context safe for native libraries, children that die with their parent,
and ``ParallelMap``, which runs a function over a stream of items in worker processes and hands the
results back in order, so what the caller sees never depends on the number of workers or their timing.
A worker that dies or hangs stops the pool with an error naming what it was reading."""

from __future__ import annotations

import collections
import os
import signal
import weakref
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool

from common import exits
from common.lifeline import die_with_parent


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


def fork_context():
    """The "fork" multiprocessing context, after freeing the garbage waiting in reference cycles: native
    objects in it (PyAV frames, whose side data refers back to them) would otherwise be freed in a child,
    which then hangs on thread state that only the parent has. Every worker pool forks through this."""
    import gc
    import multiprocessing

    gc.collect()
    return multiprocessing.get_context("fork")


def default_num_workers() -> int:
    """A share of this host's cores per local rank, less one for the training process itself."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("PADDLE_LOCAL_SIZE") or 1))
    return max(1, cores // local_ranks - 1)


def worker_init() -> None:
    """A pool worker's start: Ctrl-C is for the parent to handle, SIGTERM ends it, and so does the parent's death."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the training process decides and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not a handler the training process may have set
    die_with_parent()


def _run_chunk(fn, chunk, skip: tuple = (), fatal: tuple = ()):
    """Worker: ``fn`` on each item; an exception in ``skip`` (an unreadable file) is an ("error", message)
    result, not a failure of the chunk, and one in ``fatal`` is ("fatal", message): the run must stop."""
    out = []
    for args in chunk:
        try:
            out.append(("ok", fn(*args)))
        except fatal as e:
            out.append(("fatal", str(e)))
        except skip as e:
            out.append(("error", str(e)))
    return out


class _Inline:
    """A chunk computed when its result is asked for (``num_workers=0``: everything in this process)."""

    def __init__(self, fn, chunk, skip, fatal):
        self._fn, self._chunk, self._skip, self._fatal = fn, chunk, skip, fatal

    def result(self, timeout=None):
        return _run_chunk(self._fn, self._chunk, self._skip, self._fatal)

    def cancel(self):
        return True


class ParallelMap:
    """``fn(*item)`` over a stream of items in ``num_workers`` processes (0: in this one), at most
    ``ahead`` items in flight, results in submission order.

    A worker that dies (killed, out of memory) or returns nothing for ``timeout`` seconds raises
    WorkerError naming what it was reading; the pool is then killed, so nothing is left behind. Under
    run_dist.sh the files of the chunk it waits for are noted for the job's report (common/exits.py
    ReadingNote): a rank stopped or stuck later is named with them."""

    def __init__(
        self, fn, num_workers: int, ahead: int, timeout: float, chunk: int = 8, *, skip: tuple = (), fatal: tuple = ()
    ):
        self.fn, self.num_workers = fn, num_workers
        self._skip, self._fatal = skip, fatal  # exceptions that are a result ("error", "fatal"), not a failure
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
            self._pool = ProcessPoolExecutor(num_workers, mp_context=fork_context(), initializer=worker_init)
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
                fut = _Inline(self.fn, chunk, self._skip, self._fatal)
            else:
                try:
                    fut = self._pool.submit(_run_chunk, self.fn, chunk, self._skip, self._fatal)
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
    """The files a chunk reads: the ``path`` of each argument that has one (a list entry)."""
    return [arg.path for item in chunk for arg in item if isinstance(getattr(arg, "path", None), str)]


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
