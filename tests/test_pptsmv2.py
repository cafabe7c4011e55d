"""PP-TSMv2: shapes, PaddleVideo's parameter count, re-parameterisation, the temporal attention and the one
shift before stage 3, PaddleVideo / PaddleClas names, and an export with one convolution per block.

With PADDLEVIDEO_DIR pointing at a PaddleVideo checkout, PaddleVideo's own pptsm_v2.py is run on the same
weights and input and must give the same logits (skipped otherwise: tests fetch nothing)."""

from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from tools.media import randomise_bn
from trainer import weights
from trainer.config import ConfigError, load_config
from trainer.models import build_model
from trainer.pptsmv2 import DepthwiseSeparable, shift_bounds, temporal_shift

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "pptsmv2.yaml")


def _cfg(*overrides, segments=4, width=16, classes=5, size=32):
    """PP-TSMv2 at width ``width`` (64: PaddleVideo's scale 1.0) with ``segments`` segments."""
    return load_config(
        CONFIG,
        [
            f"MODEL.backbone.base_channels={width}",
            "MODEL.backbone.pretrained=''",
            f"MODEL.head.num_classes={classes}",
            f"PIPELINE.num_segments={segments}",
            f"PIPELINE.target_size={size}",
            *overrides,
        ],
    )


def _model(*overrides, seed=0, **kw):
    paddle.seed(seed)
    model = build_model(_cfg(*overrides, **kw))
    randomise_bn(model, np.random.default_rng(seed))
    model.eval()
    return model


def _elements(state) -> int:
    return sum(int(np.prod(v.shape)) for v in state.values())


def test_features_and_logits_have_the_expected_shapes():
    model = _model(segments=4)
    clips = paddle.randn([2, 4, 3, 32, 32])
    assert model.backbone(clips.reshape([8, 3, 32, 32])).shape == [8, 1280]
    assert model(clips).shape == [2, 5]
    # a test batch of 3 clips x 4 segments per sample: the shift and the attention stay within each clip
    assert model(paddle.randn([2, 12, 3, 32, 32])).shape == [2, 5]


def test_dropout_scales_features_at_inference_as_paddlevideo_does():
    """PaddleVideo's "downscale_in_infer" dropout: features x (1 - p) in eval mode, unscaled in training."""
    clips = paddle.randn([1, 4, 3, 32, 32])
    kept, dropped = _model("MODEL.head.dropout=0.0", segments=4), _model("MODEL.head.dropout=0.2", segments=4)
    assert dropped.head.dropout is None  # it acts on each frame's features, before the head's average
    with paddle.no_grad():
        np.testing.assert_allclose(
            dropped.backbone(clips[0]).numpy(), 0.8 * kept.backbone(clips[0]).numpy(), rtol=1e-5, atol=1e-6
        )


def test_the_full_size_network_has_paddlevideos_parameter_count():
    """PaddleVideo's PPTSM_v2 (scale 1.0, temporal attention, 16 segments, 400 classes) holds 6,072,864
    numbers: its training form plus the fused depthwise convs it allocates beside the branches from the
    start; here those appear in reparameterize()."""
    paddle.seed(0)
    model = build_model(_cfg(segments=16, width=64, classes=400, size=224))
    training = _elements(model.state_dict())
    fused = _elements({k: v for k, v in model.backbone.reparameterize().state_dict().items() if "dw_fused" in k})
    assert fused == 113_152
    assert training + fused == 6_072_864
    paddle.seed(0)
    plain = build_model(_cfg("MODEL.backbone.temporal_attention=false", segments=16, width=64, classes=400, size=224))
    assert _elements(plain.state_dict()) + fused == 6_072_592  # PaddleVideo's count without the attention


def test_the_reparameterized_network_equals_the_training_form_in_eval_mode():
    model = _model(segments=4)
    clips = paddle.randn([2, 4, 3, 32, 32])
    with paddle.no_grad():
        before = model(clips).numpy()
        model.backbone.reparameterize()
        after = model(clips).numpy()
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=0)
    blocks = [b for b in model.backbone.sublayers() if isinstance(b, DepthwiseSeparable) and b.rep]
    assert len(blocks) == 8  # stages 3 and 4
    assert all(b.repped and not hasattr(b, "dw_branches") for b in blocks)
    assert all(b.dw_fused.weight.shape[-1] == 5 and b.dw_fused.bias is not None for b in blocks)


def test_a_block_has_kernels_5_3_and_1_in_training_and_no_1x1_branch_when_it_strides():
    model = _model(segments=4)
    stage3 = model.backbone.stages[2]
    assert [b[0].weight.shape[-1] for b in stage3[0].dw_branches] == [5, 3]  # stride 2
    assert [b[0].weight.shape[-1] for b in stage3[1].dw_branches] == [5, 3, 1]
    assert stage3[0].se is not None and len(stage3[0].pw) == 2  # SE, split pointwise conv
    stage4 = model.backbone.stages[3]
    assert not stage4[0].shortcut and stage4[1].shortcut and stage4[1].se is None and len(stage4[1].pw) == 1


def test_stage_4_blocks_after_the_first_add_their_input():
    model = _model(segments=4)
    block = model.backbone.stages[3][1]
    x = paddle.randn([2, block.channels, 2, 2])
    with paddle.no_grad():
        with_shortcut = block(x).numpy()
        block.shortcut = False
        without = block(x).numpy()
    np.testing.assert_allclose(with_shortcut - without, x.numpy(), atol=1e-5)


@pytest.mark.parametrize("segments, channels", [(16, 256), (8, 64), (3, 256), (7, 256), (5, 30)])
def test_the_shift_equals_paddles_temporal_shift_with_ratio_one_over_segments(segments, channels):
    x = paddle.randn([2 * segments, channels, 3, 3])
    expected = F.temporal_shift(x, segments, 1.0 / segments)
    np.testing.assert_array_equal(temporal_shift(x, segments).numpy(), expected.numpy())


def test_the_shift_bounds_round_as_paddle_does():
    assert shift_bounds(256, 16) == (16, 32)  # PP-TSMv2's stage 3 input at 16 segments
    assert shift_bounds(256, 7) == (36, 73)  # not (36, 72): Paddle rounds 2C/T, not 2 x round(C/T)


def _stage_io(model, clips):
    """(output of stage 2, input of stage 3, output of stage 3) of the backbone on ``clips``."""
    seen = {}
    hooks = [
        model.backbone.stages[1].register_forward_post_hook(lambda layer, i, o: seen.__setitem__("out2", o)),
        model.backbone.stages[2].register_forward_pre_hook(lambda layer, i: seen.__setitem__("in3", i[0])),
        model.backbone.stages[2].register_forward_post_hook(lambda layer, i, o: seen.__setitem__("out3", o)),
    ]
    with paddle.no_grad():
        logits = model(clips)
    for h in hooks:
        h.remove()
    return seen["out2"], seen["in3"], seen["out3"], logits


def test_the_temporal_attention_then_one_shift_act_on_stage_3s_input_only():
    model = _model(segments=4)
    att = model.backbone.temporal_attention
    rng = np.random.default_rng(1)
    att.fc.weight.set_value(rng.normal(0, 1, [4, 4]).astype("float32"))
    clips = paddle.randn([2, 4, 3, 32, 32])
    out2, in3, _, _ = _stage_io(model, clips)
    # stages 1 and 2 see each frame alone: reversing the frames reverses their output exactly
    reversed_out2, _, _, _ = _stage_io(model, clips[:, ::-1])
    np.testing.assert_allclose(
        reversed_out2.numpy().reshape([2, 4, -1])[:, ::-1], out2.numpy().reshape([2, 4, -1]), atol=1e-5
    )
    # stage 3's input: each segment scaled by sigmoid(fc(segment means)), then shifted by 1/num_segments
    x = out2.numpy().reshape([2, 4, -1])
    w = 1 / (1 + np.exp(-(x.mean(axis=2) @ att.fc.weight.numpy() + att.fc.bias.numpy())))
    attended = paddle.to_tensor((x * w[:, :, None]).reshape(out2.shape))
    np.testing.assert_allclose(in3.numpy(), temporal_shift(attended, 4).numpy(), atol=1e-5)


@pytest.mark.parametrize("attention", [True, False])
def test_reordering_the_segments_changes_the_output(attention):
    """TSN's average alone would give the same scores for any frame order; the shift (and the
    attention) make them depend on it."""
    model = _model(f"MODEL.backbone.temporal_attention={str(attention).lower()}", segments=4)
    clips = paddle.randn([2, 4, 3, 32, 32])
    _, _, out3, logits = _stage_io(model, clips)
    _, _, out3_reordered, logits_reordered = _stage_io(model, clips[:, [2, 0, 3, 1]])
    reordered_back = out3_reordered.numpy().reshape([2, 4, -1])[:, [1, 3, 0, 2]]
    assert np.abs(reordered_back - out3.numpy().reshape([2, 4, -1])).max() > 1e-3
    assert np.abs(logits_reordered.numpy() - logits.numpy()).max() > 1e-4
    assert (model.backbone.temporal_attention is not None) == attention


def test_temporal_attention_belongs_to_pptsmv2_only(tmp_path):
    with pytest.raises(ConfigError, match="MODEL.backbone.temporal_attention = true .*only PP-TSMv2"):
        load_config(os.path.join(ROOT, "configs", "tsm.yaml"), ["MODEL.backbone.temporal_attention=true"])
    with pytest.raises(ConfigError, match="num_segments = 1 .*PP-TSMv2 shifts"):
        _cfg(segments=1)


# ---- names of PaddleVideo / PaddleClas files ------------------------------------------------------------


def _divisible(v):
    out = max(8, int(v + 4) // 8 * 8)
    return out + 8 if out < 0.9 * v else out


def _paddle_pptsmv2_state(scale, segments, classes, rng, prefix="backbone.", attention=True):
    """A state dict named and shaped as PaddleVideo's PPTSM_v2 (prefix "backbone.") or PaddleClas's
    PPLCNetV2 (prefix "", no attention) names it, written from their layer list, not from this project's."""
    state = {}

    def put(name, *shape):
        state[prefix + name] = rng.standard_normal(shape).astype("float32")

    def conv_bn(name, cout, cin, k):
        put(f"{name}.conv.weight", cout, cin, k, k)
        for f in ("weight", "bias", "_mean", "_variance"):
            put(f"{name}.bn.{f}", cout)

    def block(name, cin, cout, stride, k, split=False, rep=False, se=False):
        if rep:
            sizes = [s for s in range(k, 0, -2) if s > 1 or stride == 1]
            for i, s in enumerate(sizes):
                conv_bn(f"{name}.dw_conv_list.{i}", cin, 1, s)
            put(f"{name}.dw_conv.weight", cin, 1, k, k)  # the fused conv, allocated from the start
            put(f"{name}.dw_conv.bias", cin)
        else:
            conv_bn(f"{name}.dw_conv", cin, 1, k)
        if se:
            put(f"{name}.se.conv1.weight", cin // 4, cin, 1, 1)
            put(f"{name}.se.conv1.bias", cin // 4)
            put(f"{name}.se.conv2.weight", cin, cin // 4, 1, 1)
            put(f"{name}.se.conv2.bias", cin)
        if split:
            conv_bn(f"{name}.pw_conv_1", cout // 2, cin, 1)
            conv_bn(f"{name}.pw_conv_2", cout, cout // 2, 1)
        else:
            conv_bn(f"{name}.pw_conv", cout, cin, 1)

    conv_bn("stem.0", _divisible(32 * scale), 3, 3)
    block("stem.1", _divisible(32 * scale), _divisible(64 * scale), 1, 3)
    stages = [(64, 3, {}), (128, 3, {}), (256, 5, dict(split=True, rep=True, se=True)), (512, 5, dict(rep=True))]
    for s, ((width, k, kind), n) in enumerate(zip(stages, (2, 2, 6, 2))):
        for j in range(n):
            cin = _divisible((width if j == 0 else 2 * width) * scale)
            block(f"stages.{s}.{j}", cin, _divisible(2 * width * scale), 2 if j == 0 else 1, k, **kind)
    put("last_conv.weight", 1280, _divisible(1024 * scale), 1, 1)
    put("fc.weight", 1280, classes)
    put("fc.bias", classes)
    if attention:
        put("global_attention.fc.weight", segments, segments)
        put("global_attention.fc.bias", segments)
    return state


def _save(state, path):
    paddle.save({k: paddle.to_tensor(v) for k, v in state.items()}, str(path))
    return str(path)


def test_a_paddlevideo_pptsmv2_checkpoint_maps_one_to_one_and_loads(tmp_path):
    pv = _paddle_pptsmv2_state(0.25, 4, 5, np.random.default_rng(0))
    path = _save(pv, tmp_path / "pptsmv2.pdparams")
    model = build_model(_cfg(segments=4))
    weights.load_weights(model, path)  # raises unless every tensor of the model has its place in the file
    ours = model.state_dict()
    placeholders = [k for k in pv if re.fullmatch(r"backbone\.stages\.[23]\.\d+\.dw_conv\.(weight|bias)", k)]
    assert len(placeholders) == 2 * 8 and len(ours) == len(pv) - len(placeholders)  # one to one otherwise
    pairs = {
        "backbone.stem.0.conv.weight": "backbone.stem.0.0.weight",
        "backbone.stem.1.dw_conv.bn._variance": "backbone.stem.1.dw.1._variance",
        "backbone.stages.2.0.dw_conv_list.1.conv.weight": "backbone.stages.2.0.dw_branches.1.0.weight",
        "backbone.stages.2.3.se.conv2.bias": "backbone.stages.2.3.se.expand.bias",
        "backbone.stages.2.5.pw_conv_2.bn.weight": "backbone.stages.2.5.pw.1.1.weight",
        "backbone.stages.3.1.pw_conv.bn._mean": "backbone.stages.3.1.pw.0.1._mean",
        "backbone.global_attention.fc.weight": "backbone.temporal_attention.fc.weight",
        "backbone.last_conv.weight": "backbone.last_conv.weight",
        "backbone.fc.weight": "head.fc.weight",
    }
    for theirs, own in pairs.items():
        np.testing.assert_array_equal(ours[own].numpy(), pv[theirs])


def test_a_dml_checkpoint_gives_its_student_and_leaves_the_teacher(tmp_path):
    rng = np.random.default_rng(1)
    state = _paddle_pptsmv2_state(0.25, 4, 5, rng, prefix="Student.0.")
    state["Teacher.0.conv1_1._conv.weight"] = rng.standard_normal([32, 3, 3, 3]).astype("float32")
    state["Teacher.1.fc.weight"] = rng.standard_normal([2048, 5]).astype("float32")
    path = _save(state, tmp_path / "dml.pdparams")
    model = build_model(_cfg(segments=4))
    weights.load_weights(model, path)
    np.testing.assert_array_equal(model.head.fc.bias.numpy(), state["Student.0.fc.bias"])
    report = weights.load_pretrained(build_model(_cfg(segments=4)), path)
    assert "loaded 264/264" in report and "unused ['Teacher.0.conv1_1._conv.weight', 'Teacher.1.fc.weight']" in report


def test_the_student_file_paddlevideo_writes_beside_a_dml_checkpoint_loads(tmp_path):
    """PaddleVideo's save(save_student_model=True) strips "Student." from the keys: "0.stem.0.conv.weight"."""
    state = _paddle_pptsmv2_state(0.25, 4, 5, np.random.default_rng(5), prefix="0.")
    model = build_model(_cfg(segments=4))
    weights.load_weights(model, _save(state, tmp_path / "PPTSMv2_k400_16f_dml_student.pdparams"))
    np.testing.assert_array_equal(model.backbone.last_conv.weight.numpy(), state["0.last_conv.weight"])


def test_paddleclas_imagenet_pplcnetv2_weights_fill_the_backbone(tmp_path):
    clas = _paddle_pptsmv2_state(0.25, 4, 1000, np.random.default_rng(2), prefix="", attention=False)
    model = build_model(_cfg(segments=4, classes=5))
    report = weights.load_pretrained(model, _save(clas, tmp_path / "PPLCNetV2_base_ssld_pretrained.pdparams"))
    # everything but the 1000-class classifier (shape differs) and the attention PaddleClas lacks
    assert "loaded 260/264" in report and "skipped (shape differs) ['head.fc.bias', 'head.fc.weight']" in report
    assert "not in the file ['backbone.temporal_attention.fc.bias', 'backbone.temporal_attention.fc.weight']" in report
    np.testing.assert_array_equal(
        model.backbone.stages[3][1].pw[0][0].weight.numpy(), clas["stages.3.1.pw_conv.conv.weight"]
    )
    # as MODEL.backbone.pretrained
    path = str(tmp_path / "PPLCNetV2_base_ssld_pretrained.pdparams")
    built = build_model(_cfg(f"MODEL.backbone.pretrained={path}", segments=4, classes=5))
    np.testing.assert_array_equal(built.backbone.stem[0][0].weight.numpy(), clas["stem.0.conv.weight"])


def test_mismatched_files_are_one_line_errors_naming_tensors(tmp_path):
    model = build_model(_cfg(segments=4))
    eight = _save(_paddle_pptsmv2_state(0.25, 8, 5, np.random.default_rng(3)), tmp_path / "8f.pdparams")
    with pytest.raises(ValueError, match=r"wrong shape \['backbone.temporal_attention.fc.bias'") as e:
        weights.load_weights(model, eight)
    assert "\n" not in str(e.value)
    resnet = _save({"backbone.res2a.conv0._conv.weight": np.zeros([64, 64, 1, 1], "float32")}, tmp_path / "r.pdparams")
    for load in (weights.load_weights, weights.load_pretrained):
        with pytest.raises(ConfigError, match=r"holds ResNet weights \(e.g. 'backbone.res2a.conv0._conv.weight'\)"):
            load(model, resnet)
    tsn = build_model(load_config(os.path.join(ROOT, "configs", "tsn.yaml"), ["MODEL.backbone.depth=18"]))
    with pytest.raises(ConfigError, match="holds PP-LCNetV2 / PP-TSMv2 weights .*use them with MODEL.name PP-TSMv2"):
        weights.load_pretrained(tsn, eight)


def test_this_projects_own_pptsmv2_weights_load_back(tmp_path):
    model = _model(segments=4)
    path = str(tmp_path / "own.pdparams")
    paddle.save(model.state_dict(), path)
    again = build_model(_cfg(segments=4))
    weights.load_weights(again, path)
    clips = paddle.randn([1, 4, 3, 32, 32])
    again.eval()
    np.testing.assert_array_equal(again(clips).numpy(), model(clips).numpy())


# ---- export ---------------------------------------------------------------------------------------------


def _graph_ops(folder) -> collections.Counter:
    """Operator counts of an exported Paddle 3 graph (inference.json)."""
    with open(os.path.join(folder, "inference.json"), encoding="utf-8") as f:
        graph = json.load(f)
    return collections.Counter(op["#"] for op in graph["program"]["regions"][0]["blocks"][0]["ops"])


def _exports_folded(tmp_path, onnx: bool):
    from trainer.export import export

    cfg = _cfg(segments=4)
    model = _model(segments=4)
    report = export(cfg, model, str(tmp_path / "folded"), list("abcde"), onnx=onnx)  # raises beyond 1e-4
    assert report["paddle_inference_max_diff"] < 1e-4 and (not onnx or report["onnx_max_diff"] < 1e-4)
    assert hasattr(model.backbone.stages[2][1], "dw_branches")  # the caller's model keeps its training form
    if not os.path.isfile(tmp_path / "folded" / "inference.json"):
        pytest.skip("counts the operators of Paddle 3's inference.json (Paddle 2.x writes a .pdmodel)")
    folded = _graph_ops(tmp_path / "folded")
    layers = model.sublayers()
    depthwise = [c for c in layers if isinstance(c, paddle.nn.Conv2D) and c._groups > 1]
    norms = [c for c in layers if isinstance(c, paddle.nn.BatchNorm2D)]
    blocks = 1 + sum(len(stage) for stage in model.backbone.stages)
    assert folded["1.depthwise_conv2d"] == blocks == 13  # one per block
    assert len(depthwise) == 5 + 2 * 2 + 6 * 3  # training form: stride-2 blocks have kernels 5, 3, others 5, 3, 1
    assert folded["1.batch_norm_"] == len(norms) - (len(depthwise) - 5)  # the folded branches' BNs are gone
    if onnx:
        import onnx as onnx_lib

        graph = onnx_lib.load(report["onnx"]).graph
        depthwise = [
            n for n in graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute)
        ]
        assert len(depthwise) == 13


def test_export_folds_every_block_to_one_depthwise_conv_and_agrees_with_the_dynamic_model(tmp_path):
    _exports_folded(tmp_path, onnx=False)


@pytest.mark.slow
def test_the_folded_onnx_export_agrees_with_the_dynamic_model(tmp_path):
    for module in ("paddle2onnx", "onnxruntime", "onnx"):
        pytest.importorskip(module)
    _exports_folded(tmp_path, onnx=True)


# ---- PaddleVideo's own network (development only) -------------------------------------------------------


def _paddlevideo_module():
    """PaddleVideo's pptsm_v2.py from PADDLEVIDEO_DIR, its three package imports stood in for."""
    folder = os.environ.get("PADDLEVIDEO_DIR")
    path = os.path.join(folder or "", "paddlevideo", "modeling", "backbones", "pptsm_v2.py")
    if not folder or not os.path.isfile(path):
        pytest.skip("set PADDLEVIDEO_DIR to a PaddleVideo checkout to compare with its PP-TSMv2")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    source = re.sub(r"^from \.\.registry import BACKBONES$", "BACKBONES = None", source, flags=re.M)
    source = re.sub(r"^from \.\.weight_init import weight_init_$", "weight_init_ = None", source, flags=re.M)
    source = re.sub(r"^from \.\.\.utils import load_ckpt$", "load_ckpt = None", source, flags=re.M)
    source = source.replace("@BACKBONES.register()", "")
    scope: dict = {"__name__": "paddlevideo_pptsm_v2"}
    exec(compile(source, path, "exec"), scope)  # noqa: S102 - a local checkout the developer points at
    return scope


@pytest.mark.parametrize("width, size, attention", [(16, 64, True), (64, 224, True), (64, 96, False)])
def test_outputs_equal_paddlevideos_network(tmp_path, width, size, attention):
    pv = _paddlevideo_module()
    segments, classes = 8, 7
    paddle.seed(3)
    theirs = pv["PPTSM_v2_LCNet"](
        scale=width / 64,
        depths=[2, 2, 6, 2],
        class_num=classes,
        dropout_prob=0.2,
        num_seg=segments,
        use_temporal_att=attention,
    )
    randomise_bn(theirs, np.random.default_rng(4))
    path = _save({f"backbone.{k}": v.numpy() for k, v in theirs.state_dict().items()}, tmp_path / "pv.pdparams")
    assert set(_paddle_pptsmv2_state(width / 64, segments, classes, np.random.default_rng(0), attention=attention)) == {
        f"backbone.{k}" for k in theirs.state_dict()
    }  # the names the tests above write are PaddleVideo's
    ours = build_model(
        _cfg(
            f"MODEL.backbone.temporal_attention={str(attention).lower()}",
            segments=segments,
            width=width,
            classes=classes,
            size=size,
        )
    )
    weights.load_weights(ours, path)
    theirs.eval()
    ours.eval()
    clips = paddle.to_tensor(np.random.default_rng(5).standard_normal([2, segments, 3, size, size]).astype("float32"))
    with paddle.no_grad():
        expected = theirs(clips.reshape([-1, 3, size, size])).numpy()
        got = ours(clips).numpy()
        for layer in theirs.sublayers():
            if hasattr(layer, "rep"):
                layer.rep()
        ours.backbone.reparameterize()
        expected_rep, got_rep = theirs(clips.reshape([-1, 3, size, size])).numpy(), ours(clips).numpy()
    diff, diff_rep, scale = np.abs(got - expected).max(), np.abs(got_rep - expected_rep).max(), np.abs(expected).max()
    print(f"max |diff| width {width} {size}x{size}: {diff:.3g} (repped {diff_rep:.3g}; |logit| <= {scale:.3g})")
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
    np.testing.assert_allclose(got_rep, expected_rep, atol=1e-4 * max(1.0, np.abs(expected).max()), rtol=0)
