"""Export: a TSM through Paddle Inference and ONNX within 1e-4, and how scores are compared."""

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

    from trainer.export import _export_onnx

    class RefusingPaddle2onnx:  # what paddle2onnx 2.x's __init__ does on an old Paddle
        def find_spec(self, name, path=None, target=None):
            if name == "paddle2onnx":
                raise ValueError("paddle2onnx requires paddlepaddle >= 3.0.0")

    monkeypatch.delitem(sys.modules, "paddle2onnx", raising=False)
    monkeypatch.setattr(sys, "meta_path", [RefusingPaddle2onnx(), *sys.meta_path])
    with pytest.raises(RuntimeError, match=r"^export --onnx: paddle2onnx cannot run with Paddle .*>= 3\.0\.0$"):
        _export_onnx("m.json", "m.pdiparams", str(tmp_path / "m.onnx"), None, None)
