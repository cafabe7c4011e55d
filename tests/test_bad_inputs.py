"""Bad inputs through the real command lines (trainer/main.py, the preprocessing tools), table-driven: each
ends in one line naming the file or key, no traceback, and nothing the user had is lost or changed.
docs/robustness.md "Bad inputs" lists them."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess

import pytest

from clipdata.pkl import write_pkl
from preprocessing import build_list, video2pkl
from tools.media import index_frames, jpeg
from trainer import main

from .tiny import ROOT, tiny_config


@pytest.fixture(scope="module")
def trained(demo_dataset, tmp_path_factory):
    """A config and its output folder after one epoch of the tiny model: best.pdparams, latest.pdckpt,
    epoch_1.pdckpt (save_interval 1)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    config = tiny_config(root / "tiny.yaml", demo_dataset, root / "out", epochs=1)
    with open(config, "a") as f:
        f.write("save_interval: 1\n")
    import paddle

    with paddle.utils.unique_name.guard():
        assert main.main(["train", "-c", config, "-o", "PRECISE_BN.enabled=false"]) == 0
    assert {"best.pdparams", "latest.pdckpt", "epoch_1.pdckpt"} <= set(os.listdir(root / "out"))
    return root, config


def _snapshot(folder) -> dict[str, str]:
    """What a user would lose: every file below ``folder`` by content (locks and logs aside)."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            if name.endswith((".lock", ".jsonl")) or "vdl" in dirpath:
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _cli(capfd, entry, argv) -> tuple[int, str, str]:
    """Run a command line as its console entry does; an exception escaping it fails the test (a traceback).
    Layer names restart from 0 each time, as in a new process (a checkpoint's optimizer state is keyed
    by them)."""
    import paddle

    try:
        with paddle.utils.unique_name.guard():
            rc = entry(argv)
    except SystemExit as e:
        rc = e.code
    out, err = capfd.readouterr()
    return rc, out, err


def _one_line(err: str, *needles: str) -> str:
    """The single stderr line that holds every needle; no traceback anywhere."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if all(n in line for n in needles)]
    assert len(lines) == 1, f"expected one line with {needles}, got:\n{err}"
    return lines[0]


def _copy_out(trained, tmp_path):
    root, config = trained
    out = tmp_path / "out"
    shutil.copytree(root / "out", out)
    text = open(config).read().replace(str(root / "out"), str(out))
    (tmp_path / "tiny.yaml").write_text(text)
    return str(tmp_path / "tiny.yaml"), out


def _png(path):
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    return str(path)


def _label_file_naming_a_class_twice(tmp_path, demo_dataset):
    names = (demo_dataset / "label.txt").read_text().splitlines()
    names[4] = names[4].split()[0] + " " + names[1].split()[1]
    (tmp_path / "labels.txt").write_text("\n".join(names) + "\n")
    return ["-o", f"DATASET.label_file={tmp_path / 'labels.txt'}"]


def _edited_export(tmp_path, key, value):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "inference.json").write_text("{}")  # the settings are checked before the graph is read
    (folder / "inference.pdiparams").write_bytes(b"")
    settings = {
        "model": "TSN",
        "input_shape": [None, 3, 3, 32, 32],
        "num_segments": 3,
        "num_clips": 1,
        "num_crops": 1,
        "target_size": 32,
        "short_size": 40,
    }
    settings[key] = value
    (folder / "preprocessing.json").write_text(json.dumps(settings) if key != "json" else '{"num_segments": 3,}')
    return ["--exported", str(folder), "--input", "clip.mp4"]


# (name, mode, extra argv (a function of tmp_path and the dataset), exit status, the words of the one line)
TRAINER_ROWS = [
    ("a PNG given as the config", "eval", None, 2, ["png", "is not a text file (a PNG image)"]),
    ("device=gpu on a CPU build", "eval", lambda t, d: ["-o", "device=gpu"], 2, ["device = gpu", "device=cpu"]),
    (
        "--weights that is not a weights file",
        "eval",
        lambda t, d: ["--weights", _png(t / "w.pdparams")],
        1,
        ["w.pdparams", "not a Paddle weights or checkpoint file"],
    ),
    ("--weights that is a folder", "eval", lambda t, d: ["--weights", str(t / "out")], 1, ["out is a folder"]),
    (
        "weights with another num_classes",
        "eval",
        lambda t, d: ["-o", "MODEL.head.num_classes=7"],
        1,
        ["best.pdparams", "trained for 6 classes but MODEL.head.num_classes = 7"],
    ),
    (
        "a 0-byte checkpoint given to resume",
        "train",
        lambda t, d: ["-o", f"resume={t / 'empty.pdckpt'}"] if (t / "empty.pdckpt").write_bytes(b"") == 0 else [],
        1,
        ["empty.pdckpt", "is empty (0 bytes)"],
    ),
    (
        "a truncated checkpoint given to resume",
        "train",
        lambda t, d: ["-o", f"resume={t / 'out' / 'cut.pdckpt'}"],
        1,
        ["cut.pdckpt", "cut short"],
    ),
    (
        "a label file naming one class twice",
        "eval",
        _label_file_naming_a_class_twice,
        1,
        ["labels.txt:5", "is also the name on line 2"],
    ),
    (
        "an edited preprocessing.json: views the graph does not take",
        "predict",
        lambda t, d: _edited_export(t, "num_segments", 5),
        1,
        ["preprocessing.json", "5 views, but the exported graph takes 3"],
    ),
    (
        "an edited preprocessing.json: a value that is not a number",
        "predict",
        lambda t, d: _edited_export(t, "num_crops", "x"),
        1,
        ["preprocessing.json", 'num_crops = "x"'],
    ),
    (
        "an edited preprocessing.json that is no longer JSON",
        "predict",
        lambda t, d: _edited_export(t, "json", None),
        1,
        ["preprocessing.json", "not valid JSON"],
    ),
    # earlier rows of the docs/robustness.md "Bad inputs" table, through the same command line
    ("an unknown config key", "eval", lambda t, d: ["-o", "DATASET.batchsize=2"], 2, ["batchsize", "batch_size"]),
    (
        "a list line with a count that is not a number",
        "eval",
        lambda t, d: ["-o", "DATASET.source=rawframes", "-o", "DATASET.val_list=" + _written(t / "v.list", "clip x 1")],
        1,
        ["v.list:1", "'x'"],
    ),
    (
        "a Latin-1 list",
        "eval",
        lambda t, d: ["-o", "DATASET.val_list=" + _written(t / "l1.list", "caf\u00e9.pkl", "latin-1")],
        1,
        ["l1.list:1", "not UTF-8"],
    ),
    ("a missing video for predict", "predict", lambda t, d: ["--input", str(t / "nothing.mp4")], 1, ["nothing.mp4"]),
]


def _written(path, text, encoding="utf-8"):
    path.write_bytes((text + "\n").encode(encoding))
    return str(path)


@pytest.mark.parametrize("name, mode, extra, status, words", TRAINER_ROWS, ids=[r[0] for r in TRAINER_ROWS])
def test_a_bad_input_to_the_trainer_is_one_line_and_loses_nothing(
    trained, demo_dataset, tmp_path, capfd, name, mode, extra, status, words
):
    config, out = _copy_out(trained, tmp_path)
    with open(out / "latest.pdckpt", "rb") as f:
        (out / "cut.pdckpt").write_bytes(f.read()[:4000])
    if name.startswith("a PNG"):
        config = _png(tmp_path / "curves.png")
    before = {"data": _snapshot(demo_dataset), "out": _snapshot(out)}
    rc, _, err = _cli(capfd, main.main, [mode, "-c", config, *(extra(tmp_path, demo_dataset) if extra else [])])
    assert rc == status, err
    line = _one_line(err, *words)
    assert "resume=auto" not in line or "resume" in name  # advice that fits the error
    assert {"data": _snapshot(demo_dataset), "out": _snapshot(out)} == before


def test_resume_auto_with_an_empty_latest_takes_the_newest_checkpoint_that_loads(trained, tmp_path, capfd):
    config, out = _copy_out(trained, tmp_path)
    good = _snapshot(out)["epoch_1.pdckpt"]
    (out / "latest.pdckpt").write_bytes(b"")
    shutil.copy(out / "epoch_1.pdckpt", out / "epoch_0.pdckpt")  # an older one, which must not be taken
    rc, printed, err = _cli(capfd, main.main, ["train", "-c", config, "-o", "resume=auto", "-o", "epochs=2"])
    assert rc == 0, err
    assert _one_line(printed, "skipped", "latest.pdckpt: is empty (0 bytes)").endswith(
        f"resuming from {out / 'epoch_1.pdckpt'}"
    )
    assert f"resumed from {out / 'epoch_1.pdckpt'} at epoch 1" in printed
    assert _snapshot(out)["epoch_1.pdckpt"] == good  # the checkpoint it fell back on is kept


def test_resume_auto_when_no_checkpoint_loads_names_them_all(trained, tmp_path, capfd):
    config, out = _copy_out(trained, tmp_path)
    (out / "latest.pdckpt").write_bytes(b"")
    (out / "epoch_1.pdckpt").write_bytes(open(out / "best.pdparams", "rb").read()[:100])
    rc, _, err = _cli(capfd, main.main, ["train", "-c", config, "-o", "resume=auto"])
    assert rc == 1
    line = _one_line(err, "resume=auto: no checkpoint", "latest.pdckpt", "epoch_1.pdckpt")
    assert "cut short" in line and "is empty" in line
    assert (out / "best.pdparams").stat().st_size > 0


def test_a_list_naming_a_clip_twice_counts_it_once_and_names_the_lines(trained, demo_dataset, tmp_path, capfd):
    config, _ = _copy_out(trained, tmp_path)
    lines = (demo_dataset / "val_pkl.list").read_text().split()
    lines = [str(demo_dataset / p) for p in lines]
    dup = tmp_path / "dup.list"
    dup.write_text("\n".join(lines + lines[:2]) + "\n")
    once = tmp_path / "once.list"
    once.write_text("\n".join(lines) + "\n")
    results = {}
    for lst in (dup, once):
        argv = ["eval", "-c", config, "-o", f"DATASET.val_list={lst}", "-o", "DATASET.num_workers=0"]
        rc, printed, err = _cli(capfd, main.main, argv)  # no worker outlives the call holding the run lock
        assert rc == 0, err
        results[lst.name] = [line for line in printed.splitlines() if line.startswith("eval: top1")][0]
        if lst is dup:
            line = _one_line(err, "dup.list", "2 duplicate line(s)")
            assert f"line {len(lines) + 1} repeats line 1" in line
    assert f"on {len(lines)} clips" in results["dup.list"]
    assert results["dup.list"].split(" (")[0] == results["once.list"].split(" (")[0]


def test_a_file_listed_again_with_another_label_stays_a_sample_and_is_named(tmp_path, capfd):
    """A multi-label set written one label a line is not a duplicate: both samples stay, said once."""
    from clipdata.lists import read_list

    (tmp_path / "a.mp4").write_bytes(b"x")
    (tmp_path / "v.list").write_text("a.mp4 10 1\na.mp4 10 3\na.mp4 10 1\n")
    assert [(s.label, s.line) for s in read_list(str(tmp_path / "v.list"), "videos")] == [(1, 1), (3, 2)]
    err = capfd.readouterr().err
    _one_line(err, "v.list: 1 duplicate line(s)", "line 3 repeats line 1 (a.mp4)")
    _one_line(err, "v.list: 1 line(s) give a file listed before another label", "line 2 gives a.mp4 label 3")


def test_build_list_index_does_not_call_a_pkl_rewritten_in_place_indexed(tmp_path, capfd):
    root = tmp_path / "pkl"
    root.mkdir()
    frames = [jpeg(f) for f in index_frames(20)]
    write_pkl(str(root / "c.pkl"), "c", 1, frames)
    with open(root / "c.pkl", "r+b") as f:  # an editing script: the new pickle over the old start
        f.write(pickle.dumps(("c", 2, frames[:10]), protocol=4))
    rc, printed, err = _cli(capfd, build_list.main, ["pkl", str(root), str(tmp_path / "l.list"), "--index", "1"])
    assert rc == 0, err
    assert "1 appended, 0 rewritten, 0 already indexed" in printed


def test_an_audio_only_file_fails_as_no_video_stream(tmp_path, capfd):
    from preprocessing.frames import ffmpeg_exe

    src = tmp_path / "src"
    src.mkdir()
    subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-f", "lavfi", "-i", "sine=frequency=440:duration=0.5"]
        + ["-c:a", "aac", str(src / "tone_000000_000001.mp4")],
        check=True,
        timeout=60,
    )
    (tmp_path / "a.csv").write_text("label,youtube_id,time_start,time_end,split\ntone,tone,0,1,train\n")
    before = _snapshot(src)
    rc, _, err = _cli(capfd, video2pkl.main, [str(tmp_path / "a.csv"), str(src), str(tmp_path / "out"), "1"])
    assert rc == 1 and "Traceback" not in err
    failures = (tmp_path / "out.failures.txt").read_text().splitlines()
    assert failures == ["tone_000000_000001\tno video stream (the file holds audio)"]
    assert _snapshot(src) == before


@pytest.mark.slow
def test_run_dist_does_not_advise_resume_after_a_config_error(tmp_path):
    png = _png(tmp_path / "c.png")
    proc = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", png, "--nproc", "1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "is not a text file (a PNG image)" in proc.stderr and "resume=auto" not in proc.stderr
