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
