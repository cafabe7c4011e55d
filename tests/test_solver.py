"""LR schedules value by value, warm-up, cosine, Nesterov, and where weight decay applies."""

import numpy as np
import pytest

from trainer.models import build_model
from trainer.solver import backbone_stages, build_optimizer, build_scheduler, lr_at, lr_milestones


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


def test_warmup_starts_from_warmup_start_lr_scaled_like_base_lr(cfg):
    cfg.OPTIMIZER.update(schedule="cosine", warmup_epochs=2.0, warmup_start_lr=0.005)
    sched = build_scheduler(cfg.OPTIMIZER, 5, 10, global_batch=512)  # x2 of base_batch_size 256
    lrs = []
    for step in range(50):
        lrs.append(sched.get_lr())
        assert lrs[-1] == pytest.approx(lr_at(cfg.OPTIMIZER, step, 5, 10, 512), abs=1e-12)
        sched.step()
    expected = [0.01 + (0.02 - 0.01) * s / 10 for s in range(10)]  # 0.005 x 2 rising to 0.01 x 2 over 10 steps
    np.testing.assert_allclose(lrs[:10], expected, rtol=1e-9)
    assert lrs[10] == pytest.approx(0.02)


@pytest.mark.parametrize("start", [None, 0.01])
def test_a_warmup_of_one_step_is_the_full_lr_not_an_assertion(cfg, start):
    """Issue 25: batch_size 1, one sample, warmup_epochs 1: one warm-up step whose start is the LR itself."""
    cfg.OPTIMIZER.update(warmup_epochs=1.0, warmup_start_lr=start)
    sched = build_scheduler(cfg.OPTIMIZER, steps_per_epoch=1, epochs=3, global_batch=1)
    lrs = []
    for _ in range(3):
        lrs.append(sched.get_lr())
        sched.step()
    base = 0.01 / 256
    assert lrs == pytest.approx([base, base * 0.1, base * 0.01])  # drops at 1/3 and 2/3 of 3 steps
    assert [lr_at(cfg.OPTIMIZER, s, 1, 3, 1) for s in range(3)] == pytest.approx(lrs)


def test_resnet_stages_are_the_stem_then_each_stage_s_blocks(cfg):
    parts = backbone_stages(build_model(cfg))  # ResNet-18: 2, 2, 2, 2 blocks
    assert parts == [
        ["backbone.stem"],
        ["backbone.stages.0", "backbone.stages.1"],
        ["backbone.stages.2", "backbone.stages.3"],
        ["backbone.stages.4", "backbone.stages.5"],
        ["backbone.stages.6", "backbone.stages.7"],
    ]


def test_lr_multipliers_scale_each_parameters_step_with_decay_as_paddlevideo(cfg):
    """One Momentum step against p - lr * mult * (grad + wd * p [weights only]): the classifier's weight x5
    and bias x10 (PP-TSN's fclr5), per-stage multipliers, the longer prefix over the stage's."""
    import paddle

    stage = [0.0, 0.5, 1.0, 2.0, 3.0]
    cfg.OPTIMIZER.update(
        lr_mult={"head.fc.weight": 5.0, "head.fc.bias": 10.0, "backbone.stages.7.branch": 4.0},
        stage_lr_mult=stage,
        grad_clip=None,
        weight_decay=0.01,
    )
    paddle.seed(1)
    model = build_model(cfg)
    lr = 0.1
    opt = build_optimizer(cfg.OPTIMIZER, lr, model)
    before = {n: p.numpy().astype(np.float64) for n, p in model.named_parameters()}
    x = paddle.to_tensor(np.random.default_rng(0).standard_normal((2, 3, 3, 32, 32)).astype(np.float32))
    model(x).square().mean().backward()
    grads = {n: p.grad.numpy().astype(np.float64) for n, p in model.named_parameters() if p.grad is not None}
    opt.step()

    def mult(name):
        if name.startswith("head.fc.weight"):
            return 5.0
        if name.startswith("head.fc.bias"):
            return 10.0
        if name.startswith("backbone.stages.7.branch."):
            return 4.0
        if name.startswith("backbone.stem."):
            return stage[0]
        return stage[1 + int(name.split(".")[2]) // 2]

    checked = 0
    for name, p in model.named_parameters():
        if p.stop_gradient:
            continue
        decay = 0.01 * before[name] if before[name].ndim > 1 else 0.0
        expected = before[name] - lr * mult(name) * (grads[name] + decay)
        np.testing.assert_allclose(p.numpy(), expected, rtol=1e-5, atol=1e-7, err_msg=name)
        checked += 1
    assert checked == len([p for p in model.parameters() if not p.stop_gradient])
    assert {g.get("learning_rate", 1.0) for g in opt._param_groups} == {0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0}


def test_a_multiplier_that_names_no_parameter_or_the_wrong_stage_count_is_a_config_error(cfg):
    from trainer.config import ConfigError

    cfg.OPTIMIZER["lr_mult"] = {"head.fc.wieght": 5.0}
    with pytest.raises(ConfigError, match=r"'head.fc.wieght' is the prefix of no trainable parameter"):
        build_optimizer(cfg.OPTIMIZER, 0.1, build_model(cfg))
    cfg.OPTIMIZER.update(lr_mult={"head.fc": 5.0}, stage_lr_mult=[1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match=r"stage_lr_mult = .* 5 parts \(stem and 4 stages\)"):
        build_optimizer(cfg.OPTIMIZER, 0.1, build_model(cfg))
