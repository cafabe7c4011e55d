"""How each rank of a run_dist.sh job ended, which rank's end was the cause, and whether a restart can help.

    python -m common.exits report LOG_DIR     the cause first, then every rank; exit 0: a restart may
                                              help, 3: it cannot (config, data, usage, output), 1: no records
    python -m common.exits notes LOG_DIR      each rank's last warnings and errors (events.R.jsonl)
    python -m common.exits clear LOG_DIR      forget the records of an earlier attempt

Two structured sources, both in the job's log folder (docs/robustness.md "Processes and ranks"):
- ``exit.R.json``, written by rank R itself on the way out (trainer/main.py): its kind of error and
  its one-line message. A rank killed by a signal writes nothing.
- ``launcher.json``, written by the launcher (launch/paddle_launch.py), which watches its ranks: when
  each one ended as seen from outside (exit status or signal), and what the others were doing the
  moment the first one failed (a rank stopped by SIGSTOP or stuck in uninterruptible I/O is the rank
  the others waited for).
- ``reading.R.json``, kept by rank R's loader while it runs (dali_pipelines/feed.py): the files it
  reads now. A rank stopped or stuck can write nothing then, so the note is left beforehand, for the
  report to name the files with the rank.
- ``events.R.jsonl``, rank R's warnings and errors as it logged them (common/log.py): what
  run_dist.sh shows when no rank could write a record (the launcher itself was killed).
The cause is the rank that failed first on its own account; a rank that only failed because a peer
had gone (a collective that lost its peer or timed out, an abort from inside the communication
library, the launcher's stop) is reported, not blamed.

Stdlib only: run_dist.sh and the launcher use it without loading Paddle.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import weakref

EXIT_DIR_ENV = "TSN_EXIT_DIR"  # run_dist.sh sets it to the job's log folder

# kinds a rank reports; the first four are not crashes: the same run would fail the same way again
NOT_RESTARTABLE = ("config", "data", "usage", "output")
KINDS = (*NOT_RESTARTABLE, "crash", "stopped", "signal", "stuck")
# a rank that ends this long after the first failure was ended by the launcher's stop, not on its own
CONSEQUENCE_AFTER_S = 1.5
# ends that follow another rank's: the launcher's stop, or an abort inside the communication library
_SECONDARY_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGABRT, signal.SIGPIPE)
_COLLECTIVE_MARKS = ("gloo", "nccl", "TIMEOUT", "Connection closed by peer", "Connection reset by peer", "Broken pipe")


def is_collective_error(message: str) -> bool:
    """An error from the communication library: usually a peer that died or stopped answering."""
    return any(mark.lower() in message.lower() for mark in _COLLECTIVE_MARKS)


def rank() -> int:
    """This process's rank in the job (0 outside one)."""
    return int(os.environ.get("PADDLE_TRAINER_ID") or 0)


def record_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"exit.{rank}.json")


def write_record(kind: str, message: str, exit_code: int) -> None:
    """This rank's end, for the launcher's caller (nothing outside run_dist.sh: TSN_EXIT_DIR unset)."""
    directory = os.environ.get(EXIT_DIR_ENV)
    if not directory:
        return
    assert kind in KINDS, kind
    record = {
        "rank": rank(),
        "pid": os.getpid(),
        "kind": kind,
        "message": message.strip().splitlines()[-1] if message.strip() else "",
        "exit": exit_code,
        "time": time.time(),
    }
    if kind == "crash":
        record["collective"] = is_collective_error(message)
    try:
        os.makedirs(directory, exist_ok=True)
        tmp = record_path(directory, record["rank"]) + f".tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(record, f)
        os.replace(tmp, record_path(directory, record["rank"]))
    except OSError:  # a full or read-only log folder: the rank's own message still reaches its log
        pass


def record_bytes(kind: str, message: str, exit_code: int) -> tuple[str, bytes]:
    """(path, content) of a record prepared in advance, for a process that may only write bytes when the
    time comes (the rendezvous watchdog, a forked child). ("", b"") outside run_dist.sh."""
    directory = os.environ.get(EXIT_DIR_ENV)
    if not directory:
        return "", b""
    record = {"rank": rank(), "pid": os.getpid(), "kind": kind, "message": message.strip(), "exit": exit_code}
    return record_path(directory, record["rank"]), json.dumps(record).encode()


def events_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"events.{rank}.jsonl")


def reading_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"reading.{rank}.json")


class ReadingNote:
    """This rank's note of the files its loader reads now (``note(paths)``), for a report that finds the
    rank stopped or stuck: such a rank writes nothing more, so the note is kept while it still can.

    Written only when the files change, by one ``pwrite`` over the note in place, padded with spaces
    to the length of the one before: a stop cannot split a system call, so the note is always whole,
    and no file is created and renamed per note (ext4 flushes a file renamed over another: 1-1.4 ms a
    note, against 25 us; docs/robustness.md "Which rank was the cause, and whether to restart").
    No fsync: the report reads it on this host, from the page cache.
    Nothing outside run_dist.sh (TSN_EXIT_DIR unset), and nothing more after a write fails."""

    def __init__(self):
        directory = os.environ.get(EXIT_DIR_ENV)
        self._path = reading_path(directory, rank()) if directory else ""
        self._last: list[str] | None = None
        self._fd: int | None = None

    def __call__(self, paths: list[str]) -> None:
        if not self._path or not paths or paths == self._last:
            return
        self._last = paths
        note = json.dumps({"rank": rank(), "pid": os.getpid(), "files": paths, "time": time.time()}).encode()
        try:
            if self._fd is None:
                os.makedirs(os.path.dirname(self._path), exist_ok=True)
                self._fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
                weakref.finalize(self, os.close, self._fd)
            os.pwrite(self._fd, note.ljust(os.fstat(self._fd).st_size), 0)  # JSON allows trailing spaces
        except OSError:  # a full or read-only log folder: the run goes on without notes
            self._path = ""


def clear(directory: str) -> None:
    """Forget the records of an earlier attempt (run_dist.sh, before each start)."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if (
            (name.startswith("exit.") and name.endswith(".json"))
            or name == "launcher.json"
            or name.startswith("reading.")
            or name.startswith("events.")
        ):
            os.remove(os.path.join(directory, name))


class Watcher:
    """The launcher's view of its ranks: a thread that polls each rank's process every ``interval``
    seconds, notes when it ended and how, and, at the first failure, the state of every rank still
    running. ``processes``: a callable returning {rank: subprocess.Popen} of the ranks started so far."""

    def __init__(self, processes, interval: float = 0.05):
        self._processes, self._interval = processes, interval
        self.ends: dict[int, dict] = {}
        self.first_failure: float | None = None
        self.states: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tsn-rank-watcher", daemon=True)

    def start(self) -> Watcher:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(self._interval)

    def poll(self) -> None:
        now = time.time()
        procs = dict(self._processes())
        for rank, proc in procs.items():
            if rank in self.ends:
                continue
            code = proc.poll()
            if code is None:
                continue
            self.ends[rank] = {"pid": proc.pid, "exit": code, "time": now}
            if code != 0 and self.first_failure is None:
                self.first_failure = now
                for other, p in procs.items():  # what the others are doing while it fails
                    if other not in self.ends and p.poll() is None:
                        self.states[other] = _state(p.pid)

    def write(self, directory: str) -> None:
        self._stop.set()
        self.poll()
        report = {
            "first_failure": self.first_failure,
            "ranks": {str(r): {**e, "state": self.states.get(r)} for r, e in self.ends.items()},
            "states": {str(r): s for r, s in self.states.items()},
        }
        try:
            os.makedirs(directory, exist_ok=True)
            tmp = os.path.join(directory, f"launcher.json.tmp-{os.getpid()}")
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(report, f)
            os.replace(tmp, os.path.join(directory, "launcher.json"))
        except OSError:
            pass


def _state(pid: int) -> str:
    """The one-letter state of a process (R, S, D, T, Z...), "" if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _load(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ends(directory: str) -> list[dict]:
    """Every rank that failed or was caught stuck, merged from both sources; each: rank, pid, kind,
    message, time, exit, secondary (it failed because of another rank)."""
    launcher = _load(os.path.join(directory, "launcher.json")) or {"ranks": {}, "states": {}}
    records = {}
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        r = _load(os.path.join(directory, name)) if name.startswith("exit.") and name.endswith(".json") else None
        if r and "rank" in r:
            records[int(r["rank"])] = r
    first = launcher.get("first_failure")
    ranks = sorted({*records, *map(int, launcher["ranks"]), *map(int, launcher.get("states", {}))})
    found = (_end(directory, rank, launcher, records.get(rank), first) for rank in ranks)
    return [e for e in found if e is not None]


def _end(directory: str, rank: int, launcher: dict, record: dict | None, first: float | None) -> dict | None:
    """How ``rank`` ended (an entry of ``ends``) from the launcher's view and its own record; None when it
    neither failed nor was caught stuck."""
    seen = launcher["ranks"].get(str(rank), {})
    state = launcher.get("states", {}).get(str(rank))
    code = seen.get("exit", record.get("exit") if record else None)
    t = seen.get("time") or (record or {}).get("time") or float("inf")
    e = {"rank": rank, "pid": seen.get("pid") or (record or {}).get("pid"), "exit": code, "time": t}
    if state in ("T", "t", "D"):  # caught stopped or in uninterruptible I/O when the first rank failed
        what = (
            "stopped (SIGSTOP / SIGTSTP, or a debugger)"
            if state in ("T", "t")
            else "stuck in uninterruptible I/O (a hung file system or device)"
        )
        message = f"was {what} when the first rank failed; the others waited for it"
        e.update(kind="stuck", message=message + _reading(directory, rank, e["pid"], first))
        e.update(secondary=False, time=first or t)
        return e
    if record:  # the rank's own words
        secondary = record["kind"] == "stopped" or (record["kind"] == "crash" and record.get("collective", False))
        e.update(kind=record["kind"], message=record["message"], secondary=secondary)
        e["exit"] = record.get("exit") or code  # what it meant to exit with, not the launcher's stop after
    elif code is not None and code < 0:
        e.update(kind="signal", message=f"killed by {_signal_name(code)}")
        e["secondary"] = -code in _SECONDARY_SIGNALS or (first is not None and t - first > CONSEQUENCE_AFTER_S)
    elif code:
        log = os.path.join(directory, f"workerlog.{rank}")  # it died before it could say why: where it said what
        where = f" (its log: {log})" if os.path.isfile(log) else ""
        e.update(kind="crash", message=f"exit status {code} without a message of its own{where}", secondary=False)
    else:
        return None
    if first is not None and t - first > CONSEQUENCE_AFTER_S:
        e["secondary"] = True  # ended after the launcher began to stop the job
    return e


def _reading(directory: str, rank: int, pid: int | None, first: float | None, limit: int = 8) -> str:
    """ "; its loader was reading A, B (and N more)" from the rank's note, if the note is of this very
    process (pid) and older than the first failure (what it read then, not after); else ""."""
    note = _load(reading_path(directory, rank))
    if not note or not note.get("files") or (pid and note.get("pid") != pid):
        return ""
    if first is not None and note.get("time", 0) > first:
        return ""
    files = note["files"]
    more = f" (and {len(files) - limit} more)" if len(files) > limit else ""
    return f"; its loader was reading {', '.join(files[:limit])}{more}"


def cause(found: list[dict]) -> dict | None:
    """The end that started it: the first rank that failed on its own account; else a rank caught
    stuck (a rank passing through uninterruptible I/O as another fails on its own is not the cause);
    else the first rank that failed at all."""
    if not found:
        return None
    own = [e for e in found if not e["secondary"] and e["kind"] != "stuck"]
    stuck = [e for e in found if e["kind"] == "stuck"]
    if not own and stuck:
        return stuck[0]
    return min(own or found, key=lambda e: (e["time"], e["rank"]))


def exit_status(directory: str) -> int | None:
    """The job's exit status as its cause's: the rank's own (2: a config error), 128 + N for a rank
    killed by signal N; None without a cause (or for a stuck rank, which ended by the launcher's kill)."""
    first = cause(ends(directory))
    if first is None or first["kind"] == "stuck" or not first.get("exit"):
        return None
    return first["exit"] if first["exit"] > 0 else 128 - first["exit"]


def describe(e: dict) -> str:
    pid = f" (pid {e['pid']})" if e.get("pid") else ""
    return f"rank {e['rank']}{pid}: {e['kind']}: {e['message']}"


def report(directory: str, out=sys.stdout) -> int:
    found = ends(directory)
    first = cause(found)
    if first is None:
        print("no rank left a record of how it ended (the launcher itself was killed?)", file=out)
        return 1
    print(describe(first), file=out)
    for e in sorted(found, key=lambda e: (e["time"], e["rank"])):
        if e is not first:
            print(f"  then {describe(e)}", file=out)
    if first["kind"] in NOT_RESTARTABLE:
        print(f"  a {first['kind']} error is not a crash: a restart would fail the same way", file=out)
        return 3
    return 0


def notes(directory: str, out=sys.stdout, limit: int = 5) -> int:
    """Each rank's last ``limit`` warnings and errors (events.R.jsonl), under the name of its log: what
    the ranks said when none could say how it ended. Exit 1 when no rank noted anything."""
    found = 0
    names = os.listdir(directory) if os.path.isdir(directory) else []
    ranks = sorted(int(n.split(".")[1]) for n in names if n.startswith("events.") and n.split(".")[1].isdigit())
    for r in ranks:
        lines = _event_messages(events_path(directory, r))
        messages = [m for line in lines[-limit:] for m in line.splitlines()][-limit:]
        if messages:
            found += 1
            log = os.path.join(directory, f"workerlog.{r}")
            print(f"  rank {r} ({log if os.path.isfile(log) else events_path(directory, r)}):", file=out)
            for m in messages:
                print(f"    {m}", file=out)
    return 0 if found else 1


def _event_messages(path: str) -> list[str]:
    """The messages of an events.R.jsonl, in order; [] when it cannot be read."""
    lines = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    lines.append(str(json.loads(line)["message"]))
                except (ValueError, KeyError, TypeError):  # a line cut by a full disk
                    continue
    except OSError:
        return []
    return lines


def main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n")[1],
    )
    p.add_argument(
        "action",
        choices=("report", "notes", "clear"),
        help="report: the cause and every rank's end (exit 0 a restart may help, 3 it cannot, 1 no record); "
        "notes: each rank's last warnings and errors; clear: remove the records of an earlier attempt",
    )
    p.add_argument("log_dir", metavar="LOG_DIR", help="the job's log folder (run_dist.sh's LOG_DIR, TSN_EXIT_DIR)")
    args = p.parse_args(argv)
    if args.action == "report":
        return report(args.log_dir)
    if args.action == "notes":
        return notes(args.log_dir)
    clear(args.log_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
