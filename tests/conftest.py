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
