import os

from clipdata.lists import read_label_file, read_list
from preprocessing import build_list, split_dataset, ucf101_lists, vid2img
from tools.media import index_frames, write_video


def _touch_videos(root, per_class):
    for cls, n in per_class.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            (root / cls / f"{cls}_{i:02d}.mp4").write_bytes(b"not probed")


def _lines(path):
    return path.read_text().splitlines()


def test_split_is_stratified_disjoint_complete_and_reproducible(tmp_path):
    _touch_videos(tmp_path / "clips", {"cat": 10, "dog": 20, "eel": 7})
    out = tmp_path / "out"
    assert split_dataset.main([str(tmp_path / "clips"), str(out), "--ratios", "0.6", "0.2", "0.2", "--seed", "3"]) == 0
    assert read_label_file(str(out / "label.txt")) == ["cat", "dog", "eel"]
    splits = {s: read_list(str(out / f"{s}.list"), "videos", check_exists=True) for s in ("train", "val", "test")}
    per_class = {s: [sum(1 for x in v if x.label == c) for c in range(3)] for s, v in splits.items()}
    assert per_class == {"train": [6, 12, 4], "val": [2, 4, 2], "test": [2, 4, 1]}
    paths = [x.path for v in splits.values() for x in v]
    assert len(paths) == len(set(paths)) == 37
    first = {s: _lines(out / f"{s}.list") for s in splits}
    split_dataset.main([str(tmp_path / "clips"), str(out), "--ratios", "0.6", "0.2", "0.2", "--seed", "3"])
    assert {s: _lines(out / f"{s}.list") for s in splits} == first
    split_dataset.main([str(tmp_path / "clips"), str(out), "--ratios", "0.6", "0.2", "0.2", "--seed", "4"])
    assert {s: _lines(out / f"{s}.list") for s in splits} != first


def test_split_rejects_bad_ratios_and_empty_classes(tmp_path, capsys):
    _touch_videos(tmp_path / "clips", {"cat": 3})
    assert split_dataset.main([str(tmp_path / "clips"), str(tmp_path / "o"), "--ratios", "0.9", "0.2"]) == 2
    assert "add up to 1" in capsys.readouterr().err
    assert split_dataset.main([str(tmp_path / "clips"), str(tmp_path / "o"), "--probe", "-1"]) == 2
    assert "--probe takes a number of processes >= 0" in capsys.readouterr().err
    assert build_list.main(["videos", str(tmp_path / "clips"), str(tmp_path / "l.list"), "--probe", "-2"]) == 2
    assert "--probe and --index take a number of processes >= 0" in capsys.readouterr().err
    (tmp_path / "clips" / "empty").mkdir()
    assert split_dataset.main([str(tmp_path / "clips"), str(tmp_path / "o")]) == 2
    assert "hold no videos" in capsys.readouterr().err


def test_video_list_with_probed_frame_counts(tmp_path, capsys):
    from tools.media import damaged_video

    for cls, n in (("b", 9), ("a", 14)):
        (tmp_path / "v" / cls).mkdir(parents=True)
        write_video(tmp_path / "v" / cls / "x.mp4", index_frames(n))
    (tmp_path / "v" / "a" / "broken.mp4").write_bytes(b"garbage" * 10)
    damaged_video(tmp_path / "v" / "b" / "cut.mp4")  # decodes, then fails mid-way: not a whole clip
    out = tmp_path / "videos.list"
    assert build_list.main(["videos", str(tmp_path / "v"), str(out), "--probe", "2"]) == 1
    assert _lines(out) == ["v/a/x.mp4 14 0", "v/b/x.mp4 9 1"]
    err = capsys.readouterr().err
    assert "skipped" in err and "cut.mp4: decoding fails after" in err and "broken.mp4" in err
    assert build_list.main(["videos", str(tmp_path / "v"), str(out)]) == 0
    assert _lines(out) == ["v/a/broken.mp4 0", "v/a/x.mp4 0", "v/b/cut.mp4 1", "v/b/x.mp4 1"]


def test_pkl_and_rawframes_lists(tmp_path, demo_dataset):
    out = tmp_path / "pkl.list"
    assert build_list.main(["pkl", str(demo_dataset / "val_pkl"), str(out)]) == 0
    samples = read_list(str(out), "pkl")
    assert len(samples) == 12 and all(s.path.endswith(".pkl") for s in samples)
    label_file = str(demo_dataset / "label.txt")
    csv = str(demo_dataset / "kinetics_demo_val.csv")
    assert (
        vid2img.main([csv, str(demo_dataset / "val"), str(tmp_path / "frames"), "2", "--label-file", label_file]) == 0
    )
    out = tmp_path / "frames_rebuilt.list"
    assert (
        build_list.main(["rawframes", str(tmp_path / "frames"), str(out), "--csv", csv, "--label-file", label_file])
        == 0
    )
    assert sorted(_lines(out)) == sorted(_lines(tmp_path / "frames.list"))


def test_ucf101_official_splits_become_lists(tmp_path, capsys):
    ucf, splits = tmp_path / "UCF-101", tmp_path / "ucfTrainTestlist"
    _touch_videos(ucf, {"ApplyEyeMakeup": 0, "Archery": 0})
    for rel in (
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi",
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi",
        "Archery/v_Archery_g08_c01.avi",
    ):
        (ucf / rel).write_bytes(b"x")
    splits.mkdir()
    (splits / "classInd.txt").write_text("1 ApplyEyeMakeup\n2 Archery\n")
    (splits / "trainlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g08_c01.avi 1\nArchery/v_Archery_g08_c01.avi 2\n"
    )
    (splits / "testlist01.txt").write_text(
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi\nArchery/v_Archery_g01_c01.avi\n"
    )
    out = tmp_path / "lists"
    assert ucf101_lists.main([str(ucf), str(splits), str(out)]) == 1  # one test video is missing
    assert "missing" in capsys.readouterr().err
    assert read_label_file(str(out / "ucf101_label.txt")) == ["ApplyEyeMakeup", "Archery"]
    train = read_list(str(out / "ucf101_train_split_1_videos.list"), "videos")
    test = read_list(str(out / "ucf101_test_split_1_videos.list"), "videos")
    assert [(os.path.basename(s.path), s.label) for s in train] == [
        ("v_ApplyEyeMakeup_g08_c01.avi", 0),
        ("v_Archery_g08_c01.avi", 1),
    ]
    assert [(os.path.basename(s.path), s.label) for s in test] == [("v_ApplyEyeMakeup_g01_c01.avi", 0)]
    (splits / "trainlist01.txt").write_text("Archery/v_Archery_g08_c01.avi 1\n")
    assert ucf101_lists.main([str(ucf), str(splits), str(out)]) == 2
    assert "disagrees with class Archery" in capsys.readouterr().err
