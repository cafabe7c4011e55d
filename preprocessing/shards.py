"""One data set converted by N hosts (or a Slurm array) at once: ``--shard I/N`` and the merge step.

A shard takes the CSV rows (or the listed files) at positions I-1, I-1+N, I-1+2N, ... in the input's
own order: deterministic, balanced to within one item, and independent of the machine and of what the
destination already holds. A clip listed twice belongs to the shard of its first row, so the shard
that converts it also reports the duplicate. Each shard writes its part of the list and of the
failures into ``LIST.shard-I-of-N.json`` (atomically, also when it is interrupted, saying so);
``merge_shards.py LIST N`` writes LIST and its failures file exactly as one unsharded run would, once
every part is there and complete, and names the shards that are missing, unfinished or still running.

Locks: an unsharded run (and the merge, given --dst-dir) holds ``DST.lock`` exclusively; a shard
holds it shared and its own ``DST.shard-I-of-N.lock`` exclusively, so shards of one split run side by
side while a second copy of a shard, a shard of another split, or an unsharded run into the same
destination is refused. docs/design.md "Sharded preprocessing".
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import json
import os
import re
from dataclasses import dataclass

from common import log as logs
from common.files import OutputError, write_atomic
from common.runlock import BusyError, RunLock
from common.usage import UsageError

PART_FORMAT = 1

log = logs.get_logger(__name__)


@dataclass(frozen=True)
class Shard:
    index: int  # 1..count
    count: int

    @property
    def suffix(self) -> str:
        return f".shard-{self.index}-of-{self.count}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"

    def owns(self, position: int) -> bool:
        """Whether the item at ``position`` (0-based, in the input's order) is this shard's."""
        return position % self.count == self.index - 1


def parse_shard(text: str | None) -> Shard | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise UsageError(
            f"--shard takes I/N with 1 <= I <= N (this host's part of N), got {text!r}; "
            "e.g. --shard 1/4 ... --shard 4/4, or in a Slurm array --shard $SLURM_ARRAY_TASK_ID/N (ids 1..N)"
        )
    return Shard(int(m.group(1)), int(m.group(2)))


def clips_of(shard: Shard | None, clips, bad):
    """The CSV clips and malformed rows (``kinetics.read_csv``'s) of ``shard``: by the position of the
    row (of a clip's first row, for a clip listed twice) among the CSV's data rows."""
    if shard is None:
        return clips, bad
    rows = sorted({c.row for c in clips} | {_row_of(where) for where, _ in bad})
    position = {row: i for i, row in enumerate(rows)}
    first = {}
    for c in clips:
        first.setdefault(c.video_id, c.row)
    return (
        [c for c in clips if shard.owns(position[first[c.video_id]])],
        [b for b in bad if shard.owns(position[_row_of(b[0])])],
    )


def _row_of(where: str) -> int:
    return int(where.rsplit(":", 1)[1])  # "file.csv:ROW"


def items_of(shard: Shard | None, items: list) -> list:
    """The items (in the input's order) of ``shard``."""
    return items if shard is None else [x for i, x in enumerate(items) if shard.owns(i)]


# ---------------------------------------------------------------- locks


def lock(dst: str, what: str, shard: Shard | None) -> list[RunLock]:
    """The locks of a run into ``dst`` (see the module's docstring); raises BusyError naming who holds them."""
    if shard is None:
        try:
            return [RunLock(dst, what, dst + ".lock").acquire()]
        except BusyError:
            running = running_shards(dst)
            if running:
                raise BusyError(f"{dst} is in use by {running}; wait for the shards to end, then merge them") from None
            raise
    common = RunLock(dst, what, dst + ".lock").acquire(shared=True)
    try:
        own = RunLock(dst, f"{what} shard {shard}", dst + shard.suffix + ".lock").acquire()
    except BusyError:
        common.release()
        raise
    # looked at once this shard's lock is held: of two splits starting together, both see the other
    # and stop, rather than both going on
    others = [s for s in _held_shards(dst) if s.count != shard.count]
    if others:
        running = running_shards(dst, besides=shard)
        own.release()
        common.release()
        raise BusyError(
            f"{dst} is being converted in {others[0].count} shards ({running}); "
            f"--shard {shard} splits it in {shard.count}: use the same N for every shard"
        )
    return [common, own]


def _held_shards(dst: str) -> list[Shard]:
    held = []
    for path in glob.glob(glob.escape(dst) + ".shard-*-of-*.lock"):
        m = re.search(r"\.shard-(\d+)-of-(\d+)\.lock$", path)
        if m and _is_held(path):
            held.append(Shard(int(m.group(1)), int(m.group(2))))
    return sorted(held, key=lambda s: (s.count, s.index))


def _is_held(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def running_shards(dst: str, besides: Shard | None = None) -> str:
    """'shards 1/4, 3/4 (pids ...)' of the shard runs (``besides`` this one) holding ``dst`` now ('' when none)."""
    held = [s for s in _held_shards(dst) if s != besides]
    if not held:
        return ""
    pids = []
    for s in held:
        try:
            with open(dst + s.suffix + ".lock", encoding="utf-8") as f:
                record = json.load(f)
            pids.append(f"{record.get('pid', '?')} on {record.get('host', '?')}")
        except (OSError, ValueError):
            pids.append("?")
    return f"shard{'s' * (len(held) > 1)} {', '.join(map(str, held))} (pid {'; '.join(pids)})"


# ---------------------------------------------------------------- parts and the merge


def part_path(list_file: str, shard: Shard) -> str:
    return os.path.abspath(list_file) + shard.suffix + ".json"


def remove_part(list_file: str, shard: Shard) -> None:
    try:
        os.unlink(part_path(list_file, shard))
    except FileNotFoundError:
        pass


def write_part(
    list_file: str,
    shard: Shard,
    *,
    tool: str,
    source: str,
    lines: list[tuple[str, str]],
    failures_file: str | None = None,
    failures: list[tuple[str, str]] = (),
    complete: bool,
) -> str:
    """Write this shard's part: ``lines`` and ``failures`` are (sort key, line); the merge orders them
    by key, as one unsharded run orders its list and failures file."""
    path = part_path(list_file, shard)
    part = {
        "format": PART_FORMAT,
        "tool": tool,
        "source": source,
        "shard": [shard.index, shard.count],
        "complete": complete,
        "list": os.path.abspath(list_file),
        "failures_file": os.path.abspath(failures_file) if failures_file else None,
        "lines": sorted(lines),
        "failures": sorted(failures),
    }
    write_atomic(path, json.dumps(part).encode())
    return path


def merge(list_file: str, count: int) -> tuple[int, list[str], str | None]:
    """Write LIST (and its failures file) from the N parts; (lines, failure lines, the failures file
    or None). Raises UsageError naming every shard that is missing, unfinished or from another run."""
    list_file = os.path.abspath(list_file)
    parts = _finished_parts(list_file, count)
    runs = {}
    for p in parts:
        run = f"{p['tool']} {p['source']} -> list {p['list']}, failures {p['failures_file']}"
        runs.setdefault(run, []).append(p["shard"][0])
    if len(runs) > 1:
        raise UsageError(
            f"cannot merge {count} shards into {list_file}: the parts come from different runs (run them "
            "again with the same arguments): " + "; ".join(f"{_shards(ids, count)}: {run}" for run, ids in runs.items())
        )
    lines = sorted(tuple(x) for p in parts for x in p["lines"])
    failures = [line for _, line in sorted(tuple(x) for p in parts for x in p["failures"])]
    failures_file = parts[0]["failures_file"]
    write_atomic(list_file, "".join(line + "\n" for _, line in lines).encode())
    if failures_file:
        write_atomic(failures_file, "".join(line + "\n" for line in failures).encode())
    return len(lines), failures, failures_file


def _finished_parts(list_file: str, count: int) -> list[dict]:
    """The N parts of LIST, each complete; else UsageError naming every shard to run again and why."""
    parts, missing, unfinished, problems, redo = [], [], [], [], []
    for i in range(1, count + 1):
        shard = Shard(i, count)
        path = part_path(list_file, shard)
        try:
            with open(path, encoding="utf-8") as f:
                part = json.load(f)
        except FileNotFoundError:
            missing.append(i)
            continue
        except (OSError, ValueError) as e:
            problems.append(f"shard {shard}: {path} is unreadable ({e})")
            redo.append(i)
            continue
        if not isinstance(part, dict) or part.get("format") != PART_FORMAT or part.get("shard") != [i, count]:
            problems.append(f"shard {shard}: {path} is not a part of a {count}-way split")
            redo.append(i)
        elif not part.get("complete"):
            unfinished.append(i)
        else:
            parts.append(part)
    if missing:
        problems.insert(
            0,
            f"{_shards(missing, count)} no part yet (not run, still running, or killed: no "
            f"{os.path.basename(list_file)}.shard-I-of-{count}.json)",
        )
    if unfinished:
        problems.insert(
            bool(missing), f"{_shards(unfinished, count, 'is', 'are')} unfinished (interrupted or out of space)"
        )
    if problems:
        ids = ",".join(map(str, sorted(redo + missing + unfinished)))
        raise UsageError(
            f"cannot merge {count} shards into {list_file}: {'; '.join(problems)}; when no shard runs any more, "
            f"run shard(s) {ids} of {count} again (a Slurm array: --array={ids})"
        )
    return parts


def _shards(ids: list[int], count: int, one: str = "has", several: str = "have") -> str:
    """'shard 3 of 16 has' / 'shards 3,4,7 of 16 have'."""
    if len(ids) == 1:
        return f"shard {ids[0]} of {count} {one}"
    return f"shards {','.join(map(str, ids))} of {count} {several}"


def merge_main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        prog="merge_shards",
        description="Assemble the list (and failures file) of a data set converted or listed in N shards.",
    )
    p.add_argument("list", help="the list file the shards were run for (their --list-out / list argument)")
    p.add_argument("shards", type=int, help="N, the number of shards")
    p.add_argument(
        "--dst-dir",
        help="the conversion's DST_DIR: refuse while a shard or another run writes it (locked while merging)",
    )
    args = p.parse_args(argv)
    held = []
    try:
        if args.shards < 1:
            raise UsageError(f"N must be >= 1, got {args.shards}")
        if args.dst_dir:
            if not os.path.isdir(args.dst_dir):
                raise UsageError(f"--dst-dir {args.dst_dir} is not a folder")
            # held while merging: no shard, no unsharded run into DST_DIR and no other merge meanwhile
            held = lock(os.path.abspath(args.dst_dir), "merge_shards", None)
        n_lines, failures, failures_file = merge(args.list, args.shards)
    except (UsageError, BusyError, OutputError) as e:
        log.error(f"merge_shards: error: {e}")
        return 2
    except OSError as e:
        log.error(f"merge_shards: error: cannot write {e.filename or args.list} ({e.strerror})")
        return 2
    finally:
        for lock_ in held:
            lock_.release()
    if not failures_file:  # a list builder's: named here, as the unsharded run names them
        for line in failures:
            log.warning(f"merge_shards: skipped {line}")
    log.info(
        f"merge_shards: {args.shards} shards -> {args.list} ({n_lines} lines), {len(failures)} failure(s)"
        + (f" in {failures_file}" if failures_file and failures else "")
    )
    return 1 if failures else 0
