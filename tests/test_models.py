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


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: os.path.basename(p))
def test_every_configured_model_trains_a_step_on_tiny_inputs(config):
    cfg = tiny(config)
    paddle.seed(0)
    model = build_model(cfg)
    model.train()
    t = cfg.PIPELINE.num_segments
    clips = paddle.randn([2, t, 3, 32, 32])
    logits = model(clips)
    assert logits.shape == [2, cfg.MODEL.head.num_classes]
    loss = classification_loss(logits, paddle.to_tensor([0, 1]), cfg.MODEL.head.label_smoothing)
    loss.backward()
    first = model.backbone.stem[0][0].weight
    assert np.isfinite(float(loss)) and first.grad is not None and float(first.grad.abs().sum()) > 0


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
            assert row[0] == row[1] == (frame[clip, s - 1] if s > 0 else 0)      # from the previous segment
            assert row[2] == row[3] == (frame[clip, s + 1] if s < t - 1 else 0)  # from the next segment
            assert (row[4:] == frame[clip, s]).all()                             # the rest stay


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
    np.testing.assert_allclose(float(classification_loss(logits, labels)), float(F.cross_entropy(logits, labels)),
                               rtol=1e-5)


def test_mixup_blends_each_clip_with_its_partner_by_one_weight():
    from trainer.engine import mixup
    imgs = paddle.randn([6, 2, 3, 4, 4])
    labels = paddle.arange(6)
    mixed, partners, lam = mixup(imgs, labels, 0.2, np.random.default_rng(0))
    assert 0 <= lam <= 1 and sorted(partners.numpy().tolist()) == list(range(6))
    expected = imgs.numpy() * lam + imgs.numpy()[partners.numpy()] * (1 - lam)
    np.testing.assert_allclose(mixed.numpy(), expected, rtol=1e-5, atol=1e-6)


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
        for field_theirs, field_mine in (("_conv.weight", "0.weight"), ("_batch_norm.weight", "1.weight"),
                                         ("_batch_norm.bias", "1.bias"), ("_batch_norm._mean", "1._mean"),
                                         ("_batch_norm._variance", "1._variance")):
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
    state = {"stem.0.conv.weight": 1, "stem.2.bn._variance": 2, "blocks.3.short.conv.weight": 3,
             "blocks.15.conv2.bn.bias": 4, "fc.weight": 5}
    mapped, unused = from_paddlevideo(state, 50, "vd")
    assert mapped == {"backbone.stem.0.0.weight": 1, "backbone.stem.2.1._variance": 2,
                      "backbone.stages.3.shortcut.0.weight": 3, "backbone.stages.15.branch.2.1.bias": 4}
    assert unused == ["fc.weight"]


def test_a_tsm_exports_to_onnx_with_matching_scores(tmp_path):
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    from trainer.export import export
    cfg = tiny(os.path.join(ROOT, "configs", "tsm.yaml"), num_segments=4, test_num_clips=2)
    cfg.MODEL.backbone["depth"] = 18
    cfg.MODEL.head["num_classes"] = 3
    model = build_model(cfg)
    report = export(cfg, model, str(tmp_path), ["a", "b", "c"], onnx=True)  # raises beyond 1e-4
    assert report["onnx_max_diff"] < 1e-4 and report["paddle_inference_max_diff"] < 1e-4
    import onnx
    graph = onnx.load(report["onnx"])
    assert graph.opset_import[0].version >= 11
    assert {n.op_type for n in graph.graph.node} >= {"Concat", "Slice"}


def test_the_motion_task_classes_are_each_others_time_reversal():
    from preprocessing.make_demo_dataset import render_motion_clip
    right = render_motion_clip("moving right", 30, 96, 72, np.random.default_rng(4))
    left = render_motion_clip("moving left", 30, 96, 72, np.random.default_rng(4))
    np.testing.assert_array_equal(left, right[::-1])
    # the objects move right: the centre of mass of what differs from the first frame drifts right
    xs = [np.nonzero(np.abs(f.astype(int) - right[15].astype(int)).sum(axis=2) > 60)[1].mean() for f in right[[0, 29]]]
    assert xs[0] < xs[1]


def test_the_motion_task_dataset_has_two_direction_classes(tmp_path):
    from preprocessing.make_demo_dataset import main
    assert main([str(tmp_path), "--task", "motion", "--train-per-class", "1", "--val-per-class", "1",
                 "--min-frames", "8", "--max-frames", "8"]) == 0
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["moving_left", "moving_right"]
    rows = (tmp_path / "kinetics_demo_val.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["moving right", "moving left"]


def test_the_export_check_compares_probabilities_and_logits_at_their_scale():
    from trainer.export import score_difference
    logits = np.array([[2.0, -1.0, 0.5]])
    assert score_difference(logits, logits) == 0
    assert score_difference(logits + [[1e-3, 0, 0]], logits) > 1e-4        # a real disagreement fails
    big = np.array([[170.0, -40.0, 3.0]])                                   # an untrained ResNet-50's scale
    assert score_difference(big + [[4e-4, 0, 0]], big) < 1e-4              # float32 rounding passes
