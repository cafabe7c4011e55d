"""What a rank pays per chunk for noting the files its loader reads (common/exits.py ReadingNote).

    python benchmarks/reading_note_bench.py [--dir LOG_DIR] [--notes 2000] [--rounds 3]

Times --notes notes of 8 distinct paths each (one chunk of the feed: one note per 8 samples read by
workers, one per sample without workers), written into --dir (default: a temporary folder; give the
job's log folder to time its file system). Baseline, in the same run: the same note written as an
atomic file would be (a temporary file renamed over the note), which ext4 flushes on each rename.
Per round: microseconds of wall and of CPU per note; the best round of each counts.
Last line: `reading_note_speed_ratio: X` = rename per note / in-place note, wall.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from common import exits

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _renamed(path: str):
    def note(paths):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"rank": 1, "pid": os.getpid(), "files": paths, "time": time.time()}, f)
        os.replace(tmp, path)

    return note


def _time(note, chunks) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for chunk in chunks:
        note(chunk)
    return (time.perf_counter() - wall) / len(chunks) * 1e6, (time.process_time() - cpu) / len(chunks) * 1e6


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="folder the notes go to (default: a temporary one)")
    parser.add_argument("--notes", type=int, default=2000, help="notes per round (default 2000)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds; the best counts (default 3)")
    args = parser.parse_args(argv)
    directory = args.dir or tempfile.mkdtemp(prefix="reading_note_")
    os.makedirs(directory, exist_ok=True)
    os.environ[exits.EXIT_DIR_ENV], os.environ["PADDLE_TRAINER_ID"] = directory, "1"
    chunks = [[f"/data/train_pkl/clip_{i:06d}_{j}.pkl" for j in range(8)] for i in range(args.notes)]
    rows = {"in place (pwrite)": exits.ReadingNote(), "renamed file": _renamed(exits.reading_path(directory, 9))}
    best = {name: (float("inf"), float("inf")) for name in rows}
    for r in range(args.rounds):  # rounds alternate between the rows
        for name, note in rows.items():
            wall, cpu = _time(note, chunks)
            best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
            print(f"round {r + 1}: {name}: {wall:.1f} us wall, {cpu:.1f} us CPU per note")
    for name, (wall, cpu) in best.items():
        print(f"best: {name}: {wall:.1f} us wall, {cpu:.1f} us CPU per note")
    for name in ("reading.1.json", "reading.9.json"):
        os.remove(os.path.join(directory, name))
    if not args.dir:
        shutil.rmtree(directory)
    print(f"reading_note_speed_ratio: {best['renamed file'][0] / best['in place (pwrite)'][0]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
