"""Export: a Paddle Inference model (paddle.jit.save) with its preprocessing settings beside it, checked
against the dynamic model; ONNX through paddle2onnx where installed, checked with onnxruntime."""
from __future__ import annotations

import json
import os

import numpy as np
import paddle

TOLERANCE = 1e-4


def views_per_clip(cfg) -> int:
    p = cfg.PIPELINE
    return p.num_segments * p.test_num_clips * p.test_num_crops


def preprocessing_settings(cfg, class_names: list[str]) -> dict:
    """What a deployment must do to a video before the model sees it (the test pipeline's settings)."""
    from dali_pipelines.loader import MEAN, STD
    p = cfg.PIPELINE
    return {"input": "clips", "input_shape": [None, views_per_clip(cfg), 3, p.target_size, p.target_size],
            "layout": "[batch, crops x clips x segments, RGB, height, width]", "num_segments": p.num_segments,
            "num_clips": p.test_num_clips, "num_crops": p.test_num_crops, "target_size": p.target_size,
            "short_size": p.short_size, "mean": list(MEAN), "std": list(STD), "sampling": "test",
            "output": "logits (softmax for probabilities)", "class_names": class_names}


def paddle_inference_scores(model_file: str, params_file: str, clips: np.ndarray) -> np.ndarray:
    from paddle import inference
    config = inference.Config(model_file, params_file)
    config.disable_gpu()
    predictor = inference.create_predictor(config)
    handle = predictor.get_input_handle(predictor.get_input_names()[0])
    handle.reshape(list(clips.shape))
    handle.copy_from_cpu(clips)
    predictor.run()
    return predictor.get_output_handle(predictor.get_output_names()[0]).copy_to_cpu()


def export(cfg, model, out_dir: str, class_names: list[str], sample: np.ndarray | None = None,
           onnx: bool = False) -> dict:
    """Write OUT_DIR/inference.{json|pdmodel,pdiparams} and preprocessing.json; returns what was written
    and the largest score difference of each exported form against the dynamic model."""
    from paddle.static import InputSpec
    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    p = cfg.PIPELINE
    spec = InputSpec([None, views_per_clip(cfg), 3, p.target_size, p.target_size], "float32", "clips")
    prefix = os.path.join(out_dir, "inference")
    paddle.jit.save(paddle.jit.to_static(model, input_spec=[spec], full_graph=True), prefix)
    model_file = next(prefix + ext for ext in (".json", ".pdmodel") if os.path.exists(prefix + ext))
    params_file = prefix + ".pdiparams"
    with open(os.path.join(out_dir, "preprocessing.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessing_settings(cfg, class_names), f, indent=2)
    if sample is None:
        sample = np.random.default_rng(0).standard_normal([2, *spec.shape[1:]]).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(sample)).numpy()
    report = {"model": model_file, "params": params_file, "preprocessing": os.path.join(out_dir, "preprocessing.json")}
    report["paddle_inference_max_diff"] = float(np.abs(paddle_inference_scores(model_file, params_file, sample)
                                                       - expected).max())
    if onnx:
        report.update(_export_onnx(model_file, params_file, os.path.join(out_dir, "model.onnx"), sample, expected))
    bad = {k: v for k, v in report.items() if k.endswith("_max_diff") and v > TOLERANCE}
    if bad:
        raise RuntimeError(f"export: exported model disagrees with the dynamic model: {bad} > {TOLERANCE}")
    return report


def _export_onnx(model_file, params_file, onnx_file, sample, expected) -> dict:
    try:
        import paddle2onnx
    except ImportError:
        raise RuntimeError("export --onnx needs paddle2onnx (pip install paddle2onnx onnxruntime)") from None
    paddle2onnx.export(model_file, params_file, onnx_file, opset_version=13)
    out = {"onnx": onnx_file}
    try:
        import onnxruntime
    except ImportError:
        print("export: onnxruntime is not installed; the ONNX file is not checked")
        return out
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: sample})[0]
    out["onnx_max_diff"] = float(np.abs(got - expected).max())
    return out
