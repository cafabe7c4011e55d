"""Checkpoints, written atomically: a killed writer leaves the previous file loadable.

A training checkpoint (``*.pdckpt``) holds everything resume needs: model, optimizer (with its LR
scheduler), epoch, step, best metric, seed and config. ``best.pdparams`` holds the model weights alone
(plus a ``__meta__`` entry) for eval, test, predict and export.
"""
from __future__ import annotations

import codecs
import collections
import os
import pickle

import numpy as np
import paddle

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


class UnsafeFileError(ValueError):
    """A weights or checkpoint file asks the unpickler for something a saved state never holds."""


def _latin1(text, encoding="latin1"):
    # protocol-2 pickles written by Python 3 spell bytes (numpy's raw data) as _codecs.encode(str, 'latin1')
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, encoding)


def _lod_tensor(expr, scope):
    # Paddle pickles a LoDTensor as eval('data', {'data': array}); this is that expression, and nothing else
    if expr != "data" or not isinstance(scope, dict) or not isinstance(scope.get("data"), np.ndarray):
        raise pickle.UnpicklingError("builtins.eval with anything but Paddle's ('data', {'data': array})")
    return scope["data"]


# exactly what paddle.save (2.x and 3.x, dygraph and static), and this trainer's checkpoints, pickle
_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "tuple"): tuple, ("__builtin__", "tuple"): tuple,
    ("builtins", "list"): list, ("builtins", "dict"): dict, ("builtins", "set"): set,
    ("builtins", "eval"): _lod_tensor,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
    **{(mod, name): getattr(_multiarray, name) for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
       for name in ("_reconstruct", "scalar")},
}


class _StateUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeFileError(f"global '{module}.{name}'") from None


def _arrays(obj):
    """Paddle pickles each tensor as the tuple (name, array): keep the array."""
    if isinstance(obj, tuple) and len(obj) == 2 and isinstance(obj[0], str) and isinstance(obj[1], np.ndarray):
        return obj[1]
    if isinstance(obj, dict):
        return type(obj)((k, _arrays(v)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_arrays(v) for v in obj]
    return obj


def load_file(path: str):
    """A weights or checkpoint file, read as data, the way ``weights_only=True`` does it in PyTorch: only
    containers, numbers, strings and numpy arrays; anything else (a pickle that would import a module
    or call a function) is refused with an error naming the file and the global it asked for.
    Tensors come back as numpy arrays, which ``set_state_dict`` takes."""
    try:
        with open(path, "rb") as f:
            obj = _StateUnpickler(f, encoding="latin1").load()
    except UnsafeFileError as e:
        raise UnsafeFileError(f"{path}: refused to load: it asks for {e}, which no saved Paddle state holds; "
                              "a weights file from elsewhere may try to run code. Re-save it with paddle.save "
                              "from a state_dict in a trusted environment") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{path}: not a Paddle weights or checkpoint file ({e})") from None
    if isinstance(obj, dict) and "UnpackBigParamInfor@@" in obj:
        raise ValueError(f"{path}: holds a tensor split for size (> 1 GiB), which this loader does not join")
    return _arrays(_without_name_tables(obj))


def _without_name_tables(obj):
    """paddle.save adds a structured-name -> parameter-name table to each state dict; paddle.load drops it."""
    if isinstance(obj, dict):
        return type(obj)((k, _without_name_tables(v)) for k, v in obj.items() if k != "StructuredToParameterName@@")
    return obj


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
    state = load_file(path)
    if not isinstance(state, dict) or not {"model", "optimizer", "meta"} <= set(state):
        raise ValueError(f"{path} is not a training checkpoint (*.pdckpt written by this trainer)")
    return state


def save_weights(model, path: str, **meta) -> None:
    state = dict(model.state_dict())
    state["__meta__"] = meta
    save(state, path)


def mismatch(model: paddle.nn.Layer, state: dict) -> tuple[list[str], list[str], list[str]]:
    """The model's tensors ``state`` lacks, the ones it has beyond the model, and those of another shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if list(own[k].shape) != list(state[k].shape))
    return missing, unexpected, wrong


def load_weights(model: paddle.nn.Layer, path: str) -> dict:
    """Load model weights from a ``.pdparams`` or a training checkpoint; returns its metadata."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; train first or pass --weights PATH")
    state = load_file(path)
    if isinstance(state, dict) and {"model", "optimizer", "meta"} <= set(state):
        state, meta = state["model"], state["meta"]
    else:
        meta = state.pop("__meta__", {}) if isinstance(state, dict) else {}
    from .paddlevideo_names import from_paddlevideo, looks_like_paddlevideo
    if looks_like_paddlevideo(state):  # a model trained by PaddleVideo
        state, _ = from_paddlevideo(state, model.backbone.depth, model.backbone.variant, path)
    missing, unexpected, wrong = mismatch(model, state)
    if missing or unexpected or wrong:
        raise ValueError(f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
                         f"wrong shape {wrong[:3]}); check MODEL.* against the config it was trained with")
    model.set_state_dict(state)
    return meta
