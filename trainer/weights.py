"""Reading weights from any source, as data: this trainer's checkpoints and ``.pdparams``, ImageNet
backbones, and files saved by PaddleVideo / PaddleClas (their layer names translated).

Every file goes through one restricted unpickler (``load_file``) and one checkpoint detection
(``model_state``); ``load_weights`` then wants every tensor of the model (eval, test, predict, export),
``load_pretrained`` takes what fits (training's starting point) and ``load_checkpoint`` a whole
training state. Checkpoints themselves (what is written when, which one a resume reads) are
``trainer.checkpoint``'s.
"""

from __future__ import annotations

import codecs
import collections
import os
import pickle
import warnings

import numpy as np
import paddle

from .paddlevideo_names import from_paddlevideo, from_pplcnetv2, looks_like_paddlevideo, looks_like_pplcnetv2
from .pptsmv2 import PPLCNetV2TSM

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core import multiarray as _multiarray


class WeightsError(ValueError):
    """A user's weights or checkpoint file cannot be used: empty, cut short, not weights, another model.
    The message is one line naming the file."""


class UnsafeFileError(WeightsError):
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
    ("builtins", "tuple"): tuple,
    ("__builtin__", "tuple"): tuple,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "set"): set,
    ("builtins", "eval"): _lod_tensor,
    ("_codecs", "encode"): _latin1,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{
        (mod, name): getattr(_multiarray, name)
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray")
        for name in ("_reconstruct", "scalar")
    },
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


_CUT = (
    "cut short (ends mid-file); copy it again, or take an earlier checkpoint "
    "(-o resume=auto takes the newest that loads)"
)


def load_file(path: str):
    """A weights or checkpoint file, read as data, the way ``weights_only=True`` does it in PyTorch: only
    containers, numbers, strings and numpy arrays; anything else (a pickle that would import a module
    or call a function) is refused with an error naming the file and the global it asked for.
    Tensors come back as numpy arrays, which ``set_state_dict`` takes."""
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                raise WeightsError(f"{path}: is empty (0 bytes), not a Paddle weights or checkpoint file")
            obj = _StateUnpickler(f, encoding="latin1").load()
    except UnsafeFileError as e:
        raise UnsafeFileError(
            f"{path}: refused to load: it asks for {e}, which no saved Paddle state holds; "
            "a weights file from elsewhere may try to run code. Re-save it with paddle.save "
            "from a state_dict in a trusted environment"
        ) from None
    except WeightsError:
        raise
    except EOFError:
        raise WeightsError(f"{path}: {_CUT}") from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError, MemoryError) as e:
        cut = "truncated" in str(e) or "ran out" in str(e).lower()
        what = _CUT if cut else f"not a Paddle weights or checkpoint file ({' '.join(str(e).split())})"
        raise WeightsError(f"{path}: {what}") from None
    if isinstance(obj, dict) and "UnpackBigParamInfor@@" in obj:
        raise WeightsError(f"{path}: holds a tensor split for size (> 1 GiB), which this loader does not join")
    return _arrays(_without_name_tables(obj))


def _without_name_tables(obj):
    """paddle.save adds a structured-name -> parameter-name table to each state dict; paddle.load drops it."""
    if isinstance(obj, dict):
        return type(obj)((k, _without_name_tables(v)) for k, v in obj.items() if k != "StructuredToParameterName@@")
    return obj


CHECKPOINT_KEYS = {"model", "optimizer", "meta"}


def is_checkpoint(obj) -> bool:
    """A training checkpoint (``*.pdckpt``) rather than a bare state dict."""
    return isinstance(obj, dict) and CHECKPOINT_KEYS <= set(obj)


def load_checkpoint(path: str) -> dict:
    """A training checkpoint for resume: {"model", "optimizer", "meta"[, "scaler"]}."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_file(path)
    if not is_checkpoint(state):
        raise WeightsError(f"{path} is not a training checkpoint (*.pdckpt written by this trainer)")
    return state


def model_state(obj, model: paddle.nn.Layer, path: str) -> tuple[dict, dict, list[str]]:
    """(the model's tensors under this project's names, the file's metadata, keys with no place here)
    from what ``load_file`` read: a checkpoint's model part, or a state dict (its ``__meta__`` taken
    out), PaddleVideo / PaddleClas names translated for the model's backbone."""
    if is_checkpoint(obj):
        state, meta = obj["model"], obj["meta"]
    elif isinstance(obj, dict):
        state = dict(obj)
        meta = state.pop("__meta__", {})
    else:
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict or a checkpoint")
    unused = []
    lcnet_model = isinstance(model.backbone, PPLCNetV2TSM)
    if lcnet_model or looks_like_pplcnetv2(state):
        state, unused = from_pplcnetv2(state, lcnet_model, path)
    elif looks_like_paddlevideo(state):
        state, unused = from_paddlevideo(state, model.backbone.depth, model.backbone.variant, path)
    return state, meta, unused


def mismatch(model: paddle.nn.Layer, state: dict) -> tuple[list[str], list[str], list[str]]:
    """The model's tensors ``state`` lacks, the ones it has beyond the model, and those of another shape."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if list(own[k].shape) != list(state[k].shape))
    return missing, unexpected, wrong


def load_weights(model: paddle.nn.Layer, path: str) -> dict:
    """Load every tensor of ``model`` from a ``.pdparams`` or a training checkpoint; returns its metadata."""
    if os.path.isdir(path):
        raise WeightsError(f"--weights {path} is a folder; give the weights file in it (e.g. {path}/best.pdparams)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file {path} does not exist; train first or pass --weights PATH")
    state, meta, _ = model_state(load_file(path), model, path)
    missing, unexpected, wrong = mismatch(model, state)
    classes = _classes(state)
    if wrong and classes is not None and classes != _classes(model.state_dict()) and not (missing or unexpected):
        raise WeightsError(
            f"{path} was trained for {classes} classes but MODEL.head.num_classes = {_classes(model.state_dict())}; "
            "use the config (and label file) it was trained with"
        )
    if missing or unexpected or wrong:
        raise WeightsError(
            f"{path} does not fit this model (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shape {wrong[:3]}); check MODEL.* against the config it was trained with"
        )
    model.set_state_dict(state)
    return meta


def _classes(state: dict) -> int | None:
    """The class count of a state's classifier (the last dimension of the head's weight), if it has one."""
    w = state.get("head.fc.weight")
    return int(w.shape[-1]) if w is not None and len(w.shape) == 2 else None


def load_pretrained(model: paddle.nn.Layer, path: str) -> str:
    """Initialise from a local file: ImageNet backbone weights (with or without the ``backbone.``
    prefix), a whole TSN checkpoint (``.pdparams`` / ``.pdckpt``), or either saved by PaddleVideo (its
    layer names are translated). Tensors whose shape differs (the classifier of another class count)
    are skipped; returns a one-line report of what was loaded."""
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"MODEL.backbone.pretrained: {path} does not exist; give a local .pdparams file or set it to ''"
        )
    state, _, unused = model_state(load_file(path), model, path)
    own = model.state_dict()
    usable, skipped = {}, []
    for key, value in state.items():
        target = key if key in own else f"backbone.{key}" if f"backbone.{key}" in own else None
        if target is None:
            unused.append(key)
        elif list(value.shape) != list(own[target].shape):
            skipped.append(target)
        else:
            usable[target] = value
    with warnings.catch_warnings():  # Paddle warns per absent key; the report below lists them once
        warnings.simplefilter("ignore")
        model.set_state_dict(usable)
    missing = sorted(set(own) - set(usable) - set(skipped))

    def few(keys):
        return f"{keys[:4]}{' ...' if len(keys) > 4 else ''}"

    return (
        f"pretrained: loaded {len(usable)}/{len(own)} tensors from {path}"
        + (f"; skipped (shape differs) {few(sorted(skipped))}" if skipped else "")
        + (f"; not in the file {few(missing)}" if missing else "")
        + (f"; unused {few(sorted(unused))}" if unused else "")
    )
