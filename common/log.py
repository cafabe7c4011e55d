"""Messages through `logging`, one logger per module (``log = get_logger(__name__)``), set up once by
each entry point (``setup(rank=...)``).

A message keeps the text and the stream its print had: below WARNING on stdout, WARNING and above on
stderr, formatted "%(message)s", as operators, tests and run_dist.sh's launcher read them. Every
record carries the process's rank (``%(rank)s``: PADDLE_TRAINER_ID unless ``setup`` is told), so
TSN_LOG_FORMAT can ask for another format, e.g. "%(asctime)s rank %(rank)s %(name)s: %(message)s".
Under run_dist.sh (TSN_EXIT_DIR set) each rank also keeps its warnings and errors as JSON lines in
``events.R.jsonl`` next to its exit record: what ``python -m common.exits notes`` shows when the
ranks left no exit record (common/exits.py), instead of a search of the logs for known words.

Stdlib only, like common/exits.py: the launcher and run_dist.sh's helpers use it without Paddle.
"""

from __future__ import annotations

import json
import logging
import os
import sys

from common import exits

# the project's packages: their loggers get the handlers; "__main__" is a script run by path
PACKAGES = ("common", "clipdata", "dali_pipelines", "preprocessing", "trainer", "launch", "tools", "benchmarks")
FORMAT_ENV = "TSN_LOG_FORMAT"
DEFAULT_FORMAT = "%(message)s"

_configured = False


class _Console(logging.Handler):
    """stdout below WARNING, stderr from WARNING up, each looked up when a message is written (so that a
    redirected sys.stdout, pytest's capture included, gets the message), flushed at once like print(...,
    flush=True): a rank killed next must not lose what it said."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 - logging's own policy: a failed message never ends the run
            self.handleError(record)


class _Events(logging.Handler):
    """WARNING and above as one JSON line each, appended to ``path`` by one write (whole lines even from
    forked workers); a full or read-only log folder loses the notes, never the run."""

    def __init__(self, path: str):
        super().__init__(logging.WARNING)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        line = {
            "rank": getattr(record, "rank", exits.rank()),
            "pid": os.getpid(),
            "time": record.created,
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass


class _Rank(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = self.rank
        return True


def setup(rank: int | None = None, *, level: int = logging.INFO, fmt: str | None = None) -> None:
    """Give the project's loggers their handlers (again: a second call replaces the first's). ``rank``:
    this process's rank (default PADDLE_TRAINER_ID, else 0); ``fmt``: the format (default TSN_LOG_FORMAT,
    else the bare message)."""
    global _configured
    _configured = True
    rank = exits.rank() if rank is None else rank
    formatter = logging.Formatter(fmt or os.environ.get(FORMAT_ENV) or DEFAULT_FORMAT)
    handlers: list[logging.Handler] = [_Console()]
    directory = os.environ.get(exits.EXIT_DIR_ENV)
    if directory and os.path.isdir(directory):  # made by the launcher; a rank does not create it
        handlers.append(_Events(exits.events_path(directory, rank)))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(_Rank(rank))
        handler._tsn = True  # ours, to replace on the next setup
    for name in (*PACKAGES, "__main__"):
        logger = logging.getLogger(name)
        for old in [h for h in logger.handlers if getattr(h, "_tsn", False)]:
            logger.removeHandler(old)
        for handler in handlers:
            logger.addHandler(handler)
        logger.setLevel(level)
        logger.propagate = False  # a handler a library puts on the root logger must not repeat ours


def get_logger(name: str) -> logging.Logger:
    """The logger of module ``name`` (``__name__``); the default set-up if no entry point made one yet
    (a module used from a test or another program still says what it says)."""
    if not _configured:
        setup()
    return logging.getLogger(name)
