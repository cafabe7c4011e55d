"""Kinetics CSVs, label files and clip lookup (docs/design.md "Data formats"), shared by the preprocessing scripts."""

from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass

from common.usage import UsageError

REQUIRED_COLUMNS = ("label", "youtube_id", "time_start", "time_end")
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass(frozen=True)
class Clip:
    video_id: str  # file stem: {youtube_id}_{start:06d}_{end:06d}
    youtube_id: str
    label: str  # class name as written in the label file (spaces -> underscores)
    split: str
    row: int  # line number in the CSV


def class_name(label: str) -> str:
    """Label-file spelling of a Kinetics class: spaces become underscores so lines stay 'index name'."""
    return "_".join(label.strip().strip('"').split())


def read_csv(path: str) -> tuple[list[Clip], list[tuple[str, str]]]:
    """Clips of a Kinetics CSV and (row id, reason) for each malformed row."""
    if not os.path.isfile(path):
        raise UsageError(f"CSV file {path} does not exist")
    from clipdata.errors import DataFormatError
    from clipdata.lists import read_text

    clips, bad = [], []
    try:
        text = read_text(path)
    except DataFormatError as e:
        raise UsageError(str(e)) from None
    with io.StringIO(text, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise UsageError(f"{path} is empty; expected a header 'label,youtube_id,time_start,time_end,split'")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise UsageError(
                f"{path}: header {header} lacks column(s) {missing}; expected "
                "'label,youtube_id,time_start,time_end,split'"
            )
        col = {name: header.index(name) for name in header}
        for row_no, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            where = f"{os.path.basename(path)}:{row_no}"
            if len(row) < len(header) - ("is_cc" in header):
                bad.append((where, f"malformed row (expected {len(header)} fields, got {len(row)}): {','.join(row)}"))
                continue
            yid = row[col["youtube_id"]].strip()
            try:
                start, end = int(float(row[col["time_start"]])), int(float(row[col["time_end"]]))
            except ValueError:
                bad.append((where, f"malformed row (time_start/time_end not numbers): {','.join(row)}"))
                continue
            label = class_name(row[col["label"]])
            if not yid or not label:
                bad.append((where, f"malformed row (empty youtube_id or label): {','.join(row)}"))
                continue
            if not (_plain_name(yid) and _plain_name(label)):  # output and source paths are built from them
                bad.append(
                    (
                        where,
                        f"youtube_id {yid!r} or label {label!r} is not a plain file name (a path "
                        "separator, or a leading '.'): it would lead outside the folders",
                    )
                )
                continue
            split = row[col["split"]].strip() if "split" in col else ""
            clips.append(Clip(f"{yid}_{start:06d}_{end:06d}", yid, label, split, row_no))
    return clips, bad


def _plain_name(name: str) -> bool:
    """A name that stays inside the folder it is joined to: no separator, no NUL, not '.', '..' or hidden."""
    return not (name.startswith(".") or "/" in name or "\\" in name or "\0" in name or os.sep in name)


def find_clip(src_dir: str, clip: Clip) -> str | None:
    """The clip's video file under either Kinetics layout (label sub-folders, named with underscores or
    spaces, or flat) and either naming (``{id}_{start}_{end}`` or bare ``{id}``); None when absent."""
    folders = [src_dir, os.path.join(src_dir, clip.label), os.path.join(src_dir, clip.label.replace("_", " "))]
    for stem in (clip.video_id, clip.youtube_id):
        for folder in folders:
            for ext in VIDEO_EXTENSIONS:
                path = os.path.join(folder, stem + ext)
                if os.path.isfile(path):
                    return path
    return None


def write_label_file(path: str, classes: list[str]) -> None:
    from common.files import write_atomic

    write_atomic(path, "".join(f"{i} {name}\n" for i, name in enumerate(classes)).encode())


def load_class_index(label_file: str) -> dict[str, int]:
    from clipdata.errors import DataFormatError
    from clipdata.lists import read_label_file

    try:
        return {name: i for i, name in enumerate(read_label_file(label_file))}
    except DataFormatError as e:
        raise UsageError(str(e)) from None
