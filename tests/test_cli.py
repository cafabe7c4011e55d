"""Command-line values of run_dist.sh and trainer/main.py: each bad one is one line, before any work."""

import os
import subprocess

import pytest

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
