"""Read weights saved by PaddleVideo / PaddleClas: TSN, TSM, PP-TSN and PP-TSM checkpoints and the
ImageNet ResNet / ResNet-vd files they start from.

PaddleVideo's ResNet (TSN, TSM) is named after the original Caffe model: the stem is ``conv`` (static
name ``conv1``), block ``j`` of stage ``s`` is ``res{s+2}{a,b,c,...}`` (ResNet-101's third stage:
``res4a, res4b1 .. res4b22``), a block's convolutions are ``conv0, conv1, conv2`` (static
``_branch2a/b/c``) and its projection shortcut ``short`` (``_branch1``); each holds ``_conv`` and
``_batch_norm``. Its ResNet-vd (PP-TSN, PP-TSM, and PaddleClas's ``ResNet50_vd`` ImageNet files) names
the three stem convolutions ``conv1_1..conv1_3`` and block ``j`` of stage ``s`` ``bb_{s}_{j}``.
PaddleClas's current models say ``stem.{i}`` and ``blocks.{k}`` (flat), with ``conv`` and ``bn``.
This module maps those names onto this project's ResNet.

PP-TSMv2 (PaddleVideo's ``PPTSM_v2``) and PaddleClas's ``PPLCNetV2_base`` share one naming: ``stem.0``,
``stem.1`` and block ``j`` of stage ``s`` ``stages.{s}.{j}``, whose parts are ``dw_conv`` (or the branches
``dw_conv_list.{i}``), ``se.conv1/conv2``, ``pw_conv`` (or ``pw_conv_1``, ``pw_conv_2``), each a ``conv`` +
``bn``; then ``last_conv``, the classifier ``fc`` and PP-TSMv2's ``global_attention.fc``. PaddleVideo
prefixes them with ``backbone.`` (a distillation checkpoint: ``Student.0.``, its student file: ``0.``).
"""

from __future__ import annotations

import re

from .config import DEPTHS, ConfigError

_BN_FIELDS = {
    "weight": "weight",
    "bias": "bias",
    "_mean": "_mean",
    "_variance": "_variance",
    "scale": "weight",
    "offset": "bias",
    "mean": "_mean",
    "variance": "_variance",
}
_BRANCH = {"2a": 0, "2b": 1, "2c": 2}


def _flat_block(depth: int, stage: int, j: int | None) -> int | None:
    """Flat index in this project's ResNet of block ``j`` of stage ``stage`` (0-based), if it exists."""
    blocks = DEPTHS[depth].stage_blocks
    if j is None or not 0 <= stage < len(blocks) or not 0 <= j < blocks[stage]:
        return None
    return sum(blocks[:stage]) + j


def _block_prefix(k: int | None, part: str) -> str | None:
    """``stages.K.shortcut`` for ``part`` "short", else ``stages.K.branch.{part}`` (part "0".."2")."""
    if k is None:
        return None
    return f"stages.{k}.shortcut" if part == "short" else f"stages.{k}.branch.{part}"


def _block_index(depth: int, stage: int, name: str) -> int | None:
    """Flat block index in this project's ResNet of PaddleVideo's block ``res{stage}{name}``."""
    m = re.fullmatch(r"b(\d+)", name)
    j = int(m.group(1)) if m and depth >= 101 and stage == 4 else (ord(name) - 97 if len(name) == 1 else None)
    return _flat_block(depth, stage - 2, j)


def _layer(depth: int, block: str | None, part: str) -> str | None:
    """This project's prefix of a conv+BN pair: ``stem.0`` or ``stages.K.branch.J`` / ``.shortcut``."""
    if block is None:
        return "stem.0"
    m = re.fullmatch(r"res(\d)([a-z]\d*)", block)
    return _block_prefix(_block_index(depth, int(m.group(1)), m.group(2)) if m else None, part)


def _conv_bn_key(prefix: str | None, layer: str, field: str) -> str | None:
    """Our key of a conv+BN pair's tensor: ``layer`` is the conv (``_conv``/``conv``) or the BN."""
    if prefix is None:
        return None
    if layer in ("_conv", "conv"):
        return f"backbone.{prefix}.0.weight" if field == "weight" else None
    field = _BN_FIELDS.get(field)
    return f"backbone.{prefix}.1.{field}" if field else None


def _dygraph_key(key: str, depth: int) -> str | None:
    m = re.fullmatch(r"(backbone\.)?(?:(conv)|(res\w+?)\.(conv[012]|short))\.(_conv|_batch_norm)\.(\w+)", key)
    if m:
        block = m.group(3)
        part = "short" if m.group(4) == "short" else (m.group(4)[-1] if m.group(4) else None)
        return _conv_bn_key(_layer(depth, block, part), m.group(5), m.group(6))
    # ResNet-vd as PaddleVideo and PaddleClas's legacy models name it
    m = re.fullmatch(r"(?:backbone\.)?conv1_([123])\.(_conv|_batch_norm)\.(\w+)", key)
    if m:
        return _conv_bn_key(f"stem.{int(m.group(1)) - 1}", m.group(2), m.group(3))
    m = re.fullmatch(r"(?:backbone\.)?bb_(\d+)_(\d+)\.(?:conv([012])|(short))\.(_conv|_batch_norm)\.(\w+)", key)
    if m:
        block = _flat_block(depth, int(m.group(1)), int(m.group(2)))
        return _conv_bn_key(_block_prefix(block, m.group(3) or m.group(4)), m.group(5), m.group(6))
    # PaddleClas's current ResNet / ResNet-vd
    m = re.fullmatch(r"stem\.([012])\.(conv|bn)\.(\w+)", key)
    if m:
        return _conv_bn_key(f"stem.{m.group(1)}", m.group(2), m.group(3))
    m = re.fullmatch(r"blocks\.(\d+)\.(?:conv([012])|(short))\.(conv|bn)\.(\w+)", key)
    if m:
        k = int(m.group(1))
        block = k if k < sum(DEPTHS[depth].stage_blocks) else None
        return _conv_bn_key(_block_prefix(block, m.group(2) or m.group(3)), m.group(4), m.group(5))
    return {"head.fc.weight": "head.fc.weight", "head.fc.bias": "head.fc.bias"}.get(key)


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
    return any(
        re.search(r"(^|\.)(res2a(\.|_branch)|conv1_1\._conv|bb_0_0\.)", k)
        or k.startswith(("backbone.conv._conv", "blocks.0.conv0.conv"))
        for k in keys
    )


def from_paddlevideo(state: dict, depth: int, variant: str = "b", path: str = "the weights") -> tuple[dict, list[str]]:
    """(state under this project's names, keys that have no place here). A ResNet-vd file cannot fill a
    plain ResNet (three stem convolutions where it has one) and the other way round: mixing them is a
    config error rather than half a network loaded."""
    vd_file = any(re.search(r"(^|\.)conv1_[23]\.|^stem\.[12]\.", k) for k in state)
    if vd_file != (variant == "vd"):
        have, want = ("ResNet-vd", "ResNet") if vd_file else ("ResNet", "ResNet-vd")
        models = "PP-TSN or PP-TSM" if vd_file else "TSN or TSM"
        raise ConfigError(
            f"config error: {path} holds {have} weights but MODEL.name selects a {want} backbone; "
            f"use them with MODEL.name {models}, or take weights of a {want}"
        )
    out, unused = {}, []
    for key, value in state.items():
        new = _dygraph_key(key, depth) or _static_key(key, depth)
        if new is None:
            unused.append(key)
        else:
            out[new] = value
    return out, unused


# PP-LCNetV2 / PP-TSMv2 (trainer/pptsmv2.py)
# PaddleVideo's Recognizer2D says backbone.; its DML checkpoint Student.0. (student and head in a Sequential),
# and the student file it writes beside it (save_student_model) 0.
_LCNET_PREFIX = r"(?:backbone\.|Student\.0\.|0\.)?"
_LCNET_BLOCK = r"stem\.1|stages\.\d+\.\d+"
_LCNET_PARTS = {"dw_conv": "dw", "pw_conv": "pw.0", "pw_conv_1": "pw.0", "pw_conv_2": "pw.1"}


def looks_like_pplcnetv2(keys) -> bool:
    """Names of PaddleVideo's PP-TSMv2 or PaddleClas's PP-LCNetV2 (this project's say ``dw`` and ``pw``)."""
    return any(re.search(rf"(^|\.)({_LCNET_BLOCK})\.(dw_conv|pw_conv)", k) for k in keys)


def _lcnet_conv_bn(prefix: str, layer: str, field: str) -> str | None:
    if layer == "conv":
        return f"{prefix}.0.weight" if field == "weight" else None
    field = _BN_FIELDS.get(field)
    return f"{prefix}.1.{field}" if field else None


def _pplcnetv2_key(key: str) -> str | None:
    """This project's name of a PP-LCNetV2 / PP-TSMv2 tensor named as PaddleVideo / PaddleClas name it."""
    m = re.fullmatch(_LCNET_PREFIX + r"(.+)", key)
    rest = m.group(1)
    m = re.fullmatch(r"stem\.0\.(conv|bn)\.(\w+)", rest)
    if m:
        return _lcnet_conv_bn("backbone.stem.0", m.group(1), m.group(2))
    m = re.fullmatch(rf"({_LCNET_BLOCK})\.(dw_conv|pw_conv|pw_conv_1|pw_conv_2)\.(conv|bn)\.(\w+)", rest)
    if m:
        return _lcnet_conv_bn(f"backbone.{m.group(1)}.{_LCNET_PARTS[m.group(2)]}", m.group(3), m.group(4))
    m = re.fullmatch(rf"({_LCNET_BLOCK})\.dw_conv_list\.(\d+)\.(conv|bn)\.(\w+)", rest)
    if m:
        return _lcnet_conv_bn(f"backbone.{m.group(1)}.dw_branches.{m.group(2)}", m.group(3), m.group(4))
    m = re.fullmatch(rf"({_LCNET_BLOCK})\.se\.conv([12])\.(weight|bias)", rest)
    if m:
        return f"backbone.{m.group(1)}.se.{'reduce' if m.group(2) == '1' else 'expand'}.{m.group(3)}"
    m = re.fullmatch(r"global_attention\.fc\.(weight|bias)", rest)
    if m:
        return f"backbone.temporal_attention.fc.{m.group(1)}"
    if rest == "last_conv.weight":
        return "backbone.last_conv.weight"
    m = re.fullmatch(r"fc\.(weight|bias)", rest)
    return f"head.fc.{m.group(1)}" if m else None


def is_fused_placeholder(key: str) -> bool:
    """PaddleVideo / PaddleClas allocate a re-parameterisable block's fused depthwise conv beside its
    branches from the start and fill it only in ``rep()``: the copy a file holds is an untrained initial
    value (the branches are the weights), so it has no place here."""
    return re.fullmatch(rf"{_LCNET_PREFIX}(stages\.\d+\.\d+)\.dw_conv\.(weight|bias)", key) is not None


def from_pplcnetv2(state: dict, lcnet_model: bool, path: str = "the weights") -> tuple[dict, list[str]]:
    """(state under this project's names, keys that have no place here) of a PP-TSMv2 / PP-LCNetV2 file
    named by PaddleVideo or PaddleClas; a file of this project's names comes back as it is. A ResNet file
    for PP-TSMv2, or a PP-LCNetV2 file for a ResNet model, is a config error naming a tensor."""
    lcnet_file = looks_like_pplcnetv2(state)
    if not lcnet_model:
        if lcnet_file:
            example = next(k for k in state if looks_like_pplcnetv2([k]))
            raise ConfigError(
                f"config error: {path} holds PP-LCNetV2 / PP-TSMv2 weights (e.g. {example!r}) but MODEL.name "
                "selects a ResNet backbone; use them with MODEL.name PP-TSMv2, or take weights of a ResNet"
            )
        return state, []
    if not lcnet_file:
        resnet = [k for k in state if looks_like_paddlevideo([k]) or re.search(r"\.(branch|shortcut)\.", k)]
        if resnet:
            raise ConfigError(
                f"config error: {path} holds ResNet weights (e.g. {resnet[0]!r}) but MODEL.name PP-TSMv2 needs "
                "PP-LCNetV2 weights: PaddleVideo's PP-TSMv2 or PaddleClas's PPLCNetV2_base(_ssld) files"
            )
        return state, []
    out, unused = {}, []
    for key, value in state.items():
        if is_fused_placeholder(key):
            continue
        new = _pplcnetv2_key(key)
        if new is None:
            unused.append(key)
        else:
            out[new] = value
    return out, unused
