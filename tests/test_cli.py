"""Command-line values of run_dist.sh and trainer/main.py: each bad one is one line, before any work."""

import os
import shutil
import subprocess
import sys

import pytest

from launch import ranks
from trainer import main, predict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("value", ["0", "x", "-1", "1.5"])
def test_run_dist_rejects_a_bad_process_count_before_launching(value):
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", "configs/tsn_demo.yaml", "--nproc", value],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"run_dist.sh: --nproc must be a number of processes >= 1, got '{value}'"


def test_run_dist_usage_lists_the_modes_and_nothing_else():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "frobnicate", "TSN", "configs/tsn_demo.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown mode 'frobnicate'" in proc.stderr and "set -e" not in proc.stderr


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_top_k_takes_a_positive_integer(value, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(["predict", "-c", "c.yaml", "--top-k", value])
    assert e.value.code == 2
    assert f"argument --top-k: expected an integer >= 1, got '{value}'" in capsys.readouterr().err


def test_predict_input_lists_take_every_list_format_and_editor(tmp_path):
    lst = tmp_path / "in.txt"
    lst.write_bytes("\ufeffmy clip.mp4\r\n# a comment\r\nb.mp4 3\r\nc d.mp4 40 3\r\n\r\n".encode())
    assert predict._inputs(str(lst)) == ["my clip.mp4", "b.mp4", "c d.mp4"]
    lst.write_bytes("caf\u00e9.mp4\n".encode("latin-1"))
    with pytest.raises(Exception, match=r"in.txt:1: not UTF-8 text"):
        predict._inputs(str(lst))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--train-per-class", "0"], "take a number >= 1"),
        (["--val-per-class", "-1"], "take a number >= 1"),
        (["--jobs", "0"], "take a number >= 1"),
        (["--min-frames", "50", "--max-frames", "10"], "1 <= --min-frames <="),
    ],
)
def test_the_demo_maker_rejects_counts_below_one(tmp_path, args, message, capsys):
    from preprocessing import make_demo_dataset

    with pytest.raises(SystemExit) as e:
        make_demo_dataset.main([str(tmp_path / "demo"), *args])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize(
    "nproc, ngpu, expected",
    [
        (None, 0, (2, "cpu")),  # no GPU: 2 CPU processes
        (5, 0, (5, "cpu")),  # any number of CPU processes
        (None, 1, (1, "0")),  # the demo on a one-GPU host runs on that GPU
        (None, 8, (8, "0,1,2,3,4,5,6,7")),  # one rank per GPU
        (2, 8, (2, "0,1")),
    ],
)
def test_run_dist_ranks_default_to_the_gpus_present(nproc, ngpu, expected):
    assert ranks.plan(nproc, ngpu) == expected


def test_run_dist_refuses_more_gpu_ranks_than_gpus_in_one_line():
    with pytest.raises(ValueError) as e:
        ranks.plan(2, 1)
    assert str(e.value) == (
        "--nproc 2 asks for 2 GPU ranks but this host has 1 GPU (CUDA_VISIBLE_DEVICES counts): "
        "use --nproc 1 or less, or leave --nproc out"
    )


def test_ranks_command_prints_the_plan_of_this_host():
    proc = subprocess.run(
        [sys.executable, "-m", "launch.ranks", "--nproc", "3"],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # this machine's Paddle decides: CPU builds (CI) give "3 cpu"; a GPU host with >= 3 GPUs "3 0,1,2"
    n_gpu = ranks.gpu_count()
    if n_gpu == 0:
        assert (proc.returncode, proc.stdout) == (0, "3 cpu keep\n")
    elif n_gpu >= 3:
        assert (proc.returncode, proc.stdout) == (0, "3 0,1,2 keep\n")
    else:
        assert proc.returncode == 2 and proc.stderr.startswith("run_dist.sh: --nproc 3 asks for 3 GPU ranks")


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_takes_the_trt_extra_with_a_gpu_line_and_refuses_it_without(tmp_path):
    def make(*args):
        return subprocess.run(
            ["make", "-n", "setup", *args, f"VENV={tmp_path / 'venv'}"], cwd=ROOT, capture_output=True, text=True
        )

    ok = make("GPU=cu126", "EXTRAS=gpu,trt,dev")
    assert ok.returncode == 0, ok.stderr
    assert 'packages/stable/cu126/ -e ".[gpu,trt,dev]"' in ok.stdout
    refused = make("EXTRAS=cpu,trt")
    assert refused.returncode != 0 and "say which CUDA line with GPU=cu126 or GPU=cu129" in refused.stderr


def test_paddlevideo_spellings_that_map_one_to_one_are_rewritten():
    from trainer.spellings import translate

    argv = ["train", "-c", "c.yaml", "--amp", "--validate", "-w", "w.pdparams", "--seed=7", "--use_gpu=False"]
    assert translate(argv) == [
        "train", "-c", "c.yaml", "-o", "amp=true", "--validate", "--weights", "w.pdparams", "-o", "seed=7",
        "-o", "device=cpu",
    ]  # fmt: skip
    argv = ["predict", "-c", "c.yaml", "-i", "a.avi", "--use_tensorrt", "True", "--opset_version", "11", "-o", "x=1"]
    assert translate(argv) == [
        "predict", "-c", "c.yaml", "--input", "a.avi", "--backend", "tensorrt", "--opset", "11", "-o", "x=1",
    ]  # fmt: skip
    args = main.parse_args(["train", "-c", "c.yaml", "--amp", "-o", "epochs=1", "--validate"])
    assert args.override == ["amp=true", "epochs=1"] and args.validate


@pytest.mark.parametrize(
    "argv, instead",
    [
        (["--model_file", "m.pdmodel"], "write --exported DIR"),
        (["--test"], "write the mode: bash run_dist.sh test MODEL CONFIG --weights W"),
        (["--gpus", "0,1"], "--gpus is run_dist.sh's"),
        (["--amp_level", "O2"], "AMP here is level O1"),
        (["--use_gpu", "maybe"], "expected True or False, got 'maybe'"),
    ],
)
def test_paddlevideo_spellings_without_a_counterpart_say_what_to_write_in_one_line(argv, instead, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(["predict", "-c", "c.yaml", *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and instead in err and err.count("\n") == 1 and err.startswith("main.py: " + argv[0])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--backend", "onnx"], "--backend onnx runs an exported model: add --exported DIR"),
        (["--exported", "d", "--backend", "tflite"], "argument --backend: invalid choice: 'tflite'"),
        (["--opset", "22"], "argument --opset: expected an ONNX opset from 7 to 21, got '22'"),
    ],
)
def test_deployment_options_are_checked_before_any_work(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main.parse_args(["predict", "-c", "c.yaml", *argv])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_validate_without_a_validation_list_says_which_key_to_set(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n")
    assert main.main(["train", "-c", str(cfg), "--validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("config error: --validate evaluates DATASET.val_list") and "-o DATASET.val_list=PATH" in err


def test_run_dist_gpus_on_a_host_without_gpus_is_one_line():
    if ranks.gpu_count():
        pytest.skip("this host has GPUs")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", "configs/tsn_demo.yaml", "--gpus=0,1,2,3"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "run_dist.sh: --gpus 0,1,2,3: this host has no GPU that Paddle can use; leave --gpus out "
        "(--nproc N sets the CPU processes)\n"
    )


def test_run_dist_refuses_a_paddlevideo_spelling_once_before_starting_ranks():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", "configs/tsn_demo.yaml", "--test"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == (
        "run_dist.sh: --test (PaddleVideo's spelling): write the mode: bash run_dist.sh test MODEL CONFIG --weights W\n"
    )
