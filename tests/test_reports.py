"""Reports (trainer/reports.py): timeline tables and segments, per-class reports, the comparison of runs,
each against a computation written out here."""

import json

import numpy as np
import pandas as pd
import pytest

from trainer import main, reports
from trainer.timeline import Timeline

NAMES = ["walk", "run", "jump"]


def _timeline(top1: list[int], stride: float = 1.0, window: float = 2.0) -> Timeline:
    probs = []
    for c in top1:
        p = np.full(3, 0.2, np.float32)
        p[c] = 0.6
        probs.append(p)
    starts = [j * stride for j in range(len(top1))]
    return Timeline("v.mp4", 25.0, f"{window:g}s", f"{stride:g}s", NAMES, starts, [s + window for s in starts], probs)


def test_each_class_in_the_timeline_table_stands_beside_its_own_score():
    tl = _timeline([0, 1])
    tl.probs[0] = np.array([0.1, 0.3, 0.6], np.float32)
    table = reports.timeline_table(tl, top_k=3)
    assert list(table.iloc[0][["class_1", "class_2", "class_3"]]) == ["jump", "run", "walk"]
    assert list(table.iloc[0][["score_1", "score_2", "score_3"]]) == pytest.approx([0.6, 0.3, 0.1])
    assert list(table.columns[:3]) == ["window", "start_s", "end_s"]


def test_segments_merge_equal_windows_and_tile_the_video():
    segs = reports.segments_table(_timeline([0, 0, 0, 1, 1, 1, 1]), min_length=0)
    # a window owns the time between the midpoints of its centre and its neighbours' centres
    assert segs[["start_s", "end_s", "class", "windows"]].values.tolist() == [[0, 3.5, "walk", 3], [3.5, 8, "run", 4]]


def test_segments_shorter_than_the_minimum_join_the_neighbour_that_scores_higher_over_them():
    tl = _timeline([0, 0, 0, 2, 1, 1, 1])
    tl.probs[3] = np.array([0.35, 0.05, 0.6], np.float32)  # there 'walk' (left) scores above 'run' (right)
    segs = reports.segments_table(tl, min_length=2.0)
    assert segs[["class", "windows"]].values.tolist() == [["walk", 4], ["run", 3]]
    assert segs.start_s.iloc[0] == 0 and segs.end_s.iloc[-1] == 8 and segs.end_s.iloc[0] == segs.start_s.iloc[1]
    tl.probs[3] = np.array([0.05, 0.35, 0.6], np.float32)
    assert reports.segments_table(tl, min_length=2.0)[["class", "windows"]].values.tolist() == [["walk", 3], ["run", 4]]


def test_a_timeline_of_one_class_is_one_segment_whatever_the_minimum():
    segs = reports.segments_table(_timeline([2, 2, 2]), min_length=100)
    assert segs[["class", "windows"]].values.tolist() == [["jump", 3]]


def test_the_class_report_matches_counts_written_out():
    true = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    per_class, pairs = reports.class_report(true, pred, NAMES)
    # walk: 2 of 3 found, both predictions right; run: 1 of 2, 1 of 2 predictions; jump: 1 of 1, 1 of 2
    assert per_class.precision.tolist() == pytest.approx([1.0, 0.5, 0.5])
    assert per_class.recall.tolist() == pytest.approx([2 / 3, 0.5, 1.0])
    assert per_class.support.tolist() == [3, 2, 1] and per_class.predicted.tolist() == [2, 2, 2]
    assert pairs.values.tolist() == [["run", "jump", 1], ["walk", "run", 1]]


def test_the_class_report_is_written_as_csv_and_markdown(tmp_path):
    paths = reports.write_class_report(np.array([0, 1]), np.array([0, 0]), NAMES, str(tmp_path / "r"))
    assert pd.read_csv(paths[0]).shape == (3, 6)
    md = open(paths[2]).read()
    assert "top-1 accuracy 0.5000" in md and "| walk | 0.5000 | 1.0000 |" in md and "| run | walk | 1 |" in md


def _run(tmp_path, name, lr, top1s, wall, depth=18):
    d = tmp_path / name
    d.mkdir()
    records = [{"mode": "train", "epoch": e + 1, "step": e, "time": 100.0 + e} for e in range(len(top1s))]
    records += [
        {"mode": "val", "epoch": e + 1, "top1": t, "top5": t + 0.1, "time": 100.5 + e} for e, t in enumerate(top1s)
    ]
    records.append({"mode": "summary", "wall_s": wall, "data_wait_share": 0.25, "time": 200.0})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (d / "config.yaml").write_text(
        f"seed: 0\noutput_dir: {d}\nMODEL:\n  backbone: {{depth: {depth}}}\nOPTIMIZER:\n  base_lr: {lr}\n"
    )
    return str(d)


def test_compare_shows_final_metrics_and_only_the_config_keys_that_differ(tmp_path):
    a = _run(tmp_path, "a", 0.01, [0.3, 0.5, 0.4], 60.0)
    b = _run(tmp_path, "b", 0.02, [0.6, 0.55], 30.0)
    table = reports.compare_runs([a, b])
    assert table.run.tolist() == [b, a]  # best top-1 first
    assert table.best_top1.tolist() == [0.6, 0.5] and table.top5.tolist() == pytest.approx([0.7, 0.6])
    assert table.epochs.tolist() == [2, 3] and table.best_epoch.tolist() == [1, 2]
    assert table.wall_s.tolist() == [30.0, 60.0] and table.data_wait_share.tolist() == [0.25, 0.25]
    config_columns = [c for c in table.columns if "." in c or c in ("seed", "output_dir")]
    assert config_columns == ["OPTIMIZER.base_lr"]  # seed, depth and the folder itself do not differ
    assert reports.compare_runs([a, b], sort="wall_s").run.tolist() == [b, a]


def test_compare_from_the_command_line_writes_csv_and_markdown(tmp_path, capsys):
    a = _run(tmp_path, "a", 0.01, [0.3], 10.0)
    b = _run(tmp_path, "b", 0.01, [0.4], 10.0, depth=50)
    assert main.main(["compare", a, b, "--csv", str(tmp_path / "t.csv"), "--markdown", str(tmp_path / "t.md")]) == 0
    out = capsys.readouterr().out
    assert "MODEL.backbone.depth" in out and "OPTIMIZER.base_lr" not in out
    assert pd.read_csv(tmp_path / "t.csv").shape[0] == 2 and (tmp_path / "t.md").read_text().startswith("| run |")


def test_compare_of_a_folder_without_a_run_is_one_line(tmp_path, capsys):
    assert main.main(["compare", str(tmp_path)]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"compare: error: {tmp_path}/metrics.jsonl does not exist; give output folders of training runs"
    ]
