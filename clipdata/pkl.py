"""The pkl clip codec and its frame index (docs/design.md "Data formats").

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
import time
import zlib
from dataclasses import dataclass

import numpy as np

from clipdata.errors import DataFormatError
from clipdata.jpeg import check_jpeg
from common.files import write_atomic


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
