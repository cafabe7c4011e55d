"""Read weights saved by PaddleVideo: its TSN checkpoints and its static-graph ImageNet ResNet files.

PaddleVideo names a ResNet's layers after the original Caffe model: the stem is ``conv`` (static name
``conv1``), block ``j`` of stage ``s`` is ``res{s+2}{a,b,c,...}`` (ResNet-101's third stage:
``res4a, res4b1 .. res4b22``), a block's convolutions are ``conv0, conv1, conv2`` (static
``_branch2a/b/c``) and its projection shortcut ``short`` (``_branch1``); each holds ``_conv`` and
``_batch_norm``. This module maps those names onto this project's ResNet.
"""
from __future__ import annotations

import re

from .models import DEPTHS

_BN_FIELDS = {"weight": "weight", "bias": "bias", "_mean": "_mean", "_variance": "_variance",
              "scale": "weight", "offset": "bias", "mean": "_mean", "variance": "_variance"}
_BRANCH = {"2a": 0, "2b": 1, "2c": 2}


def _block_index(depth: int, stage: int, name: str) -> int | None:
    """Flat block index in this project's ResNet of PaddleVideo's block ``res{stage}{name}``."""
    blocks = DEPTHS[depth][1]
    s = stage - 2
    if not 0 <= s < len(blocks):
        return None
    m = re.fullmatch(r"b(\d+)", name)
    j = int(m.group(1)) if m and depth >= 101 and s == 2 else (ord(name) - 97 if len(name) == 1 else None)
    if j is None or not 0 <= j < blocks[s]:
        return None
    return sum(blocks[:s]) + j


def _layer(depth: int, block: str | None, part: str) -> str | None:
    """This project's prefix of a conv+BN pair: ``stem.0`` or ``stages.K.branch.J`` / ``.shortcut``."""
    if block is None:
        return "stem.0"
    m = re.fullmatch(r"res(\d)([a-z]\d*)", block)
    k = _block_index(depth, int(m.group(1)), m.group(2)) if m else None
    if k is None:
        return None
    return f"stages.{k}.shortcut" if part == "short" else f"stages.{k}.branch.{part}"


def _dygraph_key(key: str, depth: int) -> str | None:
    m = re.fullmatch(r"(backbone\.)?(?:(conv)|(res\w+?)\.(conv[012]|short))\.(_conv|_batch_norm)\.(\w+)", key)
    if not m:
        return {"head.fc.weight": "head.fc.weight", "head.fc.bias": "head.fc.bias"}.get(key)
    block = m.group(3)
    part = "short" if m.group(4) == "short" else (m.group(4)[-1] if m.group(4) else None)
    prefix = _layer(depth, block, part)
    if prefix is None:
        return None
    if m.group(5) == "_conv":
        return f"backbone.{prefix}.0.weight" if m.group(6) == "weight" else None
    field = _BN_FIELDS.get(m.group(6))
    return f"backbone.{prefix}.1.{field}" if field else None


def _static_key(key: str, depth: int) -> str | None:
    m = re.fullmatch(r"(?:(conv1)|(res\w+?)_branch(1|2[abc]))_weights", key)
    if m:
        prefix = _layer(depth, m.group(2), "short" if m.group(3) == "1" else str(_BRANCH.get(m.group(3), "")))
        return f"backbone.{prefix}.0.weight" if prefix else None
    m = re.fullmatch(r"bn(?:_(conv1)|(\w+?)_branch(1|2[abc]))_(scale|offset|mean|variance)", key)
    if m:
        block = f"res{m.group(2)}" if m.group(2) else None
        prefix = _layer(depth, block, "short" if m.group(3) == "1" else str(_BRANCH.get(m.group(3), "")))
        return f"backbone.{prefix}.1.{_BN_FIELDS[m.group(4)]}" if prefix else None
    return None


def looks_like_paddlevideo(keys) -> bool:
    return any(re.search(r"(^|\.)res2a(\.|_branch)", k) or k.startswith("backbone.conv._conv") for k in keys)


def from_paddlevideo(state: dict, depth: int) -> tuple[dict, list[str]]:
    """(state under this project's names, PaddleVideo keys that have no place here)."""
    out, unused = {}, []
    for key, value in state.items():
        new = _dygraph_key(key, depth) or _static_key(key, depth)
        if new is None:
            unused.append(key)
        else:
            out[new] = value
    return out, unused
