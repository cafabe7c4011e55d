"""Shared fixtures: tiny media made on the fly (nothing is committed), built once per session."""

from __future__ import annotations

import os
import pathlib
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="No ccache found")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A miniature demo dataset: 6 classes, 3 train + 2 val clips each, 12-40 frames, converted to pkl."""
    from tools.demo_data import build_demo_set

    return pathlib.Path(build_demo_set(str(tmp_path_factory.mktemp("demo"))))


@pytest.fixture
def cfg(tmp_path):
    """The config of a width-8 ResNet-18 TSN with 5 classes (tests/tiny.py), for tests without data."""
    from .tiny import tiny_cfg

    return tiny_cfg(tmp_path, name="c.yaml")


@pytest.fixture
def no_parent_link(monkeypatch):
    """main.main names its process as the parent of the next link (common/lifeline.py); a second call in
    this process would take that for a dead parent and kill it. Here every call is a command typed by hand."""
    from common import lifeline

    monkeypatch.setenv(lifeline.PARENT_PID_ENV, "")
    monkeypatch.setattr(lifeline, "hand_on", lambda: None)


@pytest.fixture
def predict_argv(tmp_path):
    """The start of a predict command line: a tiny model's weights (tests/tiny.py) and its 5 labels
    (class0 .. class4), at 32 px."""
    from trainer import checkpoint

    from .tiny import tiny_model

    cfg, model = tiny_model(tmp_path)
    checkpoint.save_weights(model, str(tmp_path / "w.pdparams"))
    (tmp_path / "labels.txt").write_text("".join(f"{i} class{i}\n" for i in range(5)))
    argv = ["predict", "-c", str(tmp_path / "tiny.yaml"), "--weights", str(tmp_path / "w.pdparams")]
    return argv + ["-o", f"DATASET.label_file={tmp_path / 'labels.txt'}", "-o", "PIPELINE.target_size=32"]
