"""Checkpoints written atomically: a killed writer leaves the previous file loadable."""
from __future__ import annotations

import os

import paddle


def save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    paddle.save(obj, tmp)
    os.replace(tmp, path)


def load_weights(model: paddle.nn.Layer, path: str) -> dict:
    """Load model weights from ``path``; returns the checkpoint's metadata if it has any."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; train first or pass --weights PATH")
    state = paddle.load(path)
    meta = state.pop("__meta__", {}) if isinstance(state, dict) else {}
    missing, unexpected = model.set_state_dict(state) or ([], [])
    if missing or unexpected:
        raise ValueError(f"{path} does not fit this model (missing {list(missing)[:5]}, unexpected "
                         f"{list(unexpected)[:5]}); check MODEL.* against the config it was trained with")
    return meta
