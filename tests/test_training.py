"""Real processes: run_dist.sh -> paddle.distributed.launch -> 2 CPU ranks in fleet collective mode."""

import json
import os
import re
import subprocess
import sys

import pytest

from .tiny import tiny_config, weight_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, cwd, env_extra=None, timeout=600):
    env = {**os.environ, "PYTHON": sys.executable, **(env_extra or {})}
    return subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def trained(demo_dataset, tmp_path_factory):
    """Two epochs of a tiny TSN on the miniature demo dataset with 2 ranks."""
    work = tmp_path_factory.mktemp("run")
    cfg = tiny_config(work / "tiny.yaml", demo_dataset, work / "out", batch_size=4)
    result = _run(["train", "TSN", str(cfg), "--nproc", "2"], work, {"LOG_DIR": str(work / "log")})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return work, cfg, result


@pytest.mark.slow
def test_two_rank_training_ends_with_identical_weights_on_both_ranks(trained):
    work, _, result = trained
    digests = {}
    for rank in (0, 1):
        log = (work / "log" / f"workerlog.{rank}").read_text()
        digests[rank] = weight_digests(log)[str(rank)]
    assert digests[0] == digests[1]
    assert "SUMMARY val_top1=" in result.stdout


@pytest.mark.slow
def test_training_writes_metrics_jsonl_and_checkpoints(trained):
    work, _, _ = trained
    records = [json.loads(line) for line in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["mode"] == "train"]
    assert train and {"epoch", "step", "lr", "loss", "top1", "samples_per_s", "data_time", "batch_time"} <= set(
        train[0]
    )
    val = [r for r in records if r["mode"] == "val"]
    assert [r["epoch"] for r in val] == [1, 2] and all(r["samples"] == 12 for r in val)
    summary = [r for r in records if r["mode"] == "summary"][0]
    assert 0 <= summary["data_wait_share"] <= 1 and summary["train_samples_per_s"] > 0
    for name in ("best.pdparams", "latest.pdckpt", "config.yaml", "curves.png"):
        assert (work / "out" / name).is_file()
    import importlib.util

    if importlib.util.find_spec("visualdl"):
        assert any(f.startswith("vdlrecords") for f in os.listdir(work / "out" / "vdl"))


@pytest.mark.slow
def test_eval_reports_top1_top5_of_the_best_checkpoint_over_the_whole_val_set(trained):
    work, cfg, _ = trained
    result = _run(["eval", "TSN", str(cfg), "--nproc", "2"], work, {"LOG_DIR": str(work / "log_eval")})
    assert result.returncode == 0, result.stderr[-3000:]
    m = re.search(r"eval: top1 ([\d.]+) top5 ([\d.]+) .* on 12 clips", result.stdout)
    assert m, result.stdout[-2000:]
    records = [json.loads(x) for x in (work / "out" / "metrics.jsonl").read_text().splitlines()]
    best_val = max(r["top1"] for r in records if r["mode"] == "val")
    evaluated = [r for r in records if r["mode"] == "eval"][-1]
    assert evaluated["top1"] == best_val and evaluated["samples"] == 12
    assert abs(float(m.group(1)) - best_val) < 1e-4


@pytest.mark.slow
def test_eval_into_an_output_folder_that_does_not_exist_yet_keeps_its_results(trained):
    work, cfg, _ = trained
    fresh = work / "new" / "nested"
    result = _run(
        [
            "eval",
            "TSN",
            str(cfg),
            "--nproc",
            "2",
            "--weights",
            str(work / "out" / "best.pdparams"),
            "-o",
            f"output_dir={fresh}",
        ],
        work,
        {"LOG_DIR": str(work / "log_eval_new")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"eval: top1 [\d.]+ top5 [\d.]+ .* on 12 clips", result.stdout)
    assert (fresh / "eval_confusion.csv").is_file() and (fresh / "metrics.jsonl").is_file()


@pytest.mark.slow
def test_predict_prints_top5_class_names_with_probabilities_for_an_mp4(trained, demo_dataset):
    work, cfg, _ = trained
    video = sorted((demo_dataset / "val" / "pulsing_ring").glob("*.mp4"))[0]
    result = _run(["predict", "TSN", str(cfg), "--input", str(video), "--output", str(work / "pred.csv")], work)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\s+(\d)\. (\S+)\s+([\d.]+)$", result.stdout, re.M)
    names = (demo_dataset / "label.txt").read_text().split()[1::2]
    assert [int(r[0]) for r in rows] == [1, 2, 3, 4, 5]
    assert all(r[1] in names for r in rows) and len({r[1] for r in rows}) == 5
    probs = [float(r[2]) for r in rows]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0 + 1e-4
    csv_rows = (work / "pred.csv").read_text().splitlines()
    assert csv_rows[0] == "video,rank,class,probability" and len(csv_rows) == 6
    assert [r.split(",")[2] for r in csv_rows[1:]] == [r[1] for r in rows]


def test_config_typo_stops_run_dist_with_one_line(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(f"_base_: {ROOT}/configs/tsn_demo.yaml\nOPTIMIZER:\n  base_lr: 0.1\n  momentm: 0.9\n")
    result = _run(["predict", "TSN", str(cfg), "--input", "x.mp4"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"config error: unknown key 'OPTIMIZER.momentm' ({cfg}); did you mean 'momentum'? known keys here: "
        "momentum, nesterov, weight_decay, base_lr, base_batch_size, schedule, decay_points, decay_factor, "
        "warmup_epochs, warmup_start_lr, lr_mult, stage_lr_mult, grad_clip"
    ]


def test_predict_on_a_missing_video_names_it(predict_argv, tmp_path, capsys):
    from trainer import main

    assert main.main([*predict_argv, "--input", str(tmp_path / "nope.mp4")]) == 1
    assert "nope.mp4 does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_on_a_video_damaged_mid_way_is_an_error_not_a_confident_answer(trained, tmp_path):
    from tools.media import damaged_video

    work, cfg, _ = trained
    result = _run(["predict", "TSN", str(cfg), "--input", str(damaged_video(tmp_path / "bad.mp4"))], work)
    assert result.returncode == 1, result.stdout[-2000:]
    assert "bad.mp4: decoding fails after" in result.stderr and "1 of 1 video(s) could not be read" in result.stderr
    assert not re.findall(r"^\s+\d\. \S+\s+[\d.]+$", result.stdout, re.M)  # no class probabilities printed


@pytest.mark.slow
def test_multi_view_test_writes_per_class_accuracy_and_a_confusion_matrix(trained):
    work, cfg, _ = trained
    result = _run(
        [
            "test",
            "TSN",
            str(cfg),
            "--nproc",
            "2",
            "-o",
            "PIPELINE.test_num_clips=2",
            "-o",
            "PIPELINE.test_num_crops=3",
            "-o",
            "PIPELINE.test_num_segments=5",
        ],
        work,
        {"LOG_DIR": str(work / "log_test")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    m = re.search(
        r"test: top1 ([\d.]+) top5 [\d.]+ mean class accuracy ([\d.]+) .* on 12 clips "
        r"\(5 segment\(s\) x 2 clip\(s\) x 3 crop\(s\)",
        result.stdout,
    )
    assert m, result.stdout[-2000:]
    rows = (work / "out" / "test_confusion.csv").read_text().splitlines()
    names = rows[0].split(",")[1:]
    assert len(rows) == 7 and len(names) == 6
    matrix = [[int(v) for v in row.split(",")[1:]] for row in rows[1:]]
    assert sum(map(sum, matrix)) == 12 and all(sum(row) == 2 for row in matrix)  # 2 val clips per class
    assert abs(sum(matrix[i][i] for i in range(6)) / 12 - float(m.group(1))) < 1e-4
    per_class = (work / "out" / "test_per_class.csv").read_text().splitlines()
    accs = [float(line.split(",")[3]) for line in per_class[1:]]
    assert abs(sum(accs) / 6 - float(m.group(2))) < 1e-3
    assert (work / "out" / "test_confusion.png").stat().st_size > 1000


@pytest.mark.slow
def test_export_writes_an_inference_model_whose_scores_match_predict(trained, demo_dataset):
    work, cfg, _ = trained
    import importlib.util

    onnx = all(importlib.util.find_spec(m) for m in ("paddle2onnx", "onnxruntime"))
    check_list = demo_dataset / "val_pkl.list"  # real clips for the alignment table (export fails beyond 1e-4)
    export = ["export", "TSN", str(cfg), "--output", str(work / "exported"), "--check-list", str(check_list)]
    result = _run(export + (["--onnx", "--opset", "11"] if onnx else []), work)
    assert result.returncode == 0, result.stderr[-3000:]
    check = json.loads((work / "exported" / "export_check.json").read_text())
    rows = {r["key"]: r for r in check["backends"]}
    assert check["inputs"] == f"{rows['paddle_inference']['clips']} clips of {check_list}"
    assert rows["paddle_inference"]["clips"] > 1 and "Paddle Inference" in result.stdout
    if onnx:
        assert rows["onnxruntime"]["top1_agree"] == rows["onnxruntime"]["clips"] and "onnxruntime" in result.stdout
        assert (work / "exported" / "model.onnx").stat().st_size > 1000
    settings = json.loads((work / "exported" / "preprocessing.json").read_text())
    assert settings["input_shape"] == [None, 3, 3, 32, 32] and len(settings["class_names"]) == 6
    # `predict --exported` (Paddle Inference, preprocessing from preprocessing.json through the test
    # pipeline) and `predict` with the dynamic model agree on a real clip
    video = sorted((demo_dataset / "val" / "spinning_bar").glob("*.mp4"))[0]
    probs = {}
    runs = [("dynamic", []), ("exported", ["--exported", str(work / "exported")])]
    runs += [("onnx", ["--exported", str(work / "exported"), "--backend", "onnx"])] if onnx else []
    for name, extra in runs:
        result = _run(
            ["predict", "TSN", str(cfg), "--input", str(video), "--top-k", "6", "--output", str(work / f"{name}.csv")]
            + extra,
            work,
        )
        assert result.returncode == 0, result.stderr[-3000:]
        rows = (work / f"{name}.csv").read_text().splitlines()[1:]
        probs[name] = {row.split(",")[2]: float(row.split(",")[3]) for row in rows}
    assert "exported model" in result.stdout and ("(onnxruntime" if onnx else "(Paddle Inference)") in result.stdout
    assert set(probs["exported"]) == set(settings["class_names"])
    for name, p in probs["dynamic"].items():
        assert abs(p - probs["exported"][name]) < 1e-5
        assert not onnx or abs(p - probs["onnx"][name]) < 1e-5  # predict --backend onnx


@pytest.mark.slow
def test_predict_with_an_exported_folder_that_holds_no_model_says_how_to_export(trained, tmp_path):
    work, cfg, _ = trained
    (tmp_path / "preprocessing.json").write_text("{}")
    video = next((work / "out").parent.glob("*.yaml"))  # any existing file: the model check comes first
    result = _run(["predict", "TSN", str(cfg), "--input", str(video), "--exported", str(tmp_path)], work)
    assert result.returncode == 1 and "holds no exported model" in result.stderr
    assert "run_dist.sh export" in result.stderr


def test_an_empty_list_setting_is_a_one_line_config_error(tmp_path, capsys):
    from trainer import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"_base_: {ROOT}/configs/tsn_demo.yaml\noutput_dir: {tmp_path / 'out'}\nDATASET:\n  train_list: ''\n"
    )
    assert main.main(["train", "-c", str(cfg)]) == 2
    assert capsys.readouterr().err.strip().startswith("config error: DATASET.train_list is empty")
