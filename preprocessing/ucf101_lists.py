"""Turn UCF-101's official split files into list files and a label file.

    python preprocessing/ucf101_lists.py UCF-101 ucfTrainTestlist data/ucf101 --split 1 [--probe 8]

Reads classInd.txt ('1 ApplyEyeMakeup'), trainlist0N.txt ('ApplyEyeMakeup/v_..._c01.avi 1') and
testlist0N.txt ('ApplyEyeMakeup/v_..._c01.avi'); writes data/ucf101/ucf101_label.txt (0-based) and
ucf101_{train,test}_split_N_videos.list ('path label', or 'path num_frames label' with --probe N).
Videos named by the split files but missing under UCF-101/ are left out and reported (exit status 1).
"""

from __future__ import annotations

import argparse
import os
import sys

from clipdata.errors import DataFormatError
from clipdata.lists import text_lines
from common import log as logs
from common.usage import UsageError
from preprocessing.kinetics import write_label_file
from preprocessing.lists import count_frames, video_entries, write_list

log = logs.get_logger("preprocessing.ucf101_lists")  # by name: run by path, __name__ is "__main__"


def _lines(path: str) -> list[str]:
    try:
        return text_lines(path)
    except DataFormatError as e:
        raise UsageError(str(e)) from None


def read_class_ind(path: str) -> dict[str, int]:
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist; SPLITS_DIR must hold classInd.txt")
    index = {}
    for no, line in enumerate(_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()):
            raise UsageError(f"{path}:{no}: expected '<1-based index> <ClassName>', got {line.strip()!r}")
        index[parts[1]] = int(parts[0]) - 1
    if sorted(index.values()) != list(range(len(index))):
        raise UsageError(f"{path}: class indices must be 1..{len(index)} without gaps")
    return index


def read_split(path: str, index: dict[str, int]) -> list[tuple[str, int]]:
    """(relative video path, 0-based label); test lists carry no label, the class folder gives it."""
    if not os.path.isfile(path):
        raise UsageError(f"{path} does not exist")
    out = []
    for no, line in enumerate(_lines(path), 1):
        parts = line.split()
        if not parts:
            continue
        rel, cls = parts[0], parts[0].split("/")[0]
        if len(parts) > 2 or cls not in index:
            raise UsageError(
                f"{path}:{no}: expected '<Class>/<video>.avi [label]' with a class of "
                f"classInd.txt, got {line.strip()!r}"
            )
        if len(parts) == 2 and (not (parts[1].isascii() and parts[1].isdigit()) or int(parts[1]) - 1 != index[cls]):
            raise UsageError(f"{path}:{no}: label {parts[1]} disagrees with class {cls} in classInd.txt")
        out.append((rel, index[cls]))
    return out


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("ucf_dir", help="the UCF-101 video folder (UCF-101/<Class>/v_*.avi)")
    p.add_argument("splits_dir", help="the folder of classInd.txt, trainlist0N.txt, testlist0N.txt")
    p.add_argument("out_dir", help="folder for label.txt and the train/test lists")
    p.add_argument("--split", type=int, default=1, choices=(1, 2, 3), help="UCF-101's official split (default 1)")
    p.add_argument("--probe", type=int, default=0, metavar="N", help="count frames with N processes")
    args = p.parse_args(argv)
    try:
        index = read_class_ind(os.path.join(args.splits_dir, "classInd.txt"))
        splits = {
            name: read_split(os.path.join(args.splits_dir, f"{name}list0{args.split}.txt"), index)
            for name in ("train", "test")
        }
    except UsageError as e:
        log.error(f"ucf101_lists: error: {e}")
        return 2
    os.makedirs(args.out_dir, exist_ok=True)
    write_label_file(os.path.join(args.out_dir, "ucf101_label.txt"), sorted(index, key=index.get))
    missing = []
    present = {name: [] for name in splits}
    for name, rows in splits.items():
        for rel, label in rows:
            path = os.path.join(args.ucf_dir, rel)
            (present[name].append((path, label)) if os.path.isfile(path) else missing.append(path))
    counts, bad = count_frames([p for rows in present.values() for p, _ in rows], args.probe)
    for name, rows in present.items():
        entries = video_entries(rows, counts)
        out = os.path.join(args.out_dir, f"ucf101_{name}_split_{args.split}_videos.list")
        write_list(out, entries)
        log.info(f"ucf101_lists: {len(entries)} {name} videos -> {out}")
    for path in missing[:10]:
        log.warning(f"ucf101_lists: missing {path}")
    for path, why in bad:
        log.warning(f"ucf101_lists: unreadable {path}: {why}")
    if missing or bad:
        log.warning(f"ucf101_lists: left out {len(missing)} missing and {len(bad)} unreadable videos")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
