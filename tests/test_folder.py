"""Folders and lists of videos (trainer/folder.py): decoded in the loader's workers, unreadable files
skipped and listed, resumed from the output, per-class report for labelled lists; and predict's outputs
and inputs that used to fail late (issue rows: a missing output folder, an empty list, a directory)."""

import csv

import numpy as np
import pytest

from tools.media import write_gop_video
from trainer import folder, main


@pytest.fixture
def argv(predict_argv):
    return [*predict_argv, "-o", "PIPELINE.short_size=40", "-o", "DATASET.batch_size=2", "-o", "DATASET.num_workers=1"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder of 3 videos of different lengths, a text file and a broken .mp4."""
    d = tmp_path_factory.mktemp("videos")
    for name, n in (("a.mp4", 20), ("b.mp4", 31), ("sub/c.mp4", 26)):
        (d / name).parent.mkdir(exist_ok=True)
        write_gop_video(d / name, n)
    (d / "notes.txt").write_text("not a video")
    (d / "broken.mp4").write_bytes(b"\0" * 100)
    return d


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _single(argv, video, tmp_path, capsys):
    """{class: probability} of one video through the single-clip path."""
    out = tmp_path / f"single-{video.stem}.csv"
    assert main.main([*argv, "--input", str(video), "--output", str(out)]) == 0
    capsys.readouterr()
    return {r[2]: float(r[3]) for r in _rows(out)[1:]}


def test_a_folder_scores_its_videos_lists_the_rest_and_pairs_each_score_with_its_video(videos, argv, tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "predictions.csv"  # the folder does not exist yet
    assert main.main([*argv, "--input", str(videos), "--output", str(out)]) == 0
    captured = capsys.readouterr()
    rows = _rows(out)
    assert rows[0] == ["video", "rank", "class", "probability"]
    scored = sorted({r[0] for r in rows[1:]})
    assert scored == sorted(str(videos / n) for n in ("a.mp4", "b.mp4", "sub/c.mp4"))
    assert "3 video(s) scored" in captured.out and "files/s" in captured.out
    skipped = {r[0]: r[1] for r in _rows(f"{out}.skipped.csv")[1:]}
    assert set(skipped) == {str(videos / "notes.txt"), str(videos / "broken.mp4")}
    assert (
        "not a video file" in skipped[str(videos / "notes.txt")] and "broken.mp4" in skipped[str(videos / "broken.mp4")]
    )
    # a skipped file in the middle shifts nothing: each video's scores are its own single-clip scores
    for name in ("b.mp4", "sub/c.mp4"):
        single = _single(argv, videos / name, tmp_path, capsys)
        mine = {r[2]: float(r[3]) for r in rows[1:] if r[0] == str(videos / name)}
        assert mine.keys() == single.keys() and all(abs(mine[k] - single[k]) < 2e-5 for k in mine)


def test_a_rerun_resumes_and_a_video_cut_short_by_a_stop_is_redone(videos, argv, tmp_path, capsys):
    out = tmp_path / "p.csv"
    assert main.main([*argv, "--input", str(videos), "--output", str(out), "--top-k", "2"]) == 0
    first = _rows(out)
    capsys.readouterr()
    assert main.main([*argv, "--input", str(videos), "--output", str(out), "--top-k", "2"]) == 0
    assert "3 of 4 video(s) are already in" in capsys.readouterr().out  # the broken one is tried again
    assert _rows(out) == first  # nothing redone, nothing doubled
    # a stop mid-write leaves the last video with one of its two rows: it is scored again
    out.write_text("\n".join(",".join(r) for r in first[:-1]) + "\n")
    assert main.main([*argv, "--input", str(videos), "--output", str(out), "--top-k", "2"]) == 0
    assert "2 of 4 video(s) are already in" in capsys.readouterr().out
    again = _rows(out)
    assert sorted(map(tuple, again[1:])) == sorted(map(tuple, first[1:]))


def test_a_labelled_list_gets_accuracy_and_a_per_class_report(videos, argv, tmp_path, capsys):
    lst = tmp_path / "val.txt"
    lst.write_text(f"{videos / 'a.mp4'} 1\n{videos / 'b.mp4'} 31 2\n{videos / 'sub/c.mp4'} 2\n")
    out = tmp_path / "val_pred.csv"
    assert main.main([*argv, "--input", str(lst), "--output", str(out)]) == 0
    text = capsys.readouterr().out
    top1 = {r[0]: r[2] for r in _rows(out)[1:] if r[1] == "1"}
    truth = {str(videos / "a.mp4"): "class1", str(videos / "b.mp4"): "class2", str(videos / "sub/c.mp4"): "class2"}
    accuracy = np.mean([top1[v] == truth[v] for v in truth])
    assert f"top-1 {accuracy:.4f} on 3 labelled video(s)" in text
    import pandas as pd

    per_class = pd.read_csv(tmp_path / "val_pred.per_class.csv")
    assert list(per_class["class"]) == [f"class{i}" for i in range(5)] and list(per_class.support) == [0, 1, 2, 0, 0]
    assert (tmp_path / "val_pred.report.md").read_text().startswith("# Per-class report")


def test_predict_with_an_empty_list_is_one_line(tmp_path, argv, capsys):
    lst = tmp_path / "empty.txt"
    lst.write_text("# nothing yet\n\n")
    assert main.main([*argv, "--input", str(lst)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"predict: error: list file {lst} lists no videos; write one video path a line"
    ]


def test_a_folder_without_videos_is_one_line(tmp_path, argv, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("x")
    assert main.main([*argv, "--input", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "holds no videos" in err[0] and "1 other file(s)" in err[0]


def test_predict_output_into_a_missing_folder_is_created_before_the_work(videos, argv, tmp_path, capsys):
    out = tmp_path / "not" / "yet" / "one.csv"
    assert main.main([*argv, "--input", str(videos / "a.mp4"), "--output", str(out)]) == 0
    assert _rows(out)[0] == ["video", "rank", "class", "probability"]


def test_predict_output_that_cannot_be_written_is_refused_before_the_work(videos, argv, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    for source in (videos / "a.mp4", videos):
        assert main.main([*argv, "--input", str(source), "--output", str(tmp_path / "file" / "p.csv")]) == 1
        err = capsys.readouterr()
        assert err.err.strip().splitlines() == [
            f"predict: error: the folder of --output {tmp_path / 'file'} is not writable (File exists)"
        ]
        assert "scored" not in err.out and "1." not in err.out


def test_list_inputs_read_paths_with_spaces_labels_and_counts(tmp_path):
    lst = tmp_path / "in.txt"
    lst.write_text("my clip.mp4 3\n/abs/b.mp4 40 2\n")
    got = folder.list_inputs(str(lst))
    assert got.videos == [str(tmp_path / "my clip.mp4"), "/abs/b.mp4"] and got.labels == [3, 2]
    lst.write_text("a.mp4\nb.mp4 1\n")
    assert folder.list_inputs(str(lst)).labels is None  # not every line is labelled


def test_an_output_inside_the_folder_is_not_taken_for_input(tmp_path):
    d = tmp_path / "v"
    d.mkdir()
    for name in ("a.mp4", "pred.csv", "pred.csv.skipped.csv", "pred.per_class.csv", "pred.report.md", "x.txt"):
        (d / name).write_bytes(b"")
    got = folder.folder_inputs(str(d), str(d / "pred.csv"))
    assert got.videos == [str(d / "a.mp4")] and got.not_videos == [str(d / "x.txt")]
