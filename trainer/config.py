"""YAML configs with `-o SECTION.key=value` overrides, validated once against one schema.

Every key a config may hold is declared in SCHEMA with its default; an unknown key, a wrong type or a
value outside its choices stops the run with one line naming the key, the value and what was expected.
A config may start from another with ``_base_: other.yaml`` (a path relative to the config).
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from dataclasses import dataclass
from typing import Any

import yaml

from clipdata.errors import DataFormatError
from clipdata.lists import read_text
from dali_pipelines.clipspec import CROPS, NUM_CROPS, ClipSpec
from dali_pipelines.sampling import SAMPLINGS


class ConfigError(ValueError):
    """A user's config or override is wrong; the message is one line naming the key and the fix."""


@dataclass(frozen=True)
class Opt:
    default: Any
    choices: tuple | None = None
    type: type | None = None  # defaults to type(default); float accepts int
    nullable: bool = False
    minimum: float | None = None  # lowest allowed value
    below: float | None = None  # values must be less than this


@dataclass(frozen=True)
class Depth:
    """A ResNet depth: its residual block and the number of blocks in each of its four stages."""

    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1)
    stage_blocks: tuple[int, int, int, int]


DEPTHS = {
    18: Depth("basic", (2, 2, 2, 2)),
    34: Depth("basic", (3, 4, 6, 3)),
    50: Depth("bottleneck", (3, 4, 6, 3)),
    101: Depth("bottleneck", (3, 4, 23, 3)),
}


@dataclass(frozen=True)
class Architecture:
    """The network behind a model name; the training recipe (loss, schedule, sampling) is its config's."""

    resnet: str  # "b": the standard ResNet; "vd": deep 3x3 stem, average-pool shortcuts; "" another backbone
    temporal_shift: bool  # TSM's shift of channels between segments (PP-TSMv2: once, before stage 3)
    activation: str  # "relu", or "leaky_relu" as PaddleVideo's PP-TSM has it
    backbone: str = "ResNet"  # or "PP-LCNetV2" (PP-TSMv2, trainer/pptsmv2.py)


ARCHITECTURES = {
    "TSN": Architecture("b", False, "relu"),
    "TSM": Architecture("b", True, "relu"),
    "PP-TSN": Architecture("vd", False, "relu"),
    "PP-TSM": Architecture("vd", True, "leaky_relu"),
    "PP-TSMv2": Architecture("", True, "relu", backbone="PP-LCNetV2"),
}
MODEL_NAMES = tuple(ARCHITECTURES)
SHIFT_MODELS = tuple(n for n, a in ARCHITECTURES.items() if a.temporal_shift)  # built for num_segments frames

SCHEMA: dict = {
    "epochs": Opt(100, minimum=1),
    "seed": Opt(0),
    "output_dir": Opt("output/tsn"),
    "device": Opt("auto", choices=("auto", "cpu", "gpu")),
    "log_interval": Opt(20, minimum=1),
    "val_interval": Opt(1, minimum=1),  # epochs between evaluations
    "save_interval": Opt(10, minimum=1),  # epochs between numbered checkpoints
    "keep_checkpoints": Opt(0, minimum=0),  # epoch_N.pdckpt files kept, the newest; 0 keeps them all
    "amp": Opt(False),  # mixed precision on GPU
    "amp_dtype": Opt("float16", choices=("float16", "bfloat16")),
    "resume": Opt(""),  # "", "auto" (OUTPUT_DIR/latest.pdckpt if present) or a path
    "MODEL": {
        "name": Opt("TSN", choices=MODEL_NAMES),
        "backbone": {
            "depth": Opt(50, choices=tuple(DEPTHS)),
            "base_channels": Opt(64, minimum=8),  # 64 is the standard ResNet; smaller for demos
            "pretrained": Opt("", nullable=True),  # local ImageNet .pdparams
            "shift_div": Opt(8, minimum=2),  # TSM: 1/shift_div of the channels shift each way
            "temporal_attention": Opt(False),  # PP-TSMv2: the lightweight temporal attention before the shift
        },
        "head": {
            "num_classes": Opt(400, minimum=2),
            "dropout": Opt(0.4, minimum=0.0, below=1.0),
            "init_std": Opt(0.01, minimum=0.0),
            "label_smoothing": Opt(0.0, minimum=0.0, below=1.0),
        },
    },
    "DATASET": {
        "source": Opt("pkl", choices=("pkl", "rawframes", "videos")),
        "data_prefix": Opt("", nullable=True),
        "train_list": Opt(""),
        "val_list": Opt(""),
        "test_list": Opt(""),
        "label_file": Opt(""),
        "batch_size": Opt(32, minimum=1),  # per rank
        "num_threads": Opt(4, minimum=1),  # DALI threads per rank
        "num_workers": Opt(None, type=int, nullable=True, minimum=0),  # feed processes per rank; null: auto
        "worker_timeout": Opt(120.0, minimum=1.0),  # seconds a feed worker may take for a few samples
        "allow_partial_videos": Opt(False),  # keep the decodable part of a video damaged mid-way
        "prefetch": Opt(2, minimum=1),
    },
    "PIPELINE": {
        "num_segments": Opt(3, minimum=1),
        "sampling": Opt("segment", choices=SAMPLINGS),  # TSN segments or TSM dense windows
        "dense_interval": Opt(8, minimum=1),  # dense: frames between two sampled frames
        "target_size": Opt(224, minimum=8),
        "short_size": Opt(256, minimum=8),
        "crop": Opt("multiscale", choices=CROPS),
        "flip": Opt(True),
        "test_num_clips": Opt(1, minimum=1),
        "test_num_crops": Opt(1, choices=NUM_CROPS),
        "test_num_segments": Opt(None, type=int, nullable=True, minimum=1),  # null: num_segments
        "mixup_alpha": Opt(0.0, minimum=0.0),  # 0 disables mixup of training batches
    },
    # distillation (docs/training.md "Distillation"): "dml" trains the model and a peer together, "teacher"
    # trains the model against a frozen teacher; evaluation and export see the model (the student) only
    "DISTILL": {
        "mode": Opt("none", choices=("none", "dml", "teacher")),
        "config": Opt(""),  # the peer's / teacher's config file: its MODEL section is the network
        "weights": Opt(""),  # teacher: its trained weights (required); dml: the peer's start (else its pretrained)
        "temperature": Opt(1.0, minimum=0.0),  # T of the softened outputs softmax(logits / T); must be > 0
        "weight": Opt(1.0, minimum=0.0),  # of the T^2-scaled KL term; the cross-entropy terms weigh 1
    },
    "PRECISE_BN": {
        "enabled": Opt(True),
        "num_iters": Opt(200, minimum=1),  # training batches per rank before each evaluation
    },
    "OPTIMIZER": {
        "momentum": Opt(0.9, minimum=0.0, below=1.0),
        "nesterov": Opt(False),
        "weight_decay": Opt(1e-4, minimum=0.0),
        "base_lr": Opt(0.01, minimum=0.0),  # for a global batch of base_batch_size
        "base_batch_size": Opt(256, minimum=1),
        "schedule": Opt("step", choices=("step", "cosine")),
        "decay_points": Opt([1 / 3, 2 / 3]),  # step: fractions of the total iterations
        "decay_factor": Opt(0.1, minimum=0.0, below=1.0),
        "warmup_epochs": Opt(0.0, minimum=0.0),
        # the LR of the warm-up's first step, for base_batch_size (scaled like base_lr); null: base_lr / steps
        "warmup_start_lr": Opt(None, type=float, nullable=True, minimum=0.0),
        "lr_mult": Opt({}),  # {parameter-name prefix: LR multiplier}, e.g. {head.fc.weight: 5, head.fc.bias: 10}
        "stage_lr_mult": Opt(None, type=list, nullable=True),  # [stem, stage 1, ..., stage N] multipliers
        "grad_clip": Opt(40.0, nullable=True),  # global-norm clip; null disables
    },
}


class Config(dict):
    """A nested dict whose keys read as attributes: ``cfg.MODEL.head.num_classes``."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def _describe(opt: Opt) -> str:
    if opt.choices:
        return "one of " + ", ".join(map(str, opt.choices))
    t = opt.type or type(opt.default)
    name = {
        float: "a number",
        int: "an integer",
        bool: "true or false",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(t, t.__name__)
    return name + (" or null" if opt.nullable else "")


def _check(key: str, value, opt: Opt, origin: str):
    t = opt.type or type(opt.default)
    bad = f"config error: {key} = {value!r} ({origin}): expected {_describe(opt)}"
    if value is None:
        if opt.nullable:
            return None
        raise ConfigError(bad)
    if t is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if t is list:
        if not isinstance(value, list) or not all(isinstance(v, (int, float)) for v in value):
            raise ConfigError(bad + " of numbers")
    elif t is dict:
        items = value.items() if isinstance(value, dict) else [(None, None)]
        number = (int, float)
        if not all(isinstance(k, str) and k and isinstance(v, number) and not isinstance(v, bool) for k, v in items):
            raise ConfigError(bad + " of name: number, e.g. {head.fc.weight: 5.0}")
    elif not isinstance(value, t) or (t is int and isinstance(value, bool)):
        raise ConfigError(bad)
    if opt.choices and value not in opt.choices:
        raise ConfigError(bad)
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"config error: {key} = {value!r} ({origin}): must be a finite number")
    if opt.minimum is not None and not isinstance(value, (str, list, dict)) and value < opt.minimum:
        raise ConfigError(f"config error: {key} = {value!r} ({origin}): must be >= {opt.minimum}")
    if opt.below is not None and value >= opt.below:
        raise ConfigError(f"config error: {key} = {value!r} ({origin}): must be < {opt.below}")
    return value


def _unknown(key: str, name: str, known, origin: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(f"config error: unknown key '{key}' ({origin}); {hint}known keys here: " + ", ".join(known))


def _merge(schema: dict, values: dict, prefix: str, origin: str) -> dict:
    """Validate ``values`` against ``schema``, filling defaults."""
    if not isinstance(values, dict):
        raise ConfigError(f"config error: {prefix.rstrip('.') or 'the config'} ({origin}) must be a mapping")
    for name in values:
        if name not in schema:
            raise _unknown(prefix + name, name, schema, origin)
    out = Config()
    for name, spec in schema.items():
        key = prefix + name
        if isinstance(spec, dict):
            out[name] = _merge(spec, values.get(name, {}), key + ".", origin)
        elif name in values:
            out[name] = _check(key, values[name], spec, origin)
        else:
            out[name] = copy.deepcopy(spec.default)
    return out


def _deep_update(base: dict, new: dict) -> dict:
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _deep_update(base[k], v)
        else:
            base[k] = v
    return base


def _read_yaml(path: str, seen=()) -> dict:
    if not os.path.isfile(path):
        raise ConfigError(f"config error: config file {path} does not exist")
    try:
        data = yaml.safe_load(read_text(path)) or {}
    except DataFormatError as e:
        raise ConfigError(f"config error: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path} must hold a mapping of sections")
    base = data.pop("_base_", None)
    if base:
        base_path = os.path.join(os.path.dirname(path), base)
        if os.path.abspath(base_path) in seen:
            raise ConfigError(f"config error: {path}: _base_ chain loops back to {base_path}")
        data = _deep_update(_read_yaml(base_path, seen + (os.path.abspath(path),)), data)
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """'OPTIMIZER.base_lr=0.02' -> (['OPTIMIZER', 'base_lr'], 0.02); values are read as YAML."""
    if "=" not in text:
        raise ConfigError(f"config error: override {text!r} must look like SECTION.key=value")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"config error: override {text!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def load_config(path: str, overrides: list[str] | tuple = ()) -> Config:
    """Read ``path`` (following ``_base_``), validate it, then apply and validate each override."""
    cfg = _merge(SCHEMA, _read_yaml(path), "", path)
    for text in overrides:
        parts, value = parse_override(text)
        schema, node = SCHEMA, cfg
        for i, name in enumerate(parts):
            key = ".".join(parts[: i + 1])
            if not isinstance(schema, dict) or name not in schema:
                raise _unknown(key, name, schema if isinstance(schema, dict) else {}, f"-o {text}")
            if i == len(parts) - 1:
                if isinstance(schema[name], dict):
                    raise ConfigError(f"config error: -o {text}: '{key}' is a section; set one of its keys")
                node[name] = _check(key, value, schema[name], f"-o {text}")
            else:
                schema, node = schema[name], node[name]
    _check_combination(cfg, path)
    return cfg


def _check_combination(cfg, origin: str) -> None:
    """Rules that involve more than one key, or the values of a list."""
    p, o = cfg.PIPELINE, cfg.OPTIMIZER
    points = o.decay_points
    if not all(0 < x < 1 for x in points) or any(a >= b for a, b in zip(points, points[1:])):
        raise ConfigError(
            f"config error: OPTIMIZER.decay_points = {points} ({origin}): must be increasing "
            "fractions of training, each in (0, 1), e.g. [0.333, 0.667]"
        )
    if o.warmup_start_lr is not None and o.warmup_start_lr > o.base_lr:
        raise ConfigError(
            f"config error: OPTIMIZER.warmup_start_lr = {o.warmup_start_lr} ({origin}): the warm-up rises from it "
            f"to OPTIMIZER.base_lr = {o.base_lr}; it must be <= base_lr"
        )
    mults = [(f"OPTIMIZER.lr_mult.{k}", v) for k, v in o.lr_mult.items()]
    mults += [(f"OPTIMIZER.stage_lr_mult[{i}]", v) for i, v in enumerate(o.stage_lr_mult or [])]
    for key, v in mults:
        if isinstance(v, bool) or not math.isfinite(v) or v < 0:
            raise ConfigError(f"config error: {key} = {v!r} ({origin}): must be a finite number >= 0 (LR multiplier)")
    d = cfg.DISTILL
    if d.mode != "none" and not d.config:
        raise ConfigError(
            f"config error: DISTILL.config is empty ({origin}): DISTILL.mode = {d.mode} needs the config file "
            f"of the {'peer' if d.mode == 'dml' else 'teacher'} (its MODEL section), e.g. "
            "-o DISTILL.config=configs/tsm.yaml"
        )
    if d.mode == "teacher" and not d.weights:
        raise ConfigError(
            f"config error: DISTILL.weights is empty ({origin}): the teacher form needs the teacher's trained "
            "weights, e.g. -o DISTILL.weights=output/tsm/best.pdparams"
        )
    if not d.temperature > 0:
        raise ConfigError(f"config error: DISTILL.temperature = {d.temperature} ({origin}): must be > 0")
    if o.grad_clip is not None and not o.grad_clip > 0:
        raise ConfigError(
            f"config error: OPTIMIZER.grad_clip = {o.grad_clip} ({origin}): must be > 0 (null disables clipping)"
        )
    if p.target_size > p.short_size:
        raise ConfigError(
            f"config error: PIPELINE.target_size = {p.target_size} ({origin}): crops of "
            f"target_size are cut from frames whose short side is short_size = {p.short_size}; "
            "target_size must be <= short_size"
        )
    if cfg.MODEL.backbone.temporal_attention and ARCHITECTURES[cfg.MODEL.name].backbone != "PP-LCNetV2":
        raise ConfigError(
            f"config error: MODEL.backbone.temporal_attention = true ({origin}): only PP-TSMv2 has a "
            f"temporal attention, MODEL.name is {cfg.MODEL.name}; set it to false or MODEL.name to PP-TSMv2"
        )
    if cfg.MODEL.name in SHIFT_MODELS:
        if p.num_segments < 2:
            raise ConfigError(
                f"config error: PIPELINE.num_segments = {p.num_segments} ({origin}): "
                f"{cfg.MODEL.name} shifts features between segments and needs at least 2"
            )
        if p.test_num_segments not in (None, p.num_segments):
            raise ConfigError(
                f"config error: PIPELINE.test_num_segments = {p.test_num_segments} ({origin}): "
                f"{cfg.MODEL.name} is built for PIPELINE.num_segments = {p.num_segments} "
                "frames per clip; test with more clips (test_num_clips) instead"
            )


def segments_in_test(cfg) -> int:
    """Segments per clip in test mode (PP-TSN tests on 25 where it trains on 8): the test clip's."""
    return ClipSpec.from_config(cfg, "test").num_segments


def to_plain(cfg) -> dict:
    """The config as plain dicts (for YAML dumps and checkpoints)."""
    return {k: to_plain(v) if isinstance(v, dict) else v for k, v in cfg.items()}
