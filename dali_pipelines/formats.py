"""On-disk formats shared by preprocessing and the pipelines: pkl clips and list files
(docs/design.md "Data formats").

A pkl clip is a pickled tuple ``(video_id, label_index, [jpeg_bytes, ...])``. It is only ever read
through a restricted unpickler, so a pkl from elsewhere cannot run code when loaded.

A clip pkl may carry a frame index after the pickle's STOP opcode (``pickle.load`` ignores the bytes
that follow, so such a file still loads anywhere as the legacy layout). The index lets a sample read
only the JPEGs it uses: docs/design.md "The pkl frame index" gives the layout and the checks.
"""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import struct
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

import numpy as np

SOURCES = ("pkl", "rawframes", "videos")


class DataFormatError(ValueError):
    """A user's data file is malformed; the message names the file and the fix."""


class _ClipUnpickler(pickle.Unpickler):
    # Tuples, lists, bytes, str and int need no globals. Protocol-2 pickles written by Python 3 (the
    # legacy PaddleVideo video2pkl) spell bytes as _codecs.encode(str, 'latin1'): allow exactly that.
    def find_class(self, module, name):
        if (module, name) == ("_codecs", "encode"):
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a clip pkl")


def write_pkl(path: str, video_id: str, label: int, frames: list[bytes]) -> None:
    """Write a clip pkl with its frame index, atomically: a killed writer never leaves a file that
    looks complete."""
    frames = list(frames)
    if len({id(f) for f in frames}) < len(frames):  # the pickler would store a repeated object once
        frames = [bytes(bytearray(f)) for f in frames]
    data = pickle.dumps((video_id, int(label), frames), protocol=4)
    if not frames:  # a clip without frames is unreadable anyway: no index to give it
        write_atomic(path, data)
        return
    spans, pickle_end = frame_spans(data, len(frames))
    stamp = index_stamp()
    write_atomic(path, data + pkl_trailer(int(label), spans, pickle_end, zlib.crc32(data), stamp), mtime_ns=stamp)


def _umask() -> int:
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def write_atomic(path: str, data: bytes, mtime_ns: int | None = None) -> None:
    """Write ``data`` under a temporary name, then rename it over ``path``: a reader sees the old file or
    the whole new one. The file gets the permissions an ordinary open() would give it (mkstemp's are
    0600, which would hide a dataset from the other accounts of a cluster), and ``mtime_ns`` as its
    modification time when given (before the rename: the file never shows another)."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=os.path.basename(path), dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mtime_ns is not None:
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_pkl(path: str) -> tuple[str, int, list[bytes]]:
    """Load a clip pkl; anything but ``(id, label, [jpeg bytes])`` of builtin types is rejected."""
    with open(path, "rb") as f:
        return _unpickle_clip(path, f.read())


def _unpickle_clip(path: str, data: bytes) -> tuple[str, int, list[bytes]]:
    try:
        obj = _ClipUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001 - any unpickling failure is the file's fault
        raise DataFormatError(f"{path}: not a clip pkl ({e}); regenerate it with preprocessing/video2pkl.py") from None
    if not (
        isinstance(obj, (tuple, list))
        and len(obj) == 3
        and isinstance(obj[2], list)
        and all(isinstance(b, bytes) for b in obj[2])
    ):
        raise DataFormatError(
            f"{path}: expected (video_id, label, [jpeg bytes]); regenerate it with preprocessing/video2pkl.py"
        )
    vid, label, frames = obj
    if isinstance(vid, bytes):
        vid = vid.decode("utf-8", "replace")
    try:
        label = int(label)
    except (TypeError, ValueError):
        raise DataFormatError(f"{path}: label {label!r} is not an integer class index") from None
    return str(vid), label, frames


# The frame index: HEADER, then (offset, length) uint64 pairs, then FOOTER. The CRC covers header and
# entries, so a half-appended or damaged index is never taken for a valid one. The header binds the
# index to the bytes it was made from: the pickle's CRC, and the modification time the file was given
# when the index was written (a file rewritten in place since has another: docs/design.md "The pkl
# frame index"). Version 1 had neither and is read as no index.
INDEX_HEADER = struct.Struct("<8sIIqQIq")  # magic, version, num_frames, label, pickle_end, pickle_crc, mtime_ns
INDEX_FOOTER = struct.Struct("<QI8s")  # size of header + entries, crc32 of them, magic
INDEX_MAGIC, INDEX_END, INDEX_VERSION = b"TSNPKIDX", b"TSNIDX\x00\x01", 2
_INDEX_PREFIX = struct.Struct("<8sI")  # what every version begins with
# at most this many bytes of opcodes (memo, appends, tuple, stop) follow the last frame of a clip pickle
_MAX_TAIL_OPCODES = 16
# the pickle opcodes that hold raw bytes, by the width of their length field
_BYTES_OPCODES = {b"C"[0]: 1, b"B"[0]: 4, 0x8E: 8}


def frame_spans(data: bytes, num_frames: int) -> tuple[np.ndarray, int]:
    """[num_frames, 2] (offset, length) of the raw frame bytes inside a clip pickle, found by walking
    its opcodes (nothing is executed), and where the pickle ends. Raises DataFormatError when the frames
    are not stored as contiguous raw bytes (protocol 2 spells them ``_codecs.encode(str)``; a memo may
    share one)."""
    spans, stop = [], None
    try:
        for op, arg, pos in pickletools.genops(data):
            if op.name in ("SHORT_BINBYTES", "BINBYTES", "BINBYTES8"):
                width = _BYTES_OPCODES[data[pos]]
                spans.append((pos + 1 + width, len(arg)))
            elif op.name == "STOP":
                stop = pos
                break
    except Exception as e:  # noqa: BLE001 - any parse failure is the file's fault
        raise DataFormatError(f"not a clip pkl ({e})") from None
    if stop is None or len(spans) < num_frames or num_frames < 1:
        raise DataFormatError("the frames are not stored as raw bytes; the file must be rewritten")
    return np.array(spans[len(spans) - num_frames :], dtype=np.uint64), stop + 1


def pkl_trailer(label: int, spans: np.ndarray, pickle_end: int, pickle_crc: int, mtime_ns: int) -> bytes:
    """The frame index that follows a clip pickle of ``pickle_end`` bytes whose CRC-32 is ``pickle_crc``,
    in a file that will have the modification time ``mtime_ns``."""
    head = INDEX_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, len(spans), label, pickle_end, pickle_crc, mtime_ns)
    body = head + spans.astype("<u8").tobytes()
    return body + INDEX_FOOTER.pack(len(body), zlib.crc32(body), INDEX_END)


def index_stamp() -> int:
    """The modification time an indexed file is given (and its index records): now, in whole even
    seconds, which every file system stores exactly (FAT keeps 2 s; others ns or 1 s)."""
    return time.time_ns() // 2_000_000_000 * 2_000_000_000


class StaleIndexError(DataFormatError):
    """The file changed after its frame index was made (or the index predates the binding): the index
    describes other bytes. Readers read the file whole; ``index_pkl`` makes a new index."""


@dataclass(frozen=True)
class PklIndex:
    label: int
    spans: np.ndarray  # [num_frames, 2] uint64 (offset, length)
    pickle_crc: int = 0  # CRC-32 of the pickle the index was made from
    mtime_ns: int = 0  # the file's modification time when it was indexed

    @property
    def num_frames(self) -> int:
        return len(self.spans)


def read_pkl_index(fd: int, size: int, mtime_ns: int | None = None) -> PklIndex | None:
    """The frame index at the end of an open clip pkl, or None when the file has none (a legacy pkl,
    or an index whose append was cut short: its footer is written last). With ``mtime_ns`` (the file's
    modification time now), an index made before the file last changed raises StaleIndexError: it
    describes bytes that may be gone (a label rewritten, a clip trimmed in place). An index that is
    there but damaged or inconsistent with the file raises DataFormatError: the sample is skipped,
    never read from wrong offsets."""
    if size < INDEX_FOOTER.size + _INDEX_PREFIX.size + 2:
        return None
    footer = os.pread(fd, INDEX_FOOTER.size, size - INDEX_FOOTER.size)
    body_size, crc, end = INDEX_FOOTER.unpack(footer)
    start = size - INDEX_FOOTER.size - body_size
    if end != INDEX_END or body_size < _INDEX_PREFIX.size or start < 1:
        return None
    body = os.pread(fd, body_size, start)
    if len(body) != body_size or zlib.crc32(body) != crc:
        raise DataFormatError("the frame index is damaged (checksum mismatch)")
    magic, version = _INDEX_PREFIX.unpack_from(body)
    if magic != INDEX_MAGIC or version > INDEX_VERSION:
        raise DataFormatError(f"frame index version {version} is not supported")
    if version < INDEX_VERSION:
        raise StaleIndexError(f"a version {version} frame index, not bound to the file's contents")
    if body_size < INDEX_HEADER.size:
        raise DataFormatError("the frame index does not match the file")
    magic, version, n, label, pickle_end, pickle_crc, stamp = INDEX_HEADER.unpack_from(body)
    if mtime_ns is not None and mtime_ns != stamp:
        raise StaleIndexError("the file changed after its frame index was made")
    if n < 1 or body_size != INDEX_HEADER.size + 16 * n or pickle_end != start:
        raise DataFormatError("the frame index does not match the file")
    spans = np.frombuffer(body, "<u8", 2 * n, INDEX_HEADER.size).reshape(n, 2)
    ends = spans[:, 0] + spans[:, 1]
    if (
        spans[0, 0] < 2
        or (spans[:, 1] < 4).any()
        or not pickle_end - _MAX_TAIL_OPCODES <= ends[-1] <= pickle_end
        or (spans[1:, 0] < ends[:-1]).any()
    ):
        raise DataFormatError("the frame index has offsets outside the pickle's frames or out of order")
    return PklIndex(int(label), spans, pickle_crc, stamp)


def read_indexed_frames(fd: int, index: PklIndex, indices) -> list[bytes]:
    """The JPEGs at ``indices``, one read each; every read is checked to be a raw-bytes value of the
    pickle with the indexed length, and a complete JPEG."""
    out = []
    for i in indices:
        off, length = (int(v) for v in index.spans[i])
        head = min(off, 9)
        data = os.pread(fd, head + length, off - head)
        if len(data) != head + length or not _bytes_opcode_at(data, head, length):
            raise DataFormatError(
                f"the frame index points frame {i} at no frame; re-index the file with "
                "preprocessing/build_list.py pkl --index"
            )
        out.append(check_jpeg(data[head:]))
    return out


def _index_points_at_jpegs(fd: int, index: PklIndex) -> bool:
    """Every entry starts a raw-bytes value of its length that begins and ends like a JPEG (a few
    bytes read per frame, not the frames)."""
    for off, length in index.spans.tolist():
        head, tail = min(off, 9), min(length, 16)
        start, end = os.pread(fd, head + 2, off - head), os.pread(fd, tail, off + length - tail)
        if not _bytes_opcode_at(start, head, length):
            return False
        try:
            check_jpeg(start[head:] + end)  # the frame's first and last bytes: its markers
        except DataFormatError:
            return False
    return True


def _bytes_opcode_at(data: bytes, head: int, length: int) -> bool:
    for opcode, width in _BYTES_OPCODES.items():
        if (
            head > width
            and data[head - 1 - width] == opcode
            and int.from_bytes(data[head - width : head], "little") == length
        ):
            return True
    return False


def index_pkl(path: str) -> str:
    """Give a clip pkl its frame index in place: "indexed" when it already had a valid one for the file
    as it is, "appended" when its frames were raw bytes (the index is appended after the pickle, in
    place of any earlier one), "rewritten" when they were not (protocol 2; the clip is rewritten in
    this project's layout, atomically). An index whose file changed since (another modification time)
    counts as "indexed" only when the pickle is still the one it was made from (its CRC), and the file
    gets its recorded time back; else it is made anew. Nothing in the file is executed: it is read
    with the restricted unpickler and walked opcode by opcode."""
    stale = None
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())
        try:
            index = read_pkl_index(f.fileno(), st.st_size)
            if index is not None and _index_points_at_jpegs(f.fileno(), index):
                if index.mtime_ns == st.st_mtime_ns:
                    return "indexed"
                stale = index  # copied without its times, or rewritten since: the CRC below tells
        except DataFormatError:
            pass  # a damaged or old index is replaced below
        data = f.read()
    vid, label, frames = _unpickle_clip(path, data)
    for frame in frames:
        check_jpeg(frame)
    try:
        spans, pickle_end = frame_spans(data, len(frames))
    except DataFormatError:
        spans = None
    if (
        stale is not None
        and spans is not None
        and stale.label == label
        and np.array_equal(stale.spans, spans)
        and zlib.crc32(data[:pickle_end]) == stale.pickle_crc
        and len(data) == pickle_end + INDEX_HEADER.size + 16 * len(spans) + INDEX_FOOTER.size
    ):
        os.utime(path, ns=(stale.mtime_ns, stale.mtime_ns))  # the same bytes: give them their time back
        return "indexed"
    if spans is not None and all(data[o : o + n] == fr for (o, n), fr in zip(spans.tolist(), frames)):
        stamp = index_stamp()
        with open(path, "r+b") as f:  # a torn append fails the CRC and reads as "no index"
            f.truncate(pickle_end)
            f.seek(pickle_end)
            f.write(pkl_trailer(label, spans, pickle_end, zlib.crc32(data[:pickle_end]), stamp))
        os.utime(path, ns=(stamp, stamp))  # a crash before this leaves another time: read as stale, never trusted
        return "appended"
    write_pkl(path, vid, label, frames)
    return "rewritten"


def check_jpeg(data: bytes) -> bytes:
    """Reject what would stop the decoder mid-pipeline: not a JPEG, or cut before its end marker."""
    if data[:2] != b"\xff\xd8" or data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        raise DataFormatError("corrupt or truncated JPEG frame")
    return data


MAX_JPEG_SIDE = 16384  # beyond any video frame; a header claiming more is damaged, not a frame to decode


def jpeg_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a JPEG's SOF header, without decoding it; a size the decoder would fail on
    (zero, or beyond MAX_JPEG_SIDE) raises DataFormatError here, before the DALI graph, so the sample is
    skipped and named like any other unreadable one."""
    if data[:2] != b"\xff\xd8":
        raise DataFormatError("not a JPEG (no SOI marker)")
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            raise DataFormatError("corrupt JPEG header")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h = int.from_bytes(data[i + 5 : i + 7], "big")
            w = int.from_bytes(data[i + 7 : i + 9], "big")
            if not (0 < w <= MAX_JPEG_SIDE and 0 < h <= MAX_JPEG_SIDE):
                raise DataFormatError(f"JPEG header says {w}x{h} pixels: damaged")
            return w, h
        i += 2 + length
    raise DataFormatError("JPEG without a frame header")


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
        print(
            f"dali_pipelines: {list_file}: {len(repeats)} duplicate line(s), each clip counted once: "
            + "; ".join(repeats[:3])
            + more,
            file=sys.stderr,
            flush=True,
        )
    if relabelled:
        more = f" (and {len(relabelled) - 3} more)" if len(relabelled) > 3 else ""
        print(
            f"dali_pipelines: {list_file}: {len(relabelled)} line(s) give a file listed before another label, "
            "each kept as a sample of its own: " + "; ".join(relabelled[:3]) + more,
            file=sys.stderr,
            flush=True,
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
