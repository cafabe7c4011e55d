"""Every configured model, the temporal shift, ResNet-vd, and what temporal modelling changes."""

import glob
import os

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from trainer.config import load_config
from trainer.engine import classification_loss
from trainer.models import build_model, temporal_shift

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def tiny(config, name=None, **pipeline):
    """A config shrunk to width 8 at 32x32 (its depth, segments and architecture kept)."""
    overrides = ["MODEL.backbone.base_channels=8", "MODEL.backbone.pretrained=''", "PIPELINE.target_size=32"]
    overrides += [f"MODEL.name={name}"] if name else []
    overrides += [f"PIPELINE.{k}={v}" for k, v in pipeline.items()]
    return load_config(config, overrides)


def _trains_a_step(cfg):
    """Forward and backward on random clips: the logits' shape, a finite loss, gradients at the first conv."""
    paddle.seed(0)
    model = build_model(cfg)
    model.train()
    clips = paddle.randn([2, cfg.PIPELINE.num_segments, 3, 32, 32])
    logits = model(clips)
    assert logits.shape == [2, cfg.MODEL.head.num_classes]
    loss = classification_loss(logits, paddle.to_tensor([0, 1]), cfg.MODEL.head.label_smoothing)
    loss.backward()
    first = model.backbone.stem[0][0].weight
    assert np.isfinite(float(loss)) and first.grad is not None and float(first.grad.abs().sum()) > 0


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_configured_model_trains_a_step_on_tiny_inputs(config):
    _trains_a_step(tiny(config))


@pytest.mark.parametrize("depth", [18, 34, 50, 101])
def test_every_backbone_depth_trains_a_step(cfg, depth):
    cfg.MODEL.backbone["depth"] = depth
    _trains_a_step(cfg)


def test_the_slice_and_concat_shift_equals_paddles_temporal_shift_op():
    x = paddle.randn([3 * 8, 16, 4, 5])
    for div in (4, 8):
        np.testing.assert_array_equal(temporal_shift(x, 8, div).numpy(), F.temporal_shift(x, 8, 1 / div).numpy())


def test_the_shift_moves_one_eighth_of_the_channels_each_way_within_a_clip():
    t, c = 4, 16
    x = paddle.arange(2 * t, dtype="float32").reshape([2 * t, 1, 1, 1]).expand([2 * t, c, 1, 1]) + 1
    out = temporal_shift(x, t, 8).numpy()[:, :, 0, 0]
    frame = np.arange(2 * t).reshape(2, t) + 1  # clip, segment -> the value each frame carries
    for clip in range(2):
        for s in range(t):
            row = out[clip * t + s]
            assert row[0] == row[1] == (frame[clip, s - 1] if s > 0 else 0)  # from the previous segment
            assert row[2] == row[3] == (frame[clip, s + 1] if s < t - 1 else 0)  # from the next segment
            assert (row[4:] == frame[clip, s]).all()  # the rest stay


def _eval_model(name, segments=4):
    cfg = tiny(os.path.join(ROOT, "configs", "tsm.yaml"), name, num_segments=segments)
    cfg.MODEL.backbone["depth"] = 18
    paddle.seed(1)
    model = build_model(cfg)
    model.eval()
    return model


@pytest.mark.parametrize("name", ["TSN", "PP-TSN"])
def test_tsn_cannot_see_frame_order(name):
    model = _eval_model(name)
    clip = paddle.randn([2, 4, 3, 32, 32])
    with paddle.no_grad():
        np.testing.assert_allclose(model(clip).numpy(), model(clip.flip([1])).numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["TSM", "PP-TSM"])
def test_tsm_sees_frame_order(name):
    model = _eval_model(name)
    clip = paddle.randn([2, 4, 3, 32, 32])
    with paddle.no_grad():
        forward, backward = model(clip).numpy(), model(clip.flip([1])).numpy()
    assert np.abs(forward - backward).max() > 1e-3


def test_tsm_shifts_within_each_test_clip_not_across_clips():
    model = _eval_model("TSM")
    a, b = paddle.randn([1, 4, 3, 32, 32]), paddle.randn([1, 4, 3, 32, 32])
    with paddle.no_grad():
        two_clips = model(paddle.concat([a, b], axis=1)).numpy()
        separate = (model(a).numpy() + model(b).numpy()) / 2
    np.testing.assert_allclose(two_clips, separate, rtol=1e-4, atol=1e-5)


def test_resnet_vd_has_a_deep_stem_and_average_pool_shortcuts():
    model = _eval_model("PP-TSN")
    stem_convs = [m for m in model.backbone.stem.sublayers() if isinstance(m, paddle.nn.Conv2D)]
    assert [c.weight.shape[2] for c in stem_convs] == [3, 3, 3]
    downsampling = [b for b in model.backbone.stages if b.shortcut is not None and b.pool is not None]
    assert len(downsampling) == 3 and all(b.shortcut[0]._stride == [1, 1] for b in downsampling)
    plain = _eval_model("TSN")
    assert [m.weight.shape[2] for m in plain.backbone.stem.sublayers() if isinstance(m, paddle.nn.Conv2D)] == [7]
    assert all(b.pool is None for b in plain.backbone.stages)


def test_label_smoothing_matches_the_soft_label_definition():
    logits = paddle.randn([4, 5])
    labels = paddle.to_tensor([0, 3, 4, 1])
    eps = 0.1
    soft = F.one_hot(labels, 5) * (1 - eps) + eps / 5
    expected = -(soft * F.log_softmax(logits, axis=1)).sum(axis=1).mean()
    np.testing.assert_allclose(float(classification_loss(logits, labels, eps)), float(expected), rtol=1e-5)
    np.testing.assert_allclose(
        float(classification_loss(logits, labels)), float(F.cross_entropy(logits, labels)), rtol=1e-5
    )


def test_mixup_blends_each_clip_with_its_partner_by_one_weight():
    from trainer.engine import mixup

    imgs = paddle.randn([6, 2, 3, 4, 4])
    labels = paddle.arange(6)
    mixed, partners, lam = mixup(imgs, labels, 0.2, np.random.default_rng(0))
    assert 0 <= lam <= 1 and sorted(partners.numpy().tolist()) == list(range(6))
    expected = imgs.numpy() * lam + imgs.numpy()[partners.numpy()] * (1 - lam)
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-5, atol=1e-6)


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
