"""Write the list file of a converted or raw dataset (docs/design.md "Data formats"), one builder per source type.

    python preprocessing/build_list.py pkl       DST_DIR  train_pkl.list [--index 8]
    python preprocessing/build_list.py rawframes FRAMES   train_frames.list --csv k400_train.csv --label-file labels.txt
    python preprocessing/build_list.py videos    VIDEOS   train_videos.list [--label-file labels.txt] [--probe 8]

pkl: every *.pkl below DST_DIR (the label is inside each pkl). --index N gives pkl files made
    elsewhere (or before the index existed) the frame index that lets the loader read only the sampled
    frames, with N processes, in place: resumable, and files already indexed are left as they are (a
    file changed since its index was made gets a new one; docs/design.md "The pkl frame index").
rawframes: every folder holding img_00001.jpg; the label comes from --csv (Kinetics flat layout, by
    video id) or from the class folder above it (FRAMES/<class>/<clip>/img_*.jpg).
videos: every video in FRAMES/<class>/; --probe N decodes each video once with N processes and writes
    'path num_frames label' lines (otherwise 'path label', and the loader probes at start-up).
Class folders are mapped to indices through --label-file, or sorted when it is not given.
Paths are written relative to the list file.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import log as logs
from common.usage import UsageError
from preprocessing import shards
from preprocessing.kinetics import load_class_index, read_csv
from preprocessing.lists import (
    class_folders,
    class_index_for,
    count_frames,
    index_pkls,
    list_lines,
    video_entries,
    videos_in,
    write_list,
)

log = logs.get_logger("preprocessing.build_list")  # by name: run by path, __name__ is "__main__"


def pkl_entries(root: str):
    found = []
    for folder, _, files in os.walk(root):
        found += [(os.path.join(folder, f), None, None) for f in files if f.endswith(".pkl") and not f.startswith(".")]
    return sorted(found)


def rawframe_entries(root: str, csv: str | None, label_file: str | None):
    dirs = sorted(
        folder
        for folder, _, files in os.walk(root)
        if "img_00001.jpg" in files and not os.path.basename(folder).startswith(".")
    )
    if csv:
        clips, _ = read_csv(csv)
        index = (
            load_class_index(label_file)
            if label_file
            else {n: i for i, n in enumerate(sorted({c.label for c in clips}))}
        )
        label_of = {c.video_id: index[c.label] for c in clips if c.label in index}
        missing = [d for d in dirs if os.path.basename(d) not in label_of]
        if missing:
            raise UsageError(f"{len(missing)} frame folder(s), e.g. {missing[0]}, have no row in {csv}")
        labels = {d: label_of[os.path.basename(d)] for d in dirs}
    else:
        index = class_index_for(class_folders(root), label_file)
        labels = {}
        for d in dirs:
            cls = os.path.relpath(d, root).split(os.sep)[0]
            if cls not in index:
                raise UsageError(f"{d} is not inside a class folder of {root}; pass --csv for a flat layout")
            labels[d] = index[cls]
    return [(d, sum(1 for f in os.listdir(d) if f.startswith("img_")), labels[d]) for d in dirs]


def class_video_entries(root: str, label_file: str | None, probe: int, shard=None):
    """(positions, entries, unreadable) of the videos in class folders (of ``shard``'s positions)."""
    index = class_index_for(class_folders(root), label_file)
    videos = [(v, index[c]) for c in index for v in videos_in(os.path.join(root, c))]
    if not videos:  # also for a shard: its own share may be empty, the whole folder may not
        raise UsageError(f"found no videos under {root}")
    positions = shards.items_of(shard, list(range(len(videos))))
    videos = [videos[i] for i in positions]
    counts, bad = count_frames([v for v, _ in videos], probe)
    entries = video_entries(videos, counts)
    kept = {e[0] for e in entries}
    return [i for i, (v, _) in zip(positions, videos) if v in kept], entries, bad


def _settings(args) -> str:
    """What makes two runs' lists differ: the shards of one list must agree on it."""
    labels = os.path.abspath(args.label_file) if args.label_file else "sorted class folders"
    csv = os.path.abspath(args.csv) if args.csv else None
    return f"labels {labels}, csv {csv}, frame counts {'probed' if args.probe else 'not listed'}"


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source",
        choices=("pkl", "rawframes", "videos"),
        help="what DIR holds: pkl files, rawframe folders or video files (see the usage lines above)",
    )
    p.add_argument("root", help="folder to scan")
    p.add_argument("out", help="list file to write")
    p.add_argument("--label-file", help="'index name' lines mapping class names to indices")
    p.add_argument("--csv", help="rawframes: Kinetics CSV giving each clip's label (flat layouts)")
    p.add_argument(
        "--probe",
        type=int,
        default=0,
        metavar="N",
        help="videos: count frames with N processes and write them into the list",
    )
    p.add_argument(
        "--index",
        type=int,
        default=0,
        metavar="N",
        help="pkl: give each pkl its frame index (in place) with N processes",
    )
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="list (and probe or index) only this host's part I of N; then merge_shards.py OUT N",
    )
    args = p.parse_args(argv)
    try:
        shard = shards.parse_shard(args.shard)
        if args.probe < 0 or args.index < 0:
            raise UsageError("--probe and --index take a number of processes >= 0")
        if args.index and args.source != "pkl":
            raise UsageError("--index applies to pkl lists only")
        if shard:  # until this run writes it anew, the merge must not take an earlier run's part for it
            shards.remove_part(args.out, shard)
        positions, entries, bad, note = _scan(args, shard)
        if not entries and shard is None:
            raise UsageError(f"found no {args.source} under {args.root}")
    except UsageError as e:
        log.error(f"build_list: error: {e}")
        return 2
    if shard:
        note += _write_part(args, shard, positions, entries, bad)
    else:
        write_list(args.out, entries)
    for path, why in bad:
        log.warning(f"build_list: skipped {path}: {why}")
    log.info(
        f"build_list: {len(entries)} {args.source} entries -> {args.out}{note}"
        + (f"; {len(bad)} unreadable {'files' if args.source == 'pkl' else 'videos'} skipped" if bad else "")
    )
    return 1 if bad else 0


def _scan(args, shard) -> tuple[list[int], list, list, str]:
    """This shard's entries of ROOT with their positions in the whole list, the files skipped as
    unreadable, and a note on the frame index (pkl --index)."""
    if args.source == "videos":
        return (*class_video_entries(args.root, args.label_file, args.probe, shard), "")
    if args.source == "pkl":
        entries = pkl_entries(args.root)
    else:
        entries = rawframe_entries(args.root, args.csv, args.label_file)
    if not entries:  # also for a shard: its own share may be empty, the whole folder may not
        raise UsageError(f"found no {args.source} under {args.root}")
    positions = shards.items_of(shard, list(range(len(entries))))
    entries = [entries[i] for i in positions]
    if not (args.index and entries):
        return positions, entries, [], ""
    done, bad = index_pkls([e[0] for e in entries], args.index)
    failed = {path for path, _ in bad}
    positions = [i for i, e in zip(positions, entries) if e[0] not in failed]
    entries = [e for e in entries if e[0] not in failed]
    note = (
        f"; frame index: {done['appended']} appended, {done['rewritten']} rewritten, {done['indexed']} already indexed"
    )
    return positions, entries, bad, note


def _write_part(args, shard, positions, entries, bad) -> str:
    """This shard's part of the list; returns the note that names it and the merge to run."""
    lines = [(f"{i:012d}", line) for i, line in zip(positions, list_lines(args.out, entries))]  # merge order
    part = shards.write_part(
        args.out,
        shard,
        tool="build_list",
        source=f"{args.source} {os.path.abspath(args.root)} ({_settings(args)})",
        lines=lines,
        failures=[(path, f"{path}: {why}") for path, why in bad],  # the merge names them as one run does
        complete=True,
    )
    merge = f"python preprocessing/merge_shards.py {args.out} {shard.count}"
    return f"; part {shard} -> {part} (when every shard is done: {merge})"


if __name__ == "__main__":
    sys.exit(main())
