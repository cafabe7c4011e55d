"""List, label and other text files a user writes (docs/design.md "Data formats"): each
malformed line is a DataFormatError naming the file, the line and the fix."""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

from clipdata.errors import DataFormatError
from common.log import get_logger

SOURCES = ("pkl", "rawframes", "videos")

log = get_logger(__name__)


@dataclass(frozen=True)
class Sample:
    path: str  # pkl file, rawframe folder or video file, resolved
    label: int  # -1 for pkl until read (the label lives inside the pkl)
    num_frames: int  # 0 when the list does not say (pkl, or videos to probe)
    line: int  # 1-based line in the list file, for error messages


def _resolve(path: str, data_prefix: str | None, list_dir: str) -> str:
    if os.path.isabs(path):
        return path
    if data_prefix:
        return os.path.join(data_prefix, path)
    return os.path.join(list_dir, path)


def _int(field: str, what: str, where: str, fmt: str) -> int:
    """A list line's count or label: an integer >= 0 in plain digits."""
    if not _decimal(field):
        raise DataFormatError(f"{where}: {what} {field!r} is not an integer >= 0; expected '{fmt}'")
    return int(field)


LINE_FORMATS = {
    "pkl": "path/to/clip.pkl",
    "rawframes": "frame_dir num_frames label",
    "videos": "path/to/clip.mp4 label  or  path/to/clip.mp4 num_frames label",
}


# how files often given by mistake for a text file begin
_BINARY_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8": "a JPEG image",
    b"GIF8": "a GIF image",
    b"PK\x03\x04": "a zip archive",
    b"\x1f\x8b": "a gzip file",
    b"\x80": "a pickle (weights, a checkpoint or a pkl clip?)",
    b"\x7fELF": "a program",
}


def read_text(path: str) -> str:
    """A user's text file (list, label file, CSV, config) as str. UTF-8, with or without the byte-order
    mark Notepad and Excel write; callers split lines with universal newlines (LF, CRLF or CR). Another
    encoding is a DataFormatError naming the line and the fix, not a UnicodeDecodeError."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        kind = next((k for magic, k in _BINARY_MAGIC.items() if data.startswith(magic)), None)
        if kind or b"\0" in data[:4096]:  # not text in another encoding: iconv would not help
            raise DataFormatError(
                f"{path}: is not a text file ({kind or 'binary data'}); check the path: a text file was expected here"
            ) from None
        line = data[: e.start].count(b"\n") + 1
        raise DataFormatError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as "
            "UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None


def text_lines(path: str) -> list[str]:
    """The lines of ``read_text(path)``, split at LF, CRLF or CR only (not at the other characters
    str.splitlines takes for line breaks, which a file name may hold)."""
    return io.StringIO(read_text(path), newline=None).read().split("\n")


def parse_list_line(line: str, source: str, where: str) -> tuple[str, int, int]:
    """(path, num_frames or 0, label or -1) from one list line; paths may contain spaces."""
    fmt = LINE_FORMATS[source]
    if source == "pkl":
        return line, 0, -1
    parts = line.rsplit(maxsplit=2)
    if source == "videos" and (len(parts) < 3 or not _decimal(parts[-2].lstrip("-"))):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise DataFormatError(f"{where}: expected '{fmt}', got {line!r}")
        return parts[0], 0, _int(parts[1], "label", where, fmt)
    if len(parts) != 3:
        raise DataFormatError(f"{where}: expected '{fmt}', got {line!r}")
    n = _int(parts[1], "frame count", where, fmt)
    if n < 1:
        raise DataFormatError(f"{where}: frame count {n} must be >= 1")
    return parts[0], n, _int(parts[2], "label", where, fmt)


def read_list(list_file: str, source: str, data_prefix: str | None = None, check_exists: bool = True) -> list[Sample]:
    """Parse a list file (docs/design.md "Data formats"). Relative paths resolve against ``data_prefix``, else the
    list's
    folder. Malformed lines and missing files are reported with their line numbers."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if not os.path.isfile(list_file):
        raise DataFormatError(f"list file {list_file} does not exist")
    list_dir = os.path.dirname(os.path.abspath(list_file))
    samples, missing, first, labels, repeats, relabelled = [], [], {}, {}, [], []
    for no, raw in enumerate(text_lines(list_file), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{list_file}:{no}"
        path, n, label = parse_list_line(line, source, where)
        path = _resolve(path, data_prefix, list_dir)
        key = os.path.normpath(path)
        if (key, n, label) in first:  # one clip listed twice would count twice in a metric, weigh double in training
            repeats.append(f"line {no} repeats line {first[key, n, label].line} ({os.path.basename(path)})")
            continue
        if labels.setdefault(key, (label, no))[0] != label:  # a multi-label set written one label a line?
            relabelled.append(
                f"line {no} gives {os.path.basename(path)} label {label}, line {labels[key][1]} gave {labels[key][0]}"
            )
        if check_exists and not os.path.exists(path):
            missing.append(f"{where}: {path}")
        # another label or frame count for the same file stays a sample of its own (check_videos names a
        # wrong count), named below
        first[key, n, label] = Sample(path, label, n, no)
        samples.append(first[key, n, label])
    if repeats:
        more = f" (and {len(repeats) - 3} more)" if len(repeats) > 3 else ""
        log.warning(
            f"dali_pipelines: {list_file}: {len(repeats)} duplicate line(s), each clip counted once: "
            + "; ".join(repeats[:3])
            + more
        )
    if relabelled:
        more = f" (and {len(relabelled) - 3} more)" if len(relabelled) > 3 else ""
        log.warning(
            f"dali_pipelines: {list_file}: {len(relabelled)} line(s) give a file listed before another label, "
            "each kept as a sample of its own: " + "; ".join(relabelled[:3]) + more
        )
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise DataFormatError(
            f"{len(missing)} file(s) in {list_file} do not exist: "
            + "; ".join(missing[:5])
            + more
            + ". Fix the paths or set data_prefix to the folder they are relative to."
        )
    if not samples:
        raise DataFormatError(f"list file {list_file} has no samples")
    return samples


def _decimal(text: str) -> bool:
    """Digits 0-9 only (str.isdigit also takes the likes of '²', which int() refuses)."""
    return text.isascii() and text.isdigit()


def read_label_file(path: str) -> list[str]:
    """Class names by index from ``index name`` lines (``name index`` is accepted too)."""
    if not os.path.isfile(path):
        raise DataFormatError(f"label file {path} does not exist; write it with preprocessing/generate_label.py")
    names: dict[int, str] = {}
    lines: dict[str, int] = {}  # name -> the line that gave it
    for no, raw in enumerate(text_lines(path), 1):
        parts = raw.split()
        if not parts:
            continue
        if len(parts) != 2:
            raise DataFormatError(f"{path}:{no}: expected 'index name', got {raw.strip()!r}")
        a, b = parts
        idx, name = (int(a), b) if _decimal(a) else (int(b), a) if _decimal(b) else (None, None)
        if idx is None:
            raise DataFormatError(f"{path}:{no}: expected 'index name', got {raw.strip()!r}")
        if idx in names:
            raise DataFormatError(f"{path}:{no}: index {idx} appears twice")
        if name in lines:  # two indices of one class: its per-class rows and predictions would be ambiguous
            raise DataFormatError(
                f"{path}:{no}: class name {name!r} is also the name on line {lines[name]}; "
                "each class needs its own name"
            )
        names[idx], lines[name] = name, no
    if sorted(names) != list(range(len(names))):
        raise DataFormatError(f"{path}: class indices must be 0..{len(names) - 1} without gaps")
    return [names[i] for i in range(len(names))]
