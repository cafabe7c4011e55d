"""Decode every video of a videos list once, so that no training trusts a video it has not seen whole.

    python preprocessing/check_videos.py train_videos.list --nproc 8 [--data-prefix DIR]

The loader decodes (probes) the videos whose list line gives no frame count. A line that gives a count
is trusted on the GPU path after a demux check only (NVDEC gets the file's bytes), so a video damaged
mid-way in a list made elsewhere would reach NVDEC. This decodes each video of LIST once with NPROC
processes and writes what it found, per version of each file (size, mtime), into LIST.probe.json, the
cache the loader reads: a damaged or unreadable video is then skipped, named and counted on every
path. A count in the list that the video does not reach is reported too, and so is a video whose frame
size changes mid-stream (the CPU path scales its frames to the first size; the GPU path skips it).
Files already checked and unchanged since are not decoded again, so an interrupted check resumes.
With --shard I/N each of N hosts decodes only its part of the list's videos (preprocessing/shards.py)
into the same LIST.probe.json; a last run without --shard then decodes only what no shard did (all of
it if every shard ended) and reports the whole list.
Exit status: 0 every video whole, 1 some unreadable, shorter than listed or changing size (named), 2 usage
error.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys

from clipdata.errors import DataFormatError
from clipdata.lists import read_list
from clipdata.video import load_probe_cache, resolution_change_message, save_probe_cache
from common import log as logs
from common.usage import UsageError
from preprocessing import shards
from preprocessing.lists import probe_facts

log = logs.get_logger("preprocessing.check_videos")  # by name: run by path, __name__ is "__main__"


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("list_file", help="a videos list ('path label' or 'path num_frames label' lines)")
    p.add_argument("--nproc", type=int, default=os.cpu_count(), help="decoding processes (default: all cores)")
    p.add_argument(
        "--data-prefix",
        help="folder relative paths in the list resolve against (DATASET.data_prefix; default: the list's folder)",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="decode only this host's part I of N of the videos; then run once more without --shard",
    )
    args = p.parse_args(argv)
    try:
        if args.nproc < 1:
            raise DataFormatError(f"--nproc must be >= 1, got {args.nproc}")
        shard = shards.parse_shard(args.shard)
        samples = read_list(args.list_file, "videos", args.data_prefix)
    except (DataFormatError, UsageError) as e:
        log.error(f"check_videos: error: {e}")
        return 2
    cache_file = f"{args.list_file}.probe.json"
    known = load_probe_cache(cache_file)
    paths = shards.items_of(shard, sorted({s.path for s in samples}))  # a shard's share of the videos
    todo = []
    for path in paths:
        st, f = os.stat(path), known.get(path)
        if f is None or not f.describes(st) or (f.packets is None and not f.error):
            todo.append(path)
    facts = {**known, **probe_facts(todo, args.nproc, "check")} if todo else known
    _save(cache_file, {p: facts[p] for p in todo})
    problems = []
    mine = set(paths)
    for s in samples:
        if s.path not in mine:
            continue
        f = facts[s.path]
        if f.error:
            problems.append(f"{args.list_file}:{s.line}: {f.error}")
        elif s.num_frames > f.frames:
            problems.append(
                f"{args.list_file}:{s.line}: the list says {s.num_frames} frames, {s.path} decodes "
                f"to {f.frames}; rebuild the list (build_list.py videos --probe N)"
            )
        elif f.size_change:
            problems.append(f"{args.list_file}:{s.line}: {resolution_change_message(s.path, f)}")
    for line in problems:
        log.warning(f"check_videos: {line}")
    log.info(
        f"check_videos: {f'shard {shard}: ' if shard else ''}{len(paths)} videos ({len(todo)} decoded now, "
        f"{len(paths) - len(todo)} unchanged since checked), {len(problems)} problem(s); verdicts in {cache_file}"
        + (f" (when every shard is done: python preprocessing/check_videos.py {args.list_file})" if shard else "")
    )
    return 1 if problems else 0


def _save(cache_file: str, facts: dict) -> None:
    """Merge ``facts`` into the cache; under a lock, so that shards ending together keep each other's."""
    try:
        fd = os.open(cache_file + ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a read-only folder: save_probe_cache gives up as quietly
        fd = None
    try:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        save_probe_cache(cache_file, facts)
    finally:
        if fd is not None:
            os.close(fd)


if __name__ == "__main__":
    sys.exit(main())
