"""Split a folder-per-class dataset of your own clips into stratified train/val/test video lists.

    python preprocessing/split_dataset.py MY_CLIPS data/mine --ratios 0.7 0.15 0.15 --seed 0 [--probe 8]

MY_CLIPS/<class>/<clip>.mp4 -> data/mine/label.txt ('index name', classes sorted) and
data/mine/{train,val,test}.list ('path label', or 'path num_frames label' with --probe N). Each class
is shuffled with the seed and cut by the ratios, so every split keeps the class balance; the same seed
gives the same split. Two ratios give train and val only.
"""

from __future__ import annotations

import argparse
import os
import sys

from common import log as logs
from common.usage import UsageError
from preprocessing.kinetics import class_name, write_label_file
from preprocessing.lists import (
    class_folders,
    class_index_for,
    count_frames,
    stratified_split,
    video_entries,
    videos_in,
    write_list,
)

SPLIT_NAMES = ("train", "val", "test")

log = logs.get_logger("preprocessing.split_dataset")  # by name: run by path, __name__ is "__main__"


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("root", help="dataset folder: ROOT/<class>/<clip>")
    p.add_argument("out_dir", help="folder for label.txt and the split lists")
    p.add_argument(
        "--ratios",
        type=float,
        nargs="+",
        default=[0.7, 0.15, 0.15],
        help="shares of train, val (and test) per class (default 0.7 0.15 0.15)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before the split (default 0)")
    p.add_argument("--probe", type=int, default=0, metavar="N", help="count frames with N processes")
    args = p.parse_args(argv)
    try:
        if not 2 <= len(args.ratios) <= 3:
            raise UsageError("give two (train val) or three (train val test) --ratios")
        if args.probe < 0:
            raise UsageError(f"--probe takes a number of processes >= 0, got {args.probe}")
        folders = class_folders(args.root)
        index = class_index_for(folders, None)
        by_class = {f: videos_in(os.path.join(args.root, f)) for f in folders}
        empty = [f for f, v in by_class.items() if not v]
        if empty:
            raise UsageError(f"class folder(s) {empty[:5]} hold no videos")
        splits = stratified_split(by_class, args.ratios, args.seed)
    except UsageError as e:
        log.error(f"split_dataset: error: {e}")
        return 2
    counts, bad = count_frames([v for vs in by_class.values() for v in vs], args.probe)
    os.makedirs(args.out_dir, exist_ok=True)
    write_label_file(os.path.join(args.out_dir, "label.txt"), sorted(class_name(f) for f in folders))
    report = []
    for name, split in zip(SPLIT_NAMES, splits):
        entries = video_entries([(v, index[c]) for c in sorted(split) for v in split[c]], counts)
        write_list(os.path.join(args.out_dir, f"{name}.list"), entries)
        report.append(f"{name} {len(entries)}")
    for path, why in bad:
        log.warning(f"split_dataset: skipped {path}: {why}")
    log.info(f"split_dataset: {len(folders)} classes; " + ", ".join(report) + f" clips -> {args.out_dir}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
