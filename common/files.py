"""Files written so that a reader never sees half of one, and output folders checked before work."""

from __future__ import annotations

import errno
import os
import tempfile


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_atomic(path: str, data: bytes, mtime_ns: int | None = None) -> None:
    """Write ``data`` under a temporary name, then rename it over ``path``: a reader sees the old file or
    the whole new one. The file gets the permissions an ordinary open() would give it (mkstemp's are
    0600, which would hide a dataset from the other accounts of a cluster), and ``mtime_ns`` as its
    modification time when given (before the rename: the file never shows another)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class OutputError(RuntimeError):
    """An output location cannot be written (read-only, no permission, disk full); found before the work."""


NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # a full disk, a full quota, a file size limit


def check_writable(folder: str, what: str) -> None:
    """Create ``folder`` if needed and write and remove a file in it, or raise OutputError naming it."""
    probe = os.path.join(folder, f".tmp-write-test-{os.getpid()}")  # a conversion clears stale .tmp-*
    try:
        os.makedirs(folder, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0")
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"{what} {folder} is not writable ({e.strerror})") from None
