import os
import pickle

import numpy as np
import pytest

from clipdata.errors import DataFormatError
from clipdata.lists import read_label_file
from clipdata.pkl import read_pkl, write_pkl
from clipdata.video import probe
from preprocessing import generate_label, video2pkl
from preprocessing.frames import extract_jpegs, split_jpeg_stream
from preprocessing.kinetics import Clip, find_clip
from tools.media import has_bframes, index_frames, jpeg, level_to_index, write_video

HEADER = "label,youtube_id,time_start,time_end,split\n"


def _decode_level(jpeg_bytes):
    import io

    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(jpeg_bytes))).mean())


def test_video2pkl_keeps_every_frame_in_order_for_a_bframe_video(tmp_path):
    src = tmp_path / "src" / "class_a"
    src.mkdir(parents=True)
    write_video(src / "vid00000001_000010_000020.mp4", index_frames(45))
    assert has_bframes(src / "vid00000001_000010_000020.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "class a,vid00000001,10,20,train\n")
    rc = video2pkl.main([str(csv), str(tmp_path / "src"), str(tmp_path / "out"), "1"])
    assert rc == 0
    vid, label, frames = read_pkl(str(tmp_path / "out" / "vid00000001_000010_000020.pkl"))
    assert (vid, label) == ("vid00000001_000010_000020", 0)
    assert len(frames) == probe(str(src / "vid00000001_000010_000020.mp4")).frames == 45
    assert [level_to_index(_decode_level(f)) for f in frames] == list(range(45))
    listed = (tmp_path / "out.list").read_text().split()
    assert listed == ["out/vid00000001_000010_000020.pkl"]


def test_split_jpeg_stream_recovers_each_image():
    images = [jpeg(np.random.default_rng(i).integers(0, 255, (16, 24, 3), dtype=np.uint8)) for i in range(3)]
    assert split_jpeg_stream(b"".join(images)) == images


def test_restricted_unpickler_rejects_code_and_accepts_legacy_protocol_2(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    bad = tmp_path / "bad.pkl"
    bad.write_bytes(pickle.dumps(("v", 0, [Evil()])))
    with pytest.raises(DataFormatError, match="not a clip pkl.*not allowed"):
        read_pkl(str(bad))
    assert not (tmp_path / "pwned").exists()
    legacy = tmp_path / "legacy.pkl"
    legacy.write_bytes(pickle.dumps(("v1", 3, [b"\xff\xd8abc"]), protocol=2))
    assert read_pkl(str(legacy)) == ("v1", 3, [b"\xff\xd8abc"])
    wrong = tmp_path / "wrong.pkl"
    wrong.write_bytes(pickle.dumps({"frames": []}))
    with pytest.raises(DataFormatError, match="expected \\(video_id, label"):
        read_pkl(str(wrong))


def test_bad_clips_are_recorded_and_the_run_goes_on(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "good0000000_000000_000010.mp4", index_frames(12))
    write_video(src / "badlabel000_000000_000010.mp4", index_frames(12))
    (src / "empty000000_000000_000010.mp4").write_bytes(b"")
    (src / "notvideo000_000000_000010.mp4").write_bytes(b"this is not a video" * 50)
    csv = tmp_path / "k.csv"
    csv.write_text(
        HEADER
        + "a,good0000000,0,10,train\n"
        + "a,empty000000,0,10,train\n"
        + "a,notvideo000,0,10,train\n"
        + "a,missing0000,0,10,train\n"
        + "zz,badlabel000,0,10,train\n"
        + "a,broken,row\n"
        + "a,good0000000,0,10,train\n"
    )
    labels = tmp_path / "labels.txt"
    labels.write_text("0 a\n")
    out = tmp_path / "out"
    rc = video2pkl.main([str(csv), str(src), str(out), "2", "--label-file", str(labels)])
    assert rc == 1
    failures = dict(line.split("\t") for line in (tmp_path / "out.failures.txt").read_text().splitlines())
    assert "empty" in failures["empty000000_000000_000010"]
    assert "ffmpeg failed" in failures["notvideo000_000000_000010"]
    assert "not found" in failures["missing0000_000000_000010"]
    assert "not in the label file" in failures["badlabel000_000000_000010"]
    assert "duplicate CSV row (line 8)" in failures["good0000000_000000_000010"]
    assert any("malformed row" in why for why in failures.values())
    assert sorted(os.listdir(out)) == ["good0000000_000000_000010.pkl"]
    # a rerun skips what is complete and leaves no temporary files behind
    before = os.stat(out / "good0000000_000000_000010.pkl").st_mtime_ns
    assert video2pkl.main([str(csv), str(src), str(out), "2", "--label-file", str(labels)]) == 1
    assert os.stat(out / "good0000000_000000_000010.pkl").st_mtime_ns == before
    assert sorted(os.listdir(out)) == ["good0000000_000000_000010.pkl"]


def test_usage_errors_exit_2_before_any_work(tmp_path, capsys):
    assert video2pkl.main([str(tmp_path / "nope.csv"), str(tmp_path), str(tmp_path / "o"), "1"]) == 2
    assert "does not exist" in capsys.readouterr().err
    csv = tmp_path / "k.csv"
    csv.write_text("youtube_id,time_start\n")
    assert video2pkl.main([str(csv), str(tmp_path), str(tmp_path / "o"), "1"]) == 2
    assert "lacks column" in capsys.readouterr().err


def test_extract_jpegs_can_resize_the_short_side(tmp_path):
    write_video(tmp_path / "v.mp4", index_frames(10, 64, 48))
    frames = extract_jpegs(str(tmp_path / "v.mp4"), short_side=24)
    from clipdata.jpeg import jpeg_size

    assert len(frames) == 10 and jpeg_size(frames[0]) == (32, 24)


def test_generate_label_sorts_classes_and_writes_spaces_as_underscores(tmp_path):
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "zumba,a,0,10,train\nair drumming,b,0,10,train\nzumba,c,0,10,train\n")
    assert generate_label.main([str(csv), str(tmp_path / "l.txt")]) == 0
    assert (tmp_path / "l.txt").read_text() == "0 air_drumming\n1 zumba\n"
    assert read_label_file(str(tmp_path / "l.txt")) == ["air_drumming", "zumba"]


@pytest.mark.parametrize(
    "rel",
    [
        "air_drumming/abc_000001_000011.mp4",
        "air drumming/abc_000001_000011.mp4",
        "abc_000001_000011.mp4",
        "abc.mp4",
        "air_drumming/abc.mkv",
    ],
)
def test_find_clip_accepts_both_layouts_and_namings(tmp_path, rel):
    (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / rel).write_bytes(b"x")
    clip = Clip("abc_000001_000011", "abc", "air_drumming", "train", 2)
    assert find_clip(str(tmp_path), clip) == str(tmp_path / rel)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_written_files_get_the_permissions_of_an_ordinary_open(tmp_path, umask, mode):
    """pkl clips, lists and probe caches are shared between the accounts of a cluster: mkstemp's 0600
    must not leak into them."""
    from common.files import write_atomic

    old = os.umask(umask)
    try:
        write_pkl(str(tmp_path / "c.pkl"), "c", 0, [b"\xff\xd8x\xff\xd9"])
        write_atomic(str(tmp_path / "train.list"), b"c.pkl\n")
    finally:
        os.umask(old)
    for name in ("c.pkl", "train.list"):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode


def test_csv_fields_that_would_lead_outside_the_folders_are_listed_failures(tmp_path):
    src = tmp_path / "src" / "a"
    src.mkdir(parents=True)
    write_video(src / "good0000001_000000_000010.mp4", index_frames(12))
    (tmp_path / "src" / "zz_000000_000010.mp4").write_bytes((src / "good0000001_000000_000010.mp4").read_bytes())
    csv = tmp_path / "k.csv"
    csv.write_text(
        HEADER + "a,good0000001,0,10,train\na,../zz,0,10,train\n../src,good0000001,0,10,train\na,..,0,10,train\n"
    )
    out = tmp_path / "deep" / "out"
    assert video2pkl.main([str(csv), str(tmp_path / "src"), str(out), "1", "--label-file", str(_labels(tmp_path))]) == 1
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.pkl"))
    assert written == ["deep/out/good0000001_000000_000010.pkl"]
    failures = (tmp_path / "deep" / "out.failures.txt").read_text().splitlines()
    assert len(failures) == 3 and all("not a plain file name" in f for f in failures)


def _labels(tmp_path):
    (tmp_path / "labels.txt").write_text("0 a\n")
    return tmp_path / "labels.txt"


@pytest.mark.parametrize(
    "option,message",
    [
        (["--short-side", "0"], "--short-side must be a number of pixels >= 2, got 0"),
        (["--fps", "0"], "--fps must be a number of frames per second > 0"),
        (["--fps", "nan"], "--fps must be"),
        (["--jpeg-quality", "1"], "--jpeg-quality must be in 2..31"),
    ],
)
def test_numeric_options_out_of_range_exit_2_before_any_work(tmp_path, capsys, option, message):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "vid00000001_000000_000010.mp4", index_frames(6))
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "a,vid00000001,0,10,train\n")
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "o"), "1", *option]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.list").exists()


def test_a_csv_saved_by_excel_converts_and_another_encoding_names_the_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "vid00000001_000000_000010.mp4", index_frames(6))
    csv = tmp_path / "k.csv"
    csv.write_bytes(("\ufeff" + HEADER + "a,vid00000001,0,10,train\n").replace("\n", "\r\n").encode())
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "o"), "1"]) == 0
    assert (tmp_path / "o" / "vid00000001_000000_000010.pkl").exists()
    csv.write_bytes((HEADER + "caf\u00e9,vid00000001,0,10,train\n").encode("latin-1"))
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "o2"), "1"]) == 2
    assert "k.csv:2: not UTF-8 text (byte 0xe9); save the file as UTF-8" in capsys.readouterr().err
