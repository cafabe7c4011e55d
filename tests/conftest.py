"""Shared fixtures: tiny media made on the fly (nothing is committed), built once per session."""

from __future__ import annotations

import os
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
warnings.filterwarnings("ignore", message="No ccache found")


@pytest.fixture(scope="session")
def demo_dataset(tmp_path_factory):
    """A miniature demo dataset: 6 classes, 3 train + 2 val clips each, 12-40 frames, converted to pkl."""
    from preprocessing import generate_label, make_demo_dataset, video2pkl

    root = tmp_path_factory.mktemp("demo")
    csvs = make_demo_dataset.make_dataset(
        str(root), seed=1, train_per_class=3, val_per_class=2, min_frames=12, max_frames=40
    )
    label_file = str(root / "label.txt")
    assert generate_label.main([csvs["train"], label_file]) == 0
    for split in ("train", "val"):
        rc = video2pkl.main(
            [csvs[split], str(root / split), str(root / f"{split}_pkl"), "2", "--label-file", label_file]
        )
        assert rc == 0
    return root


@pytest.fixture
def cfg(tmp_path):
    """The config of a width-8 ResNet-18 TSN with 5 classes (tests/tiny.py), for tests without data."""
    from .tiny import tiny_cfg

    return tiny_cfg(tmp_path, name="c.yaml")
