import numpy as np
import paddle
import pytest

from trainer.config import load_config
from trainer.models import build_model
from trainer.solver import build_scheduler, build_optimizer, lr_at, lr_milestones


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 5}\n")
    return load_config(str(p))


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


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_backbone_runs_forward_and_backward(cfg, depth):
    cfg.MODEL.backbone["depth"] = depth
    model = build_model(cfg)
    x = paddle.randn([2, 3, 3, 32, 32])
    logits = model(x)
    assert list(logits.shape) == [2, 5]
    loss = paddle.nn.functional.cross_entropy(logits, paddle.to_tensor([0, 4]))
    loss.backward()
    first = model.backbone.stem[0][0].weight
    assert np.isfinite(float(loss)) and float(first.grad.abs().sum()) > 0


def test_head_averages_segments_before_the_classifier(cfg):
    """Average consensus: the classifier of the mean of the segments' features, whatever their order."""
    cfg.MODEL.head["dropout"] = 0.0
    model = build_model(cfg)
    model.eval()
    clip = paddle.randn([2, 3, 3, 32, 32])  # three distinct segments per clip
    feats = model.backbone(clip.reshape([6, 3, 32, 32])).numpy().reshape(2, 3, -1)
    weight, bias = model.head.fc.weight.numpy(), model.head.fc.bias.numpy()
    expected = feats.mean(axis=1) @ weight + bias
    np.testing.assert_allclose(model(clip).numpy(), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(feats.max(axis=1) @ weight + bias, expected, atol=1e-3)  # max consensus differs
    reordered = paddle.concat([clip[:, 2:], clip[:, :1], clip[:, 1:2]], axis=1)
    np.testing.assert_allclose(model(reordered).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_pretrained_loads_backbone_and_skips_a_classifier_of_another_class_count(cfg, tmp_path):
    from trainer.weights import load_pretrained
    source = build_model(cfg)  # 5 classes
    paddle.save(source.state_dict(), str(tmp_path / "k400.pdparams"))
    paddle.save(source.backbone.state_dict(), str(tmp_path / "imagenet.pdparams"))
    cfg.MODEL.head["num_classes"] = 7
    for name in ("k400.pdparams", "imagenet.pdparams"):
        target = build_model(cfg)
        report = load_pretrained(target, str(tmp_path / name))
        np.testing.assert_array_equal(target.backbone.stem[0][0].weight.numpy(),
                                      source.backbone.stem[0][0].weight.numpy())
        assert list(target.head.fc.weight.shape) == [64, 7]
        assert "head.fc.weight" in report
    assert "skipped (shape differs) ['head.fc.bias', 'head.fc.weight']" in load_pretrained(
        build_model(cfg), str(tmp_path / "k400.pdparams"))
    with pytest.raises(FileNotFoundError, match="MODEL.backbone.pretrained"):
        load_pretrained(build_model(cfg), str(tmp_path / "nope.pdparams"))


def _paddlevideo_tsn_state(depth, num_classes, rng):
    """A state dict named the way PaddleVideo's TSN (Recognizer2D + ResNet + TSNHead) names it."""
    blocks = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}[depth]
    widths = (64, 128, 256, 512)
    state, cin = {}, 64

    def conv_bn(prefix, cout, cin_, k):
        state[f"{prefix}._conv.weight"] = rng.standard_normal((cout, cin_, k, k)).astype("float32")
        for f in ("weight", "bias", "_mean", "_variance"):
            state[f"{prefix}._batch_norm.{f}"] = rng.standard_normal(cout).astype("float32")
    conv_bn("backbone.conv", 64, 3, 7)
    for s, n in enumerate(blocks):
        for j in range(n):
            name = f"res{s + 2}" + ("a" if j == 0 else f"b{j}") if depth == 101 and s == 2 else f"res{s + 2}{chr(97 + j)}"
            w = widths[s]
            conv_bn(f"backbone.{name}.conv0", w, cin, 1)
            conv_bn(f"backbone.{name}.conv1", w, w, 3)
            conv_bn(f"backbone.{name}.conv2", 4 * w, w, 1)
            if j == 0:
                conv_bn(f"backbone.{name}.short", 4 * w, cin, 1)
            cin = 4 * w
    state["head.fc.weight"] = rng.standard_normal((2048, num_classes)).astype("float32")
    state["head.fc.bias"] = rng.standard_normal(num_classes).astype("float32")
    return state


@pytest.mark.parametrize("depth", [50, 101])
def test_a_tsn_checkpoint_trained_by_paddlevideo_loads(cfg, tmp_path, depth):
    from trainer import checkpoint, weights
    rng = np.random.default_rng(depth)
    pv = _paddlevideo_tsn_state(depth, 5, rng)
    paddle.save({k: paddle.to_tensor(v) for k, v in pv.items()}, str(tmp_path / "pv.pdparams"))
    cfg.MODEL.backbone.update(depth=depth, base_channels=64)
    model = build_model(cfg)
    weights.load_weights(model, str(tmp_path / "pv.pdparams"))  # raises unless every tensor has a place
    ours = model.state_dict()
    first_of_stage3 = 3 + 4  # ResNet-50/101: stages of 3 and 4 blocks come before res4a
    pairs = {"backbone.conv._conv.weight": "backbone.stem.0.0.weight",
             "backbone.res2a.short._batch_norm._variance": "backbone.stages.0.shortcut.1._variance",
             "backbone.res3b.conv1._conv.weight": "backbone.stages.4.branch.1.0.weight",
             "backbone.res4a.conv2._batch_norm.weight": f"backbone.stages.{first_of_stage3}.branch.2.1.weight",
             "head.fc.bias": "head.fc.bias"}
    last4 = "res4b22" if depth == 101 else "res4f"
    pairs[f"backbone.{last4}.conv0._conv.weight"] = \
        f"backbone.stages.{first_of_stage3 + (22 if depth == 101 else 5)}.branch.0.0.weight"
    for theirs, mine in pairs.items():
        np.testing.assert_array_equal(ours[mine].numpy(), pv[theirs])


def test_paddlevideo_static_imagenet_names_map_to_the_backbone():
    from trainer.paddlevideo_names import from_paddlevideo
    state = {"conv1_weights": 1, "bn_conv1_scale": 2, "res2a_branch2a_weights": 3, "bn2a_branch2a_offset": 4,
             "res3a_branch1_weights": 5, "bn5c_branch2c_variance": 6, "fc_0.w_0": 7}
    mapped, unused = from_paddlevideo(state, 50)
    assert mapped == {"backbone.stem.0.0.weight": 1, "backbone.stem.0.1.weight": 2,
                      "backbone.stages.0.branch.0.0.weight": 3, "backbone.stages.0.branch.0.1.bias": 4,
                      "backbone.stages.3.shortcut.0.weight": 5, "backbone.stages.15.branch.2.1._variance": 6}
    assert unused == ["fc_0.w_0"]
