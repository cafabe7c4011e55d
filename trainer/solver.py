"""Optimizer and LR schedules of the recipes (docs/design.md "Training recipe").

LR = base_lr x global_batch / base_batch_size after an optional linear warm-up (from warmup_start_lr,
scaled the same way), then either decayed x decay_factor at fractions of the total *iterations* (TSN's
"step"), or annealed to 0 along a cosine over the iterations left after warm-up (the PP recipes'
"cosine"); stepped once per iteration. Parameters may learn at a multiple of it (OPTIMIZER.lr_mult by
parameter-name prefix, OPTIMIZER.stage_lr_mult per backbone stage), as PaddleVideo's ``ParamAttr``
learning rates do (docs/training.md "Learning-rate multipliers").
"""

from __future__ import annotations

import math

import paddle

from .config import DEPTHS, ConfigError


def scaled_lr(opt_cfg, global_batch: int) -> float:
    return opt_cfg.base_lr * global_batch / opt_cfg.base_batch_size


def lr_milestones(opt_cfg, total_iters: int) -> list[int]:
    """Iterations at which the LR drops, e.g. [333, 666] for 1000 iterations."""
    return [max(1, int(round(f * total_iters))) for f in opt_cfg.decay_points]


def _warmup(opt_cfg, steps_per_epoch: int, global_batch: int) -> tuple[int, float]:
    """(warm-up steps, the LR of its first step). Without warmup_start_lr the ramp starts at lr / steps, so
    that the first step already moves; a warm-up whose start is the LR itself (one step) is no warm-up."""
    lr = scaled_lr(opt_cfg, global_batch)
    warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
    if warmup == 0:
        return 0, lr
    given = opt_cfg.warmup_start_lr
    start = lr / warmup if given is None else given * global_batch / opt_cfg.base_batch_size
    return (warmup, start) if start < lr else (0, lr)


def lr_at(opt_cfg, step: int, steps_per_epoch: int, epochs: int, global_batch: int) -> float:
    """The LR at iteration ``step`` (0-based): the pure definition the scheduler implements."""
    lr = scaled_lr(opt_cfg, global_batch)
    warmup, start = _warmup(opt_cfg, steps_per_epoch, global_batch)
    if step < warmup:
        return start + (lr - start) * step / warmup
    total = steps_per_epoch * epochs
    if opt_cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    drops = sum(step >= m for m in lr_milestones(opt_cfg, total))
    return lr * opt_cfg.decay_factor**drops


def build_scheduler(opt_cfg, steps_per_epoch: int, epochs: int, global_batch: int) -> paddle.optimizer.lr.LRScheduler:
    """The LR schedule of ``lr_at`` as a Paddle scheduler, stepped once per iteration."""
    lr = scaled_lr(opt_cfg, global_batch)
    warmup, start = _warmup(opt_cfg, steps_per_epoch, global_batch)
    total = steps_per_epoch * epochs
    # LinearWarmup restarts the wrapped schedule's count after warm-up: the schedules below count from
    # the end of warm-up
    if opt_cfg.schedule == "cosine":
        sched = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=max(1, total - warmup))
    else:
        milestones = lr_milestones(opt_cfg, total)
        values = [lr * opt_cfg.decay_factor**i for i in range(len(milestones) + 1)]
        sched = paddle.optimizer.lr.PiecewiseDecay([max(1, m - warmup) for m in milestones], values)
    if warmup > 0:  # LinearWarmup asserts start < end: _warmup drops a ramp that would not rise
        sched = paddle.optimizer.lr.LinearWarmup(sched, warmup, start, lr)
    return sched


def backbone_stages(model: paddle.nn.Layer) -> list[list[str]]:
    """Parameter-name prefixes of the parts OPTIMIZER.stage_lr_mult sets: [stem, stage 1, ..., stage N].
    A backbone names its own (``stage_prefixes()``, relative to it); a ResNet's blocks lie in one flat
    ``stages`` list, cut into stages by its depth."""
    backbone = model.backbone
    if hasattr(backbone, "stage_prefixes"):
        return [[f"backbone.{p}" for p in part] for part in backbone.stage_prefixes()]
    parts, first = [["backbone.stem"]], 0
    for n in DEPTHS[backbone.depth].stage_blocks:
        parts.append([f"backbone.stages.{i}" for i in range(first, first + n)])
        first += n
    return parts


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix.rstrip(".") + ".")


def lr_multipliers(opt_cfg, model: paddle.nn.Layer, label: str = "MODEL") -> dict[str, float]:
    """{parameter name: LR multiplier} for the parameters whose multiplier is not 1: stage_lr_mult per
    backbone part, then lr_mult by name prefix (the longest matching prefix wins, over any stage's)."""
    names = [n for n, p in model.named_parameters() if not p.stop_gradient]
    rules: list[tuple[str, float]] = []
    if opt_cfg.stage_lr_mult is not None:
        parts = backbone_stages(model)
        if len(opt_cfg.stage_lr_mult) != len(parts):
            raise ConfigError(
                f"config error: OPTIMIZER.stage_lr_mult = {opt_cfg.stage_lr_mult}: the backbone of {label} has "
                f"{len(parts)} parts (stem and {len(parts) - 1} stages); give one multiplier for each"
            )
        rules += [(p, float(m)) for part, m in zip(parts, opt_cfg.stage_lr_mult) for p in part]
    for prefix in opt_cfg.lr_mult:
        if not any(_matches(n, prefix) for n in names):
            close = sorted({".".join(n.split(".")[:3]) for n in names})[:6]
            raise ConfigError(
                f"config error: OPTIMIZER.lr_mult: {prefix!r} is the prefix of no trainable parameter of {label}; "
                f"parameters are named like {', '.join(close)} ... (e.g. head.fc.weight)"
            )
    out = {}
    for name in names:
        stage = [m for p, m in rules if _matches(name, p)]
        own = sorted((len(p), m) for p, m in opt_cfg.lr_mult.items() if _matches(name, p))
        mult = own[-1][1] if own else stage[0] if stage else 1.0
        if mult != 1.0:
            out[name] = mult
    return out


def param_groups(opt_cfg, model: paddle.nn.Layer, label: str = "MODEL") -> list[dict]:
    """The model's trainable parameters grouped by (LR multiplier, weight decay). L2 decay applies to conv
    and linear weights only, whatever their multiplier (as PaddleVideo's heads and BatchNorms set it:
    L2 1e-4 on the classifier's weight, none on its bias or on BatchNorm); Paddle adds it to the gradient,
    so it is scaled by the multiplier too, as in PaddleVideo."""
    mults = lr_multipliers(opt_cfg, model, label)
    groups: dict[tuple[float, bool], list] = {}
    for name, p in model.named_parameters():
        if not p.stop_gradient:
            groups.setdefault((mults.get(name, 1.0), p.ndim > 1), []).append(p)
    # without multipliers: exactly the two groups (decay, no decay) of before, in that order
    order = sorted(groups, key=lambda k: (k[0] != 1.0, k[0], not k[1]))
    return [
        {
            "params": groups[k],
            "weight_decay": paddle.regularizer.L2Decay(opt_cfg.weight_decay) if k[1] else 0.0,
            **({"learning_rate": k[0]} if k[0] != 1.0 else {}),
        }
        for k in order
    ]


def build_optimizer(opt_cfg, scheduler, model: paddle.nn.Layer | list) -> paddle.optimizer.Optimizer:
    """Momentum over ``param_groups(model)`` (or the groups given, e.g. a student's and a peer's)."""
    groups = model if isinstance(model, list) else param_groups(opt_cfg, model)
    clip = paddle.nn.ClipGradByGlobalNorm(opt_cfg.grad_clip) if opt_cfg.grad_clip else None
    return paddle.optimizer.Momentum(
        learning_rate=scheduler,
        momentum=opt_cfg.momentum,
        parameters=groups,
        use_nesterov=opt_cfg.nesterov,
        grad_clip=clip,
    )
