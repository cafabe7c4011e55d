"""Long videos as timelines (trainer/timeline.py): windows planned over every frame, each frame decoded at
most once and exactly as independent decoding gives it, the model's own sampling and test transform."""

import argparse
import glob
import os

import numpy as np
import pytest

from dali_pipelines import windows
from tools.media import write_gop_video
from trainer import clip_scorer, main, timeline

from .tiny import ROOT

pytestmark = pytest.mark.usefixtures("no_parent_link")


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return write_gop_video(tmp_path_factory.mktemp("tl") / "long.mp4", 300)


@pytest.fixture
def tiny(predict_argv):
    """(argv prefix of predict with a tiny model at 32 px, label names)."""
    argv = [*predict_argv, "-o", "PIPELINE.short_size=40", "-o", "PIPELINE.test_num_segments=4"]
    return argv, [f"class{i}" for i in range(5)]


def test_spans_take_seconds_or_frames_and_refuse_zero():
    assert timeline.parse_span("10s") == timeline.Span(10.0, "s")
    assert timeline.parse_span("250") == timeline.Span(250, "f") == timeline.parse_span("250f")
    assert timeline.parse_span("2.5s").frames(30) == 75
    for bad in ("0", "0s", "-5s", "x", "nans", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError, match="expected seconds > 0"):
            timeline.parse_span(bad)


def test_a_stride_of_zero_is_one_line_from_the_command_line(capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(["predict", "-c", "c.yaml", "--input", "x.mp4", "--window", "10s", "--stride", "0"])
    assert e.value.code == 2
    assert "argument --stride: expected seconds > 0 (e.g. 10s) or a number of frames >= 1" in capsys.readouterr().err


def test_windows_cover_every_frame_and_a_window_longer_than_the_video_is_refused():
    assert timeline.plan_windows(100, 40, 30) == [(0, 40), (30, 70), (60, 100)]
    assert timeline.plan_windows(100, 40, 20) == [(0, 40), (20, 60), (40, 80), (60, 100)]
    assert timeline.plan_windows(105, 40, 30) == [(0, 40), (30, 70), (60, 100), (65, 105)]
    assert timeline.plan_windows(40, 40, 7) == [(0, 40)]
    with pytest.raises(timeline.TimelineError, match="longer than the video"):
        timeline.plan_windows(39, 40, 7)


def test_a_window_as_long_as_the_video_scores_exactly_what_single_clip_predict_gives(tmp_path, tiny, capsys):
    argv, names = tiny
    video = write_gop_video(tmp_path / "clip.mp4", 40)
    assert main.main([*argv, "--input", video, "--top-k", "5", "--output", str(tmp_path / "one.csv")]) == 0
    one = {row.split(",")[2]: float(row.split(",")[3]) for row in (tmp_path / "one.csv").read_text().splitlines()[1:]}
    out = tmp_path / "tl"
    assert main.main([*argv, "--input", video, "--window", "40", "--stride", "40", "--output", str(out)]) == 0
    import pandas as pd

    table = pd.read_csv(out / "timeline.csv")
    assert list(table[["start_s", "end_s"]].iloc[0]) == [0.0, pytest.approx(1.6)]
    assert len(table) == 1
    got = {table[f"class_{r}"][0]: table[f"score_{r}"][0] for r in range(1, 6)}
    assert got.keys() == one.keys() and all(abs(got[k] - one[k]) < 2e-5 for k in one)
    assert "1 window(s) of 40 frames every 40 frames" in capsys.readouterr().out


def test_predict_window_writes_the_timeline_files(long_video, tmp_path, tiny):
    import json

    import pandas as pd

    argv, names = tiny
    out = tmp_path / "out" / "tl"
    assert main.main([*argv, "--input", long_video, "--window", "2s", "--stride", "1s", "--output", str(out)]) == 0
    table = pd.read_csv(out / "timeline.csv")
    assert len(table) == 11 and list(table.start_s) == [float(s) for s in range(11)]
    assert (table.end_s - table.start_s).round(6).eq(2.0).all()
    for r in range(1, 6):
        assert table[f"class_{r}"].isin(names).all()
    assert (table.score_1 >= table.score_2).all() and np.allclose(
        table[[f"score_{r}" for r in range(1, 6)]].sum(axis=1), 1
    )
    segs = pd.read_csv(out / "segments.csv")
    assert (
        segs.start_s.iloc[0] == 0
        and segs.end_s.iloc[-1] == 12
        and (segs.end_s.values[:-1] == segs.start_s.values[1:]).all()
    )
    doc = json.loads((out / "timeline.json").read_text())
    assert doc["fps"] == 25 and len(doc["windows"]) == 11 and doc["windows"][3]["top"][0][0] == table.class_1[3]
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_window_longer_than_the_video_is_one_line(long_video, tmp_path, tiny, capsys):
    argv, _ = tiny
    assert main.main([*argv, "--input", long_video, "--window", "13s", "--output", str(tmp_path / "tl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"predict: error: --window 13s (325 frames) is longer than {long_video} (300 frames, 12.00s at 25 fps); "
        "use --window 12s or less"
    ]


def test_a_timeline_folder_that_cannot_be_written_is_refused_before_the_work(long_video, tmp_path, tiny, capsys):
    argv, _ = tiny
    (tmp_path / "file").write_text("x")
    assert main.main([*argv, "--input", long_video, "--window", "2s", "--output", str(tmp_path / "file" / "tl")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the timeline folder" in err[0] and "is not writable" in err[0]


FAST = ("tsn_demo.yaml", "tsm.yaml", "pptsmv2.yaml")  # one of each family in the fast tier, the rest slow
CONFIGS = [
    pytest.param(c, id=os.path.basename(c), marks=() if os.path.basename(c) in FAST else pytest.mark.slow)
    for c in sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))
]


@pytest.mark.parametrize("config", CONFIGS)
def test_every_configured_model_scores_a_timeline(config, long_video):
    import paddle

    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.predict import dynamic_scorer

    overrides = ["MODEL.backbone.base_channels=8", "MODEL.backbone.pretrained=''", "PIPELINE.target_size=32"]
    cfg = load_config(config, [*overrides, "PIPELINE.short_size=40", "DATASET.label_file=''"])
    paddle.seed(0)
    spec = clip_scorer.clip_spec(cfg)
    index = windows.index_video(long_video)
    samples = [clip_scorer.window_indices(spec, s, e) for s, e in timeline.plan_windows(index.num_frames, 100, 100)]
    got = list(
        clip_scorer.score_clips(
            spec, dynamic_scorer(build_model(cfg)), windows.read_windows(index, samples[:2]), batch_size=2
        )
    )
    assert [j for j, _ in got] == [0, 1]
    assert all(row.shape == (cfg.MODEL.head.num_classes,) and np.isfinite(row).all() for _, row in got)


@pytest.mark.slow
def test_an_exported_model_scores_the_same_timeline_as_the_dynamic_model(long_video, tmp_path, tiny, capsys):
    import pandas as pd

    argv, _ = tiny
    export = ["export", *argv[1:], "--output", str(tmp_path / "inference")]
    assert main.main(export) == 0
    runs = {}
    for name, extra in (("dynamic", []), ("exported", ["--exported", str(tmp_path / "inference")])):
        out = tmp_path / name
        assert (
            main.main([*argv, *extra, "--input", long_video, "--window", "4s", "--stride", "2s", "--output", str(out)])
            == 0
        )
        runs[name] = pd.read_csv(out / "timeline.csv")
    a, b = runs["dynamic"], runs["exported"]
    assert (a.class_1 == b.class_1).all() and np.allclose(a.score_1, b.score_1, atol=1e-4)


def test_a_stop_midway_writes_the_windows_scored_so_far(long_video, tmp_path, cfg):
    import pandas as pd

    from trainer.models import build_model
    from trainer.predict import dynamic_scorer

    cfg.PIPELINE.update(target_size=32, short_size=40, test_num_segments=4)
    score, calls = dynamic_scorer(build_model(cfg)), []

    def stopped_on_the_second_batch(imgs):
        calls.append(imgs.shape[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(imgs)

    names = [f"class{i}" for i in range(5)]
    with pytest.raises(KeyboardInterrupt):
        timeline.run_timeline(
            cfg, stopped_on_the_second_batch, names, long_video, window=timeline.Span(2, "s"),
            stride=timeline.Span(1, "s"), out_dir=str(tmp_path / "tl"), top_k=3,
        )  # fmt: skip
    assert calls[0] == 6  # batches capped at a window's frames: 50 // (2 x 4 sampled)
    assert list(pd.read_csv(tmp_path / "tl" / "timeline.csv").start_s) == [0, 1, 2, 3, 4, 5]
    assert (tmp_path / "tl" / "timeline.png").is_file()
