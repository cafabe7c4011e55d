"""The pkl frame index: legacy-compatible both ways, read by offset, validated, added in place by a tool."""

import os
import pickle
import struct
import zlib

import numpy as np
import pytest

from clipdata.errors import DataFormatError
from clipdata.pkl import (
    INDEX_FOOTER,
    INDEX_HEADER,
    StaleIndexError,
    frame_spans,
    index_pkl,
    read_indexed_frames,
    read_pkl,
    read_pkl_index,
    write_pkl,
)
from dali_pipelines import build_loader, feed
from dali_pipelines.sampling import segment_indices
from preprocessing import build_list
from tools.media import frame_levels, index_frames, jpeg, level_to_index

FRAMES = [jpeg(f) for f in index_frames(30)]


def _index(path):
    with open(path, "rb") as f:
        return read_pkl_index(f.fileno(), os.fstat(f.fileno()).st_size)


def _val_levels(tmp_path, pkl_path):
    """The frame index each output frame shows, per sample, through the loader in val mode (5 segments)."""
    (tmp_path / "list.txt").write_text(f"{pkl_path}\n")
    loader = build_loader(
        str(tmp_path / "list.txt"),
        "pkl",
        "val",
        batch_size=1,
        num_segments=5,
        target_size=16,
        short_size=16,
        num_workers=0,
    )
    return [[level_to_index(v) for v in frame_levels(imgs)[0]] for imgs, _ in loader]


def test_written_pkl_loads_with_plain_pickle_and_reads_frames_by_offset(tmp_path):
    path = tmp_path / "c.pkl"
    write_pkl(str(path), "c", 3, FRAMES)
    with open(path, "rb") as f:
        assert pickle.load(f) == ("c", 3, FRAMES)  # the legacy layout: the index after STOP is ignored
    index = _index(path)
    assert (index.label, index.num_frames) == (3, 30)
    with open(path, "rb") as f:
        assert read_indexed_frames(f.fileno(), index, [29, 0, 7]) == [FRAMES[29], FRAMES[0], FRAMES[7]]


def test_loader_reads_only_the_sampled_frames_of_an_indexed_pkl(tmp_path, monkeypatch):
    path = tmp_path / "c.pkl"
    write_pkl(str(path), "c", 0, FRAMES)
    read = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: read.append(n) or real_pread(fd, n, off))
    monkeypatch.setattr("dali_pipelines.feed.read_pkl", lambda p: pytest.fail("read the whole pkl"))
    levels = _val_levels(tmp_path, path)
    assert levels == [segment_indices(30, 5, "val").tolist()]
    sampled = sum(len(FRAMES[i]) for i in segment_indices(30, 5, "val"))
    assert sum(read) <= sampled + 30 * 16 + 200  # the JPEGs, the index, a few opcode bytes


@pytest.mark.parametrize("protocol, outcome", [(2, "rewritten"), (3, "appended"), (4, "appended")])
def test_legacy_pkls_load_and_get_their_index_in_place(tmp_path, protocol, outcome):
    """Python 3 pickles bytes as _codecs.encode(str, 'latin1') under protocol 2 (PaddleVideo's old files):
    they load as before, and the index tool rewrites them; raw-bytes pickles only get the index appended."""
    path = tmp_path / "legacy.pkl"
    legacy = pickle.dumps(("legacy", 2, FRAMES), protocol=protocol)
    path.write_bytes(legacy)
    assert _index(path) is None
    before = _val_levels(tmp_path, path)
    assert index_pkl(str(path)) == outcome
    assert index_pkl(str(path)) == "indexed"  # a rerun leaves it alone
    if outcome == "appended":
        assert path.read_bytes()[: len(legacy)] == legacy
    with open(path, "rb") as f:
        assert pickle.load(f) == ("legacy", 2, FRAMES)
    assert _index(path).num_frames == 30
    assert _val_levels(tmp_path, path) == before == [segment_indices(30, 5, "val").tolist()]


def test_a_cut_off_index_append_leaves_a_legacy_pkl(tmp_path):
    path = tmp_path / "c.pkl"
    write_pkl(str(path), "c", 0, FRAMES)
    data = path.read_bytes()
    path.write_bytes(data[:-3])  # the footer is written last: a torn append has none
    assert _index(path) is None
    assert read_pkl(str(path))[2] == FRAMES
    assert index_pkl(str(path)) == "appended"
    again = path.read_bytes()  # the same index but for the time it records
    assert (
        len(again) == len(data)
        and again[: -INDEX_FOOTER.size - 16 * 30 - 12] == data[: -INDEX_FOOTER.size - 16 * 30 - 12]
    )
    assert _index(path).mtime_ns == path.stat().st_mtime_ns


def _keep_stamp(path):
    """Give a file the modification time its index records: damage that a rewrite's new time would not
    reveal (bit rot, a tool that restores times), so the index's own checks are what must catch it."""
    data = path.read_bytes()
    body_size = INDEX_FOOTER.unpack(data[-INDEX_FOOTER.size :])[0]
    start = len(data) - INDEX_FOOTER.size - body_size
    stamp = INDEX_HEADER.unpack_from(data, start)[-1]
    os.utime(path, ns=(stamp, stamp))


def _rewrite_in_place(path, obj):
    """What an editing script does: the new pickle written over the old file's start, not truncated
    (the old index stays at the end, with its checksum intact)."""
    with open(path, "r+b") as f:
        f.write(pickle.dumps(obj, protocol=4))


@pytest.mark.parametrize("change", ["label", "trimmed"])
def test_a_pkl_rewritten_in_place_after_indexing_is_read_as_it_is_now(tmp_path, capfd, monkeypatch, change):
    """The index describes the bytes it was made from: after an in-place rewrite (a new label; the clip
    cut to 10 frames) the loader reads the new pickle, never the old label or the old frames, and says
    so; the index tool does not call the file indexed, and its new index reads the new clip."""
    monkeypatch.setattr(feed, "_stale_noted", [])  # the first stale file of a process is named
    path = tmp_path / "c.pkl"
    write_pkl(str(path), "c", 3, FRAMES)
    new = ("c", 4, FRAMES) if change == "label" else ("c", 3, FRAMES[:10])
    _rewrite_in_place(path, new)
    assert read_pkl(str(path)) == new
    (tmp_path / "list.txt").write_text(f"{path}\n")
    loader = build_loader(
        str(tmp_path / "list.txt"),
        "pkl",
        "val",
        batch_size=1,
        num_segments=5,
        target_size=16,
        short_size=16,
        num_workers=0,
    )
    ((imgs, labels),) = list(loader)
    levels = [level_to_index(v) for v in frame_levels(imgs)[0]]
    assert labels.numpy().tolist() == [new[1]] and loader.skipped == 0
    assert levels == segment_indices(len(new[2]), 5, "val").tolist()
    assert "c.pkl: the file changed after its frame index was made; read whole" in capfd.readouterr().err
    assert index_pkl(str(path)) == "appended"  # not "indexed": the old index describes other bytes
    assert (_index(path).label, _index(path).num_frames) == (new[1], len(new[2]))
    with open(path, "rb") as f:
        assert pickle.load(f) == new and read_indexed_frames(f.fileno(), _index(path), [9]) == [FRAMES[9]]
    assert index_pkl(str(path)) == "indexed"


def test_a_pkl_copied_without_its_times_keeps_its_index_after_one_check(tmp_path):
    path = tmp_path / "c.pkl"
    write_pkl(str(path), "c", 3, FRAMES)
    data, stamp = path.read_bytes(), path.stat().st_mtime_ns
    os.utime(path, ns=(stamp + 10**9, stamp + 10**9))  # cp without -p: the same bytes, another time
    with open(path, "rb") as f, pytest.raises(StaleIndexError):
        read_pkl_index(f.fileno(), len(data), path.stat().st_mtime_ns)
    assert index_pkl(str(path)) == "indexed"  # the pickle's CRC matches: only the time is given back
    assert path.read_bytes() == data and path.stat().st_mtime_ns == stamp


def test_an_index_of_the_first_version_is_not_trusted(tmp_path):
    """Version 1 indexes were bound to nothing: read as stale (the file is read whole), then replaced."""
    path = tmp_path / "c.pkl"
    legacy = pickle.dumps(("c", 2, FRAMES), protocol=4)
    spans, end = frame_spans(legacy, 30)
    body = struct.pack("<8sIIqQ", b"TSNPKIDX", 1, 30, 2, end) + spans.astype("<u8").tobytes()
    path.write_bytes(legacy + body + INDEX_FOOTER.pack(len(body), zlib.crc32(body), b"TSNIDX\x00\x01"))
    with open(path, "rb") as f, pytest.raises(StaleIndexError, match="version 1"):
        read_pkl_index(f.fileno(), path.stat().st_size, path.stat().st_mtime_ns)
    assert index_pkl(str(path)) == "appended" and _index(path).num_frames == 30


def _rewrite_index(path, change):
    """Rewrite the index's entries with ``change(spans)`` and a valid checksum (a consistent but wrong index)."""
    data = path.read_bytes()
    body_size, _, end = INDEX_FOOTER.unpack(data[-INDEX_FOOTER.size :])
    start = len(data) - INDEX_FOOTER.size - body_size
    head = data[start : start + INDEX_HEADER.size]
    spans = np.frombuffer(data, "<u8", (body_size - INDEX_HEADER.size) // 8, start + INDEX_HEADER.size).reshape(-1, 2)
    body = head + change(spans.copy()).astype("<u8").tobytes()
    path.write_bytes(data[:start] + body + INDEX_FOOTER.pack(len(body), zlib.crc32(body), end))


def _shift_into_frames(s):
    s[:-1, 0] += 7  # every frame but the last starts 7 bytes into itself: in order, inside the pickle
    s[:-1, 1] -= 7
    return s


BAD_INDEXES = {
    "damaged (bit flip)": lambda path: path.write_bytes(
        (lambda d: d[:-40] + bytes([d[-40] ^ 0xFF]) + d[-39:])(path.read_bytes())
    ),
    "offset past the pickle": lambda path: _rewrite_index(path, lambda s: s + np.array([10**6, 0], np.uint64)),
    "frames swapped": lambda path: _rewrite_index(path, lambda s: s[[1, 0] + list(range(2, len(s)))]),
    "offsets inside frames": lambda path: _rewrite_index(path, _shift_into_frames),
    "a frame left out": lambda path: _rewrite_index(path, lambda s: s[:-1]),
}


@pytest.mark.parametrize("damage", sorted(BAD_INDEXES))
def test_a_bad_index_is_a_skipped_reported_sample_never_a_wrong_frame(tmp_path, capfd, damage):
    good, bad = tmp_path / "good.pkl", tmp_path / "bad.pkl"
    write_pkl(str(good), "good", 0, FRAMES)
    write_pkl(str(bad), "bad", 1, FRAMES)
    if damage == "a frame left out":  # a consistent header for 29 frames
        data = bad.read_bytes()
        body_size, _, end = INDEX_FOOTER.unpack(data[-INDEX_FOOTER.size :])
        start = len(data) - INDEX_FOOTER.size - body_size
        magic, version, n, label, pickle_end, crc, stamp = INDEX_HEADER.unpack_from(data, start)
        head = INDEX_HEADER.pack(magic, version, n - 1, label, pickle_end, crc, stamp)
        body = head + data[start + INDEX_HEADER.size : start + body_size - 16]
        bad.write_bytes(data[:start] + body + INDEX_FOOTER.pack(len(body), zlib.crc32(body), end))
    else:
        BAD_INDEXES[damage](bad)
    _keep_stamp(bad)
    (tmp_path / "list.txt").write_text("good.pkl\nbad.pkl\n")
    loader = build_loader(
        str(tmp_path / "list.txt"),
        "pkl",
        "val",
        batch_size=2,
        num_segments=5,
        target_size=16,
        short_size=16,
        num_workers=1,
    )
    ((imgs, labels),) = list(loader)
    assert labels.numpy().tolist() == [0] and loader.skipped == 1
    assert "bad.pkl" in capfd.readouterr().err
    assert index_pkl(str(bad)) == "appended"  # the tool replaces a bad index
    with open(bad, "rb") as f:
        assert read_indexed_frames(f.fileno(), _index(bad), [29]) == [FRAMES[29]]


def test_indexing_never_runs_code_from_the_file(tmp_path):
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps(("evil", 0, [Exploit()]), protocol=4))
    with pytest.raises(DataFormatError, match="os.system|posix.system"):
        index_pkl(str(path))
    assert not marker.exists()


def test_build_list_indexes_a_pkl_set_in_place_and_resumes(tmp_path, capsys):
    root = tmp_path / "pkl"
    root.mkdir()
    write_pkl(str(root / "new.pkl"), "new", 0, FRAMES)
    (root / "p2.pkl").write_bytes(pickle.dumps(("p2", 1, FRAMES), protocol=2))
    (root / "p4.pkl").write_bytes(pickle.dumps(("p4", 2, FRAMES), protocol=4))
    (root / "junk.pkl").write_bytes(b"not a pickle")
    out = tmp_path / "train.list"
    assert build_list.main(["pkl", str(root), str(out), "--index", "2"]) == 1
    printed = capsys.readouterr()
    assert "1 appended, 1 rewritten, 1 already indexed" in printed.out and "junk.pkl" in printed.err
    assert out.read_text().split() == ["pkl/new.pkl", "pkl/p2.pkl", "pkl/p4.pkl"]
    assert all(_index(root / n) is not None for n in ("new.pkl", "p2.pkl", "p4.pkl"))
    (root / "junk.pkl").unlink()
    assert build_list.main(["pkl", str(root), str(out), "--index", "2"]) == 0
    assert "0 appended, 0 rewritten, 3 already indexed" in capsys.readouterr().out
    assert _index(root / "p2.pkl").label == 1
