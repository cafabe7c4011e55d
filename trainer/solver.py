"""Optimizer and LR schedules of the recipes (docs/design.md "Training recipe").

LR = base_lr x global_batch / base_batch_size after an optional linear warm-up, then either decayed
x decay_factor at fractions of the total *iterations* (TSN's "step"), or annealed to 0 along a cosine
over the iterations left after warm-up (the PP recipes' "cosine"); stepped once per iteration.
"""

from __future__ import annotations

import math

import paddle


def scaled_lr(opt_cfg, global_batch: int) -> float:
    return opt_cfg.base_lr * global_batch / opt_cfg.base_batch_size


def lr_milestones(opt_cfg, total_iters: int) -> list[int]:
    """Iterations at which the LR drops, e.g. [333, 666] for 1000 iterations."""
    return [max(1, int(round(f * total_iters))) for f in opt_cfg.decay_points]


def lr_at(opt_cfg, step: int, steps_per_epoch: int, epochs: int, global_batch: int) -> float:
    """The LR at iteration ``step`` (0-based): the pure definition the scheduler implements."""
    lr = scaled_lr(opt_cfg, global_batch)
    warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        start = lr / warmup
        return start + (lr - start) * step / warmup
    total = steps_per_epoch * epochs
    if opt_cfg.schedule == "cosine":
        return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    drops = sum(step >= m for m in lr_milestones(opt_cfg, total))
    return lr * opt_cfg.decay_factor**drops


def build_scheduler(opt_cfg, steps_per_epoch: int, epochs: int, global_batch: int) -> paddle.optimizer.lr.LRScheduler:
    """The LR schedule of ``lr_at`` as a Paddle scheduler, stepped once per iteration."""
    lr = scaled_lr(opt_cfg, global_batch)
    warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
    total = steps_per_epoch * epochs
    # LinearWarmup restarts the wrapped schedule's count after warm-up: the schedules below count from
    # the end of warm-up
    if opt_cfg.schedule == "cosine":
        sched = paddle.optimizer.lr.CosineAnnealingDecay(lr, T_max=max(1, total - warmup))
    else:
        milestones = lr_milestones(opt_cfg, total)
        values = [lr * opt_cfg.decay_factor**i for i in range(len(milestones) + 1)]
        sched = paddle.optimizer.lr.PiecewiseDecay([max(1, m - warmup) for m in milestones], values)
    if warmup > 0:
        sched = paddle.optimizer.lr.LinearWarmup(sched, warmup, lr / warmup, lr)
    return sched


def build_optimizer(opt_cfg, scheduler, model: paddle.nn.Layer) -> paddle.optimizer.Optimizer:
    """Momentum; L2 decay on conv/linear weights only (not on BatchNorm or biases)."""
    decay = [p for p in model.parameters() if not p.stop_gradient and p.ndim > 1]
    no_decay = [p for p in model.parameters() if not p.stop_gradient and p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": paddle.regularizer.L2Decay(opt_cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    clip = paddle.nn.ClipGradByGlobalNorm(opt_cfg.grad_clip) if opt_cfg.grad_clip else None
    return paddle.optimizer.Momentum(
        learning_rate=scheduler,
        momentum=opt_cfg.momentum,
        parameters=groups,
        use_nesterov=opt_cfg.nesterov,
        grad_clip=clip,
    )
