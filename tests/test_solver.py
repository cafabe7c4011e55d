"""LR schedules value by value, warm-up, cosine, Nesterov, and where weight decay applies."""

import numpy as np
import pytest

from trainer.models import build_model
from trainer.solver import build_optimizer, build_scheduler, lr_at, lr_milestones


def test_lr_scales_with_global_batch_and_drops_at_a_third_and_two_thirds_of_iterations(cfg):
    steps, epochs = 10, 9
    assert lr_milestones(cfg.OPTIMIZER, steps * epochs) == [30, 60]
    sched = build_scheduler(cfg.OPTIMIZER, steps, epochs, global_batch=512)
    seen = []
    for step in range(steps * epochs):
        seen.append(sched.get_lr())
        assert seen[-1] == pytest.approx(lr_at(cfg.OPTIMIZER, step, steps, epochs, 512))
        sched.step()
    assert seen[0] == pytest.approx(0.02) and seen[29] == pytest.approx(0.02)
    assert seen[30] == pytest.approx(0.002) and seen[60] == pytest.approx(0.0002)


def test_warmup_ramps_linearly_then_keeps_the_absolute_milestones(cfg):
    cfg.OPTIMIZER["warmup_epochs"] = 1.0
    sched = build_scheduler(cfg.OPTIMIZER, 10, 9, 256)
    lrs = []
    for _ in range(90):
        lrs.append(sched.get_lr())
        sched.step()
    assert lrs[0] == pytest.approx(0.001) and lrs[9] < lrs[10] == pytest.approx(0.01)
    assert np.all(np.diff(lrs[:10]) > 0)
    assert lrs[29] == pytest.approx(0.01) and lrs[30] == pytest.approx(0.001)
    for step, v in enumerate(lrs):
        assert v == pytest.approx(lr_at(cfg.OPTIMIZER, step, 10, 9, 256))


def test_cosine_schedule_warms_up_then_anneals_to_zero(cfg):
    cfg.OPTIMIZER.update(schedule="cosine", warmup_epochs=2.0)
    steps, epochs = 10, 10
    sched = build_scheduler(cfg.OPTIMIZER, steps, epochs, 256)
    lrs = []
    for step in range(steps * epochs):
        lrs.append(sched.get_lr())
        assert lrs[-1] == pytest.approx(lr_at(cfg.OPTIMIZER, step, steps, epochs, 256), abs=1e-9)
        sched.step()
    assert np.all(np.diff(lrs[:20]) > 0) and lrs[20] == pytest.approx(0.01)
    assert np.all(np.diff(lrs[20:]) < 0) and lrs[60] == pytest.approx(0.005) and lrs[-1] < 1e-5


def test_nesterov_reaches_the_optimizer(cfg):
    cfg.OPTIMIZER["nesterov"] = True
    opt = build_optimizer(cfg.OPTIMIZER, build_scheduler(cfg.OPTIMIZER, 10, 2, 256), build_model(cfg))
    assert opt._use_nesterov


def test_weight_decay_applies_to_weights_but_not_to_batchnorm_or_bias(cfg):
    model = build_model(cfg)
    opt = build_optimizer(cfg.OPTIMIZER, 0.1, model)
    decay, no_decay = opt._param_groups
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim == 1 for p in no_decay["params"])
    trainable = [p for p in model.parameters() if not p.stop_gradient]  # BN statistics are frozen parameters
    assert len(decay["params"]) + len(no_decay["params"]) == len(trainable)
