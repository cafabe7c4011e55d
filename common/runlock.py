"""One run per output folder: a run holds an exclusive lock on a file beside or inside the folder
(``DST_DIR.lock`` for a conversion, ``OUTPUT_DIR/.run.lock`` for a training) while it writes there.

The lock is ``flock`` on an open file, so the kernel releases it when the process ends in any way
(``kill -9`` included): a crashed run never leaves it stuck. The file also records who holds it (pid,
host, start time, command, and run_dist.sh's job id), so a second run can say which run it met.
``flock`` is reliable on local file systems; on NFS it depends on the server's lock support.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time

from common.files import OutputError, check_writable

LOCK_NAME = ".run.lock"  # inside a training's output_dir


RUN_ID_ENV = "TSN_RUN_ID"  # set by run_dist.sh for all attempts of one job (the launcher restarts them)


class BusyError(RuntimeError):
    """Another live run holds the folder; the message names it."""


class RunLock:
    """Hold the lock file ``path`` of ``folder`` from ``acquire()`` until ``release()`` or the end of the process.

    ``previous`` is what the last holder recorded (None for a folder never locked), read before this
    run overwrote it."""

    def __init__(self, folder: str, what: str, path: str | None = None):
        self.folder, self.what = folder, what
        self.path = path or os.path.join(folder, LOCK_NAME)
        self.previous: dict | None = None
        self._fd: int | None = None

    def acquire(self, shared: bool = False) -> RunLock:
        """Take the lock; ``shared``: alongside other shared holders (the shards of one conversion),
        excluding only an exclusive one. A shared holder leaves the record as it is."""
        check_writable(self.folder, "the output folder")
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise OutputError(f"cannot create the lock file {self.path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise BusyError(
                f"{self.folder} is in use by another {holder.get('what', 'run')} (pid {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}, started {holder.get('started', '?')}: {holder.get('command', '?')}); "
                "wait for it to finish or stop it, or choose another output folder"
            ) from None
        self.previous = _read(fd) or None
        if shared:
            self._fd = fd
            return self
        record = {
            "what": self.what,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv),
            "run_id": os.environ.get(RUN_ID_ENV, ""),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return data if isinstance(data, dict) else {}
    except ValueError:
        return {}
