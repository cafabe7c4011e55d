"""No process of a job outlives the one that started it (docs/robustness.md "Processes and ranks").

Paddle's launcher starts every rank in a session of its own, so a ``kill -9`` of the launcher, or of
run_dist.sh above it, reaches no rank: they are reparented to PID 1 and train on, holding the run lock.
Each link of the chain run_dist.sh -> launcher -> rank -> feed worker asks Linux to SIGKILL it when
its parent dies (``PR_SET_PDEATHSIG``), and checks that its parent is still the process that started
it (a parent that died before the request was made is otherwise missed). The parent's pid travels in
``TSN_PARENT_PID``: each link sets it to its own pid for the next one.

Stdlib only: the launcher and the rendezvous helper import it before anything heavy.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PARENT_PID_ENV = "TSN_PARENT_PID"
_PR_SET_PDEATHSIG = 1
# looked up once, at import: a child forked from a process with threads (a rank's rendezvous watchdog)
# must not dlopen or dlsym, whose lock another thread may have held at the fork
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
if _libc is not None:
    _libc.prctl  # noqa: B018 - ctypes keeps the looked-up function on the library object


def die_with_parent(expected_parent: int | str | None = None, sig: int = signal.SIGKILL) -> bool:
    """Have ``sig`` sent to this process when its parent (thread) ends; if ``expected_parent`` is given
    and is no longer the parent, the parent has already died: send ``sig`` now. Returns whether the
    kernel took the request (False off Linux, where only the check is made)."""
    armed = _libc is not None and _libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    if expected_parent not in (None, "") and os.getppid() != int(expected_parent):
        os.kill(os.getpid(), sig)
    return armed


def hand_on() -> None:
    """This process is the parent the next link checks for (children started from here inherit it)."""
    os.environ[PARENT_PID_ENV] = str(os.getpid())


def link(required: bool = False, sig: int = signal.SIGKILL) -> bool:
    """One link of the chain: die with the parent named in TSN_PARENT_PID, or, when it is unset and
    ``required``, with whatever parent this process has (a rank under mpirun or srun); then name this
    process for the children. Unset and not required (a command typed by hand): only the naming."""
    expected = os.environ.get(PARENT_PID_ENV)
    if expected == str(os.getpid()):  # this process named itself before (main() called twice in one process)
        expected = None
    armed = die_with_parent(expected, sig) if expected or required else False
    hand_on()
    return armed
