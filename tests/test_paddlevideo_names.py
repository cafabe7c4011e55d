"""Weights saved by PaddleVideo / PaddleClas (dygraph, static and current names) map onto this ResNet and load."""

import os

import numpy as np
import paddle
import pytest

from trainer.config import load_config
from trainer.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
            name = (
                f"res{s + 2}" + ("a" if j == 0 else f"b{j}") if depth == 101 and s == 2 else f"res{s + 2}{chr(97 + j)}"
            )
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
    from trainer import weights

    rng = np.random.default_rng(depth)
    pv = _paddlevideo_tsn_state(depth, 5, rng)
    paddle.save({k: paddle.to_tensor(v) for k, v in pv.items()}, str(tmp_path / "pv.pdparams"))
    cfg.MODEL.backbone.update(depth=depth, base_channels=64)
    model = build_model(cfg)
    weights.load_weights(model, str(tmp_path / "pv.pdparams"))  # raises unless every tensor has a place
    ours = model.state_dict()
    first_of_stage3 = 3 + 4  # ResNet-50/101: stages of 3 and 4 blocks come before res4a
    pairs = {
        "backbone.conv._conv.weight": "backbone.stem.0.0.weight",
        "backbone.res2a.short._batch_norm._variance": "backbone.stages.0.shortcut.1._variance",
        "backbone.res3b.conv1._conv.weight": "backbone.stages.4.branch.1.0.weight",
        "backbone.res4a.conv2._batch_norm.weight": f"backbone.stages.{first_of_stage3}.branch.2.1.weight",
        "head.fc.bias": "head.fc.bias",
    }
    last4 = "res4b22" if depth == 101 else "res4f"
    pairs[f"backbone.{last4}.conv0._conv.weight"] = (
        f"backbone.stages.{first_of_stage3 + (22 if depth == 101 else 5)}.branch.0.0.weight"
    )
    for theirs, mine in pairs.items():
        np.testing.assert_array_equal(ours[mine].numpy(), pv[theirs])


def test_paddlevideo_static_imagenet_names_map_to_the_backbone():
    from trainer.paddlevideo_names import from_paddlevideo

    state = {
        "conv1_weights": 1,
        "bn_conv1_scale": 2,
        "res2a_branch2a_weights": 3,
        "bn2a_branch2a_offset": 4,
        "res3a_branch1_weights": 5,
        "bn5c_branch2c_variance": 6,
        "fc_0.w_0": 7,
    }
    mapped, unused = from_paddlevideo(state, 50)
    assert mapped == {
        "backbone.stem.0.0.weight": 1,
        "backbone.stem.0.1.weight": 2,
        "backbone.stages.0.branch.0.0.weight": 3,
        "backbone.stages.0.branch.0.1.bias": 4,
        "backbone.stages.3.shortcut.0.weight": 5,
        "backbone.stages.15.branch.2.1._variance": 6,
    }
    assert unused == ["fc_0.w_0"]


def _paddlevideo_vd_state(model, rng):
    """The state dict PaddleVideo's ResNetTweaksTSN/TSM (and PaddleClas's legacy ResNet50_vd) would hold
    for ``model``'s backbone: conv1_1..3, bb_{stage}_{block}.conv0..2 / short, _conv and _batch_norm."""
    ours = model.state_dict()
    names = {}
    for i in range(3):
        names[f"conv1_{i + 1}"] = f"backbone.stem.{i}"
    k = 0
    for s, n in enumerate((3, 4, 6, 3)):
        for j in range(n):
            for c in range(3):
                names[f"bb_{s}_{j}.conv{c}"] = f"backbone.stages.{k}.branch.{c}"
            if j == 0:
                names[f"bb_{s}_{j}.short"] = f"backbone.stages.{k}.shortcut"
            k += 1
    state, pairs = {}, {}
    for theirs, mine in names.items():
        for field_theirs, field_mine in (
            ("_conv.weight", "0.weight"),
            ("_batch_norm.weight", "1.weight"),
            ("_batch_norm.bias", "1.bias"),
            ("_batch_norm._mean", "1._mean"),
            ("_batch_norm._variance", "1._variance"),
        ):
            shape = ours[f"{mine}.{field_mine}"].shape
            state[f"{theirs}.{field_theirs}"] = rng.standard_normal(shape).astype("float32")
            pairs[f"{theirs}.{field_theirs}"] = f"{mine}.{field_mine}"
    state["out.weight"] = rng.standard_normal((2048, 1000)).astype("float32")  # the ImageNet classifier
    return state, pairs


@pytest.mark.parametrize("config", ["pptsn.yaml", "pptsm.yaml"])
def test_imagenet_resnet50_vd_weights_named_as_paddlevideo_fill_the_pp_backbones(tmp_path, config):
    from trainer.weights import load_pretrained

    cfg = load_config(os.path.join(ROOT, "configs", config), ["MODEL.head.num_classes=5"])
    model = build_model(cfg)
    state, pairs = _paddlevideo_vd_state(model, np.random.default_rng(0))
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(tmp_path / "ResNet50_vd.pdparams"))
    report = load_pretrained(model, str(tmp_path / "ResNet50_vd.pdparams"))
    assert f"loaded {len(pairs)}/{len(model.state_dict())} tensors" in report and "unused ['out.weight']" in report
    ours = model.state_dict()
    for theirs, mine in pairs.items():
        np.testing.assert_array_equal(ours[mine].numpy(), state[theirs])
    # the same file given to a plain-ResNet model is a config error, not half a network
    from trainer.config import ConfigError

    tsn = build_model(load_config(os.path.join(ROOT, "configs", "tsn.yaml"), ["MODEL.head.num_classes=5"]))
    with pytest.raises(ConfigError, match="holds ResNet-vd weights but MODEL.name selects a ResNet backbone"):
        load_pretrained(tsn, str(tmp_path / "ResNet50_vd.pdparams"))


def test_paddleclas_current_resnet_vd_names_map_to_the_backbone():
    from trainer.paddlevideo_names import from_paddlevideo

    state = {
        "stem.0.conv.weight": 1,
        "stem.2.bn._variance": 2,
        "blocks.3.short.conv.weight": 3,
        "blocks.15.conv2.bn.bias": 4,
        "fc.weight": 5,
    }
    mapped, unused = from_paddlevideo(state, 50, "vd")
    assert mapped == {
        "backbone.stem.0.0.weight": 1,
        "backbone.stem.2.1._variance": 2,
        "backbone.stages.3.shortcut.0.weight": 3,
        "backbone.stages.15.branch.2.1.bias": 4,
    }
    assert unused == ["fc.weight"]
