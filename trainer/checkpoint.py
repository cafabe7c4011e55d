"""Checkpoints, written atomically: a killed writer leaves the previous file loadable.

A training checkpoint (``*.pdckpt``) holds everything resume needs: model, optimizer (with its LR
scheduler), epoch, step, best metric, seed and config. ``best.pdparams`` holds the model weights alone
(plus a ``__meta__`` entry) for eval, test, predict and export.
"""
from __future__ import annotations

import os

import paddle


def save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        paddle.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state(path: str, model, optimizer, scaler=None, **meta) -> None:
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": meta}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save(state, path)


def remove_stale_temporaries(folder: str) -> None:
    """Delete the half-written files (``NAME.tmp-PID``) a killed run left behind."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            head, sep, pid = name.rpartition(".tmp-")
            if sep and head and pid.isdigit():
                os.unlink(os.path.join(folder, name))


def load_state(path: str) -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = paddle.load(path)
    if not isinstance(state, dict) or not {"model", "optimizer", "meta"} <= set(state):
        raise ValueError(f"{path} is not a training checkpoint (*.pdckpt written by this trainer)")
    return state


def save_weights(model, path: str, **meta) -> None:
    state = dict(model.state_dict())
    state["__meta__"] = meta
    save(state, path)


def load_weights(model: paddle.nn.Layer, path: str) -> dict:
    """Load model weights from a ``.pdparams`` or a training checkpoint; returns its metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; train first or pass --weights PATH")
    state = paddle.load(path)
    if isinstance(state, dict) and {"model", "optimizer", "meta"} <= set(state):
        state, meta = state["model"], state["meta"]
    else:
        meta = state.pop("__meta__", {}) if isinstance(state, dict) else {}
    from .paddlevideo_names import from_paddlevideo, looks_like_paddlevideo
    if looks_like_paddlevideo(state):  # a model trained by PaddleVideo
        state, _ = from_paddlevideo(state, model.backbone.depth, model.backbone.variant, path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if list(own[k].shape) != list(state[k].shape))
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shape {wrong[:3]}); check MODEL.* against the config it was trained with")
    model.set_state_dict(state)
    return meta
