"""Export: TSM and PP-TSM through Paddle Inference and ONNX (opsets 11 and 13) within 1e-4, the alignment
table, how scores are compared, and the backends predict picks."""

import json
import os

import numpy as np
import pytest

from trainer.config import load_config
from trainer.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(config, name=None, **pipeline):
    """A config shrunk to width 8 at 32x32 (its depth, segments and architecture kept)."""
    overrides = ["MODEL.backbone.base_channels=8", "MODEL.backbone.pretrained=''", "PIPELINE.target_size=32"]
    overrides += [f"MODEL.name={name}"] if name else []
    overrides += [f"PIPELINE.{k}={v}" for k, v in pipeline.items()]
    return load_config(config, overrides)


def tiny_model(config="tsm", **pipeline):
    cfg = tiny(os.path.join(ROOT, "configs", f"{config}.yaml"), num_segments=4, **pipeline)
    cfg.MODEL.backbone["depth"] = 18
    cfg.MODEL.head["num_classes"] = 3
    return cfg, build_model(cfg)


def test_preprocessing_json_states_imagenet_rgb_statistics_and_the_views(tmp_path):
    """What a deployment reads to prepare frames, against ImageNet's RGB statistics written out here (a
    BGR order in the file would pass every Python-side test, which never reads these two keys)."""
    from trainer.export import preprocessing_settings

    cfg, _ = tiny_model("tsn")
    settings = preprocessing_settings(cfg, ["a", "b", "c"])
    assert settings["mean"] == pytest.approx([0.485, 0.456, 0.406])
    assert settings["std"] == pytest.approx([0.229, 0.224, 0.225])
    p = cfg.PIPELINE
    assert settings["input_shape"][1] == settings["num_segments"] * p.test_num_clips * p.test_num_crops
    assert "RGB" in settings["layout"]


@pytest.mark.slow  # 5-9 s: a real export through paddle2onnx, or a stream run in real time
def test_a_tsm_exports_to_onnx_opset_11_with_matching_scores_and_its_table(tmp_path):
    """Opset 11, PaddleVideo's paddle2onnx line (13, the default, is the PP-TSM test's below)."""
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    import onnx

    from trainer.export import CHECK_FILE, OnnxModel, export, onnx_opset, reference_logits

    cfg, model = tiny_model(test_num_clips=2)
    report = export(cfg, model, str(tmp_path), ["a", "b", "c"], onnx=True, opset=11)  # raises beyond 1e-4
    assert report["onnx_max_diff"] < 1e-4 and report["paddle_inference_max_diff"] < 1e-4
    assert onnx_opset(report["onnx"]) == 11
    assert {n.op_type for n in onnx.load(report["onnx"]).graph.node} >= {"Concat", "Slice"}
    check = json.loads((tmp_path / CHECK_FILE).read_text())  # the table export printed, as JSON
    rows = {r["key"]: r for r in check["backends"]}
    assert rows["onnxruntime"]["top1_agree"] == rows["onnxruntime"]["clips"] == 2 and check["opset"] == 11
    assert "skipped" in rows["tensorrt"] or rows["tensorrt"]["clips"] == 2
    clips = np.random.default_rng(1).standard_normal([3, 8, 3, 32, 32]).astype(np.float32)
    got = OnnxModel(report["onnx"]).scores(clips)
    assert np.abs(got - reference_logits(model, clips)).max() < 1e-4


@pytest.mark.slow  # 5-9 s: a real export through paddle2onnx, or a stream run in real time
def test_a_pp_tsm_with_leaky_relu_exports_at_opset_13_through_paddle_inference_and_onnx(tmp_path):
    """Paddle 3.3 writes leaky_relu's slope as a double: its oneDNN conv fusion crashed on it and paddle2onnx
    read it as 0 (onnxruntime's logits off by 1e10); the export check now passes for PP-TSM."""
    pytest.importorskip("paddle2onnx")
    pytest.importorskip("onnxruntime")
    from trainer.export import DEFAULT_OPSET, export, onnx_opset

    cfg, model = tiny_model("pptsm")
    report = export(cfg, model, str(tmp_path), ["a", "b", "c"], onnx=True)
    assert report["paddle_inference_max_diff"] < 1e-4 and report["onnx_max_diff"] < 1e-4
    assert onnx_opset(report["onnx"]) == DEFAULT_OPSET == 13
    assert not list(tmp_path.glob("*paddle2onnx_input*"))  # the patched copy is gone


@pytest.mark.slow
def test_an_opset_too_low_for_an_operator_names_the_operator_and_the_opset(tmp_path):
    pytest.importorskip("paddle2onnx")
    from trainer.export import ExportError, export

    cfg, model = tiny_model()
    with pytest.raises(ExportError) as e:
        export(cfg, model, str(tmp_path), ["a", "b", "c"], onnx=True, opset=10)
    assert str(e.value) == (
        "export --onnx --opset 10: operator pd_op.mean needs opset >= 11; use --opset 11 or higher (the default is 13)"
    )
    assert not (tmp_path / "model.onnx").exists()


@pytest.mark.parametrize("opset", [6, 22])
def test_an_opset_paddle2onnx_cannot_write_is_refused_before_it_runs(opset, tmp_path):
    from trainer.export import ExportError, write_onnx

    with pytest.raises(ExportError, match=rf"^--opset {opset}: paddle2onnx writes opsets 7 to 21$"):
        write_onnx("m.json", "m.pdiparams", str(tmp_path / "m.onnx"), opset)


class Shifted:
    """A backend whose logits are the reference's plus ``delta``."""

    precision = None

    def __init__(self, expected, delta):
        self.expected, self.delta, self.calls = expected, delta, 0

    def scores(self, clips):
        out = self.expected[self.calls : self.calls + len(clips)] + self.delta[self.calls : self.calls + len(clips)]
        self.calls += len(clips)
        return out


def test_the_alignment_table_counts_top1_agreement_and_the_largest_logit_difference():
    from trainer.export import CHECK_BATCH, check_backends, check_table

    expected = np.tile([[3.0, 1.0, 0.0]], (CHECK_BATCH + 2, 1))  # more clips than one call takes
    flip = np.zeros_like(expected)
    flip[-1] = [0.0, 2.5, 0.0]  # the last clip's top-1 changes (1.0 + 2.5 > 3.0)
    check = check_backends(
        {
            "paddle_inference": Shifted(expected, np.zeros_like(expected)),
            "onnxruntime": Shifted(expected, flip),
            "tensorrt": "no GPU on this host",
        },
        np.zeros([len(expected), 1]),
        expected,
    )
    rows = {r["key"]: r for r in check["backends"]}
    assert rows["paddle_inference"]["top1_agree"] == 6 and rows["paddle_inference"]["max_abs_logit_diff"] == 0
    assert rows["onnxruntime"]["top1_agree"] == 5 and rows["onnxruntime"]["max_abs_logit_diff"] == 2.5
    assert rows["tensorrt"] == {"key": "tensorrt", "backend": "TensorRT", "skipped": "no GPU on this host"}
    check.update(inputs="6 clips from val.list", tolerance=1e-4)
    table = check_table(check)
    assert table[2].split() == ["Paddle", "Inference", "0.00e+00", "0.00e+00", "6/6", "(100%)"]
    assert table[3].split()[-2:] == ["5/6", "(83%)"] and "not run: no GPU on this host" in table[4]


def test_the_export_check_compares_probabilities_and_logits_at_their_scale():
    from trainer.export import score_difference

    logits = np.array([[2.0, -1.0, 0.5]])
    assert score_difference(logits, logits) == 0
    assert score_difference(logits + [[1e-3, 0, 0]], logits) > 1e-4  # a real disagreement fails
    big = np.array([[170.0, -40.0, 3.0]])  # an untrained ResNet-50's scale
    assert score_difference(big + [[4e-4, 0, 0]], big) < 1e-4  # float32 rounding passes


def test_a_paddle2onnx_that_refuses_this_paddle_is_one_line(monkeypatch, tmp_path):
    """paddle2onnx 2.x raises ValueError at import under Paddle < 3: export --onnx names it."""
    import sys

    from trainer.export import write_onnx

    class RefusingPaddle2onnx:  # what paddle2onnx 2.x's __init__ does on an old Paddle
        def find_spec(self, name, path=None, target=None):
            if name == "paddle2onnx":
                raise ValueError("paddle2onnx requires paddlepaddle >= 3.0.0")

    monkeypatch.delitem(sys.modules, "paddle2onnx", raising=False)
    monkeypatch.setattr(sys, "meta_path", [RefusingPaddle2onnx(), *sys.meta_path])
    with pytest.raises(RuntimeError, match=r"^export --onnx: paddle2onnx cannot run with Paddle .*>= 3\.0\.0$"):
        write_onnx("m.json", "m.pdiparams", str(tmp_path / "m.onnx"))


def test_predict_backends_onnx_needs_model_onnx_and_tensorrt_a_gpu(tmp_path):
    from trainer.config import ConfigError
    from trainer.export import InferenceModel, exported_model

    with pytest.raises(FileNotFoundError, match=r"model.onnx does not exist; write it with: .* --onnx --output"):
        exported_model(str(tmp_path), "onnx")
    with pytest.raises(
        ConfigError, match=r"^config error: --backend tensorrt runs on GPUs only .*--backend paddle or onnx"
    ):
        exported_model(str(tmp_path), "tensorrt", device="cpu")
    with pytest.raises(ConfigError, match=r"--backend tflite: expected one of paddle, onnx, tensorrt$"):
        exported_model(str(tmp_path), "tflite")
    cfg, model = tiny_model("tsn")
    from trainer.export import export

    export(cfg, model, str(tmp_path), ["a", "b", "c"])
    assert isinstance(exported_model(str(tmp_path), "paddle"), InferenceModel)


def _val_list_export(demo_dataset, tmp_path, *overrides):
    """(argv of `main.py export` for a width-8 TSN on the demo data, its config) with ``overrides``."""
    from trainer import checkpoint

    from .tiny import tiny_config

    config = tiny_config(tmp_path / "c.yaml", demo_dataset, tmp_path / "out")
    args = [f"-o{o}" for o in ("DATASET.num_workers=0", *overrides)]
    cfg = load_config(config, [a[2:] for a in args])
    checkpoint.save_weights(build_model(cfg), str(tmp_path / "w.pdparams"))
    argv = ["export", "-c", config, "--weights", str(tmp_path / "w.pdparams"), "--output", str(tmp_path / "x")]
    return argv + args, cfg


def test_export_without_a_check_list_checks_the_first_clips_of_the_val_list(demo_dataset, tmp_path, monkeypatch):
    """Random noise drove a small trained PP-TSMv2 to ~1e3 and past 1e-4 in float32; the default check is on
    the config's own clips: the first --check-clips of DATASET.val_list, through the test pipeline."""
    from trainer import dist, engine, export, main

    argv, cfg = _val_list_export(demo_dataset, tmp_path, "DATASET.test_list=''")
    seen, check_backends = [], export.check_backends
    monkeypatch.setattr(export, "check_backends", lambda b, s, e: seen.append(s) or check_backends(b, s, e))
    assert main.main([*argv, "--check-clips", "4"]) == 0
    val = demo_dataset / "val_pkl.list"
    check = json.loads((tmp_path / "x" / export.CHECK_FILE).read_text())
    assert check["inputs"] == f"4 clips of {val} (DATASET.val_list)" and check["clips"] == 4
    loader = engine.make_loader(cfg, dist.Env(0, 1, "cpu", None), "test", list_file=str(val))
    first = np.concatenate([imgs.numpy() for imgs, _ in loader])[:4]  # the list's first clips, in its order
    loader.close()
    assert len(seen) == 1 and np.array_equal(seen[0], first)


def test_without_a_readable_val_list_export_takes_the_test_list_then_random_inputs_saying_why(demo_dataset, tmp_path):
    from trainer import dist, main

    from .tiny import tiny_config

    env = dist.Env(0, 1, "cpu", None)
    config = tiny_config(tmp_path / "c.yaml", demo_dataset, tmp_path)
    cfg = load_config(config, ["DATASET.num_workers=0", f"DATASET.val_list={tmp_path / 'gone.list'}"])
    sample, source = main._default_check_clips(cfg, env, 2)
    assert sample.shape[:2] == (2, 3) and source == f"2 clips of {demo_dataset / 'val_pkl.list'} (DATASET.test_list)"
    (tmp_path / "empty.list").write_text("")
    cfg.DATASET.update(test_list=str(tmp_path / "empty.list"))
    sample, source = main._default_check_clips(cfg, env, 2)
    assert sample is None and "gone.list does not exist" in source and "empty.list" in source
    cfg.DATASET.update(val_list="", test_list="")
    assert main._default_check_clips(cfg, env, 2) == (None, "no DATASET.val_list or DATASET.test_list")
