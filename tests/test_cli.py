"""Command-line values of run_dist.sh and trainer/main.py: each bad one is one line, before any work; every
command line's --help."""

import configparser
import json
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


# ---------------------------------------------------------------- --help, everywhere


def test_run_dist_help_exits_0_on_stdout_naming_every_mode_and_trainer_option():
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "--help"], capture_output=True, text=True, timeout=60
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    for mode in (*main.MODES, "selftest"):
        assert f"\n  {mode} " in proc.stdout, mode
    launch_options = ("--nproc", "--gpus", "--max-restarts", "--ips", "--host", "--rendezvous-timeout")
    missing = [o for o in launch_options if f" {o} " not in proc.stdout]
    for action in main.build_parser()._actions:  # CONFIG is run_dist.sh's third word, not an option
        if action.option_strings and action.dest not in ("help", "config"):
            if not any(f" {o} " in proc.stdout for o in action.option_strings):
                missing.append(action.option_strings[-1])
    assert not missing, f"run_dist.sh --help does not describe {missing}"


def test_the_trainer_describes_itself_once_and_every_argument():
    parser = main.build_parser()
    text = parser.format_help()
    assert text.count(main.__doc__.split("\n\n")[0]) == 1
    assert [a.dest for a in parser._actions if not a.help] == []


# Run in one child process: each command line's --help through runpy, noting each parser it builds
_HELP_WALK = r"""
import argparse, contextlib, io, json, runpy, sys
found, parse = {}, argparse.ArgumentParser.parse_known_args
for line in sys.argv[1:]:
    path, *words = line.split(" ")
    parsers = []
    def spy(self, *args, **kwargs):
        parsers.append(self)
        return parse(self, *args, **kwargs)
    argparse.ArgumentParser.parse_known_args = spy
    sys.argv, out, err, code = [path, *words, "--help"], io.StringIO(), io.StringIO(), None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as e:
            code = e.code
    bare = [a.option_strings[-1] if a.option_strings else a.dest for p in parsers for a in p._actions if not a.help]
    found[line] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "bare": bare}
print(json.dumps(found))
"""
COMMAND_LINES = (
    *sorted(
        f"preprocessing/{name}"
        for name in os.listdir(os.path.join(ROOT, "preprocessing"))
        if name.endswith(".py") and "\ndef main(" in open(os.path.join(ROOT, "preprocessing", name)).read()
    ),
    "preprocessing/merge_shards.py",
    "trainer/main.py",
    "trainer/main.py compare",
    "tools/selftest.py",
    "launch/hosts.py",
    "launch/ranks.py",
    "launch/mpi_train.py",
    "common/exits.py",
    *sorted(f"benchmarks/{name}" for name in os.listdir(os.path.join(ROOT, "benchmarks")) if name.endswith(".py")),
)


@pytest.mark.slow
def test_every_command_line_helps_on_stdout_and_describes_every_argument(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_WALK, *(os.path.join(ROOT, p) for p in COMMAND_LINES)],
        cwd=tmp_path,  # not the repo: the scripts find their packages from anywhere
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.splitlines()[-1])
    for path, seen in found.items():
        assert seen["code"] in (0, None) and seen["stdout"].strip(), (path, seen["stderr"][-1000:])
        assert seen["bare"] == [], f"{path}: no help text for {seen['bare']}"


def _console_scripts() -> list[tuple[str, str]]:
    parser = configparser.ConfigParser()
    parser.read(os.path.join(ROOT, "setup.cfg"))
    lines = parser["options.entry_points"]["console_scripts"].strip().splitlines()
    return [tuple(part.strip() for part in line.split("=")) for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("name, target", _console_scripts())
def test_each_console_script_helps_on_stdout(name, target, tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), name)
    assert os.path.isfile(script), f"{name} is not installed: run pip install -e . --no-deps (make setup does)"
    proc = subprocess.run([script, "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip(), (target, proc.stderr[-2000:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "command",
    [
        ["python", "preprocessing/video2pkl.py"],
        ["python", "trainer/main.py"],
        ["bash", "run_dist.sh"],
        ["bash", "run_dist.sh", "selftest"],
        ["python", "-m", "common.exits"],
    ],
)
def test_the_seeds_commands_run_from_the_repo_and_from_elsewhere(command, tmp_path):
    """The seeds' commands, by path from the repo root and from another folder (a script run by path has
    its own folder on sys.path, not the repo's)."""
    program = sys.executable if command[0] == "python" else command[0]
    for cwd, where in ((ROOT, ""), (str(tmp_path), ROOT + os.sep)):
        args = [program, *(a if a.startswith("-") or "." not in a else where + a for a in command[1:]), "--help"]
        if command[1] == "-m":  # a module: from the repo root only, or through the install
            args = [program, *command[1:], "--help"]
        proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and proc.stdout.strip() and "Traceback" not in proc.stderr, (args, proc.stderr)
