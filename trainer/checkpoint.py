"""Checkpoints, written atomically: a killed writer leaves the previous file loadable.

A training checkpoint (``*.pdckpt``) holds everything resume needs: model, optimizer (with its LR
scheduler), epoch, step, best metric, seed and config. ``best.pdparams`` holds the model weights alone
(plus a ``__meta__`` entry) for eval, test, predict and export. Reading any of them (and weights from
elsewhere) is ``trainer.weights``.
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


def save_state(path: str, model, optimizer, scaler=None, parts=None, **meta) -> None:
    """``parts``: {name: network} stored beside the model (a distillation peer, trainer.distill)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": meta}
    state.update({name: net.state_dict() for name, net in (parts or {}).items()})
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


def save_weights(model, path: str, **meta) -> None:
    state = dict(model.state_dict())
    state["__meta__"] = meta
    save(state, path)
