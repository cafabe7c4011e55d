"""What folding PP-TSMv2's depthwise branches buys at inference: the exported training form against the
exported re-parameterised form, in one run.

    python benchmarks/reparam_bench.py [--segments 16] [--size 224] [--rounds 9] [--threads N] [--device cpu|gpu]
                                       [--onnx] [--no-dynamic]

Builds PP-TSMv2 (configs/pptsmv2.yaml, random weights and BatchNorm statistics), writes it twice with
paddle.jit.save (as trained: kernels 5, 3 and 1 summed in stages 3 and 4; and as ``run_dist.sh export``
writes it, after ``reparameterize()``), checks that both give the dynamic model's logits, then times one
clip (SEGMENTS frames at SIZE x SIZE, batch 1) through Paddle Inference for each (and through the dynamic
model in both forms unless --no-dynamic; through onnxruntime too with --onnx, converted by paddle2onnx).
Rounds alternate between the forms so that a noisy, shared machine slows them alike; each figure is the
median over rounds. The last line is ``reparam_speedup: X`` = unfolded latency / folded latency through
Paddle Inference (above 1: folding pays).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pptsmv2.yaml", help="the model's config (default configs/pptsmv2.yaml)")
    p.add_argument("--segments", type=int, default=16, help="frames per clip (default 16)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (default 224)")
    p.add_argument("--rounds", type=int, default=9, help="timed rounds; the median counts (default 9)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads of Paddle Inference (default: all)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="where Paddle Inference runs (default cpu)")
    p.add_argument("--onnx", action="store_true", help="also time both forms through onnxruntime")
    p.add_argument("--no-dynamic", action="store_true", help="leave out the dynamic model (slow on CPU)")
    return p.parse_args(argv)


def form_runners(a: argparse.Namespace, forms: dict, clip: np.ndarray, expected: np.ndarray, tmp: str) -> dict:
    """Each form saved under ``tmp`` with paddle.jit.save, checked against ``expected`` through each backend,
    and a call per (backend, form) on ``clip`` (the dynamic forms too unless --no-dynamic)."""
    import paddle
    from paddle.static import InputSpec

    from trainer.export import InferenceModel, OnnxModel, model_files, score_difference, write_onnx

    x = paddle.to_tensor(clip)
    spec = InputSpec([None, a.segments, 3, a.size, a.size], "float32", "clips")
    runners = {}
    for name, form in forms.items():
        folder = os.path.join(tmp, name)
        paddle.jit.save(
            paddle.jit.to_static(copy.deepcopy(form), input_spec=[spec], full_graph=True), f"{folder}/inference"
        )
        backends = {"paddle_inference": InferenceModel(*model_files(folder), device=a.device, threads=a.threads)}
        if a.onnx:
            onnx_file = write_onnx(*model_files(folder), os.path.join(folder, "model.onnx"))
            backends["onnxruntime"] = OnnxModel(onnx_file, device=a.device, threads=a.threads)
        for backend, predictor in backends.items():
            diff = score_difference(predictor.scores(clip), expected)
            print(f"{name}, {backend}: logits differ from the dynamic model's by {diff:.1e}")
            runners[f"{backend}_{name}"] = lambda p=predictor: p.scores(clip)
        if not a.no_dynamic:
            runners[f"dynamic_{name}"] = lambda f=form: f(x).numpy()
    return runners


def median_ms(runners: dict, rounds: int) -> dict:
    """Median milliseconds of each runner over rounds that alternate between them (after a warm-up call)."""
    import paddle

    times: dict[str, list[float]] = {k: [] for k in runners}
    with paddle.no_grad():
        for run in runners.values():  # warm-up
            run()
        for _ in range(rounds):
            for key, run in runners.items():
                start = time.perf_counter()
                run()
                times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def main(argv=None) -> int:
    a = parse_args(argv)

    import paddle

    from tools.media import randomise_bn
    from trainer.config import load_config
    from trainer.export import inference_form
    from trainer.models import build_model

    paddle.set_device(a.device)
    cfg = load_config(
        a.config,
        [f"PIPELINE.num_segments={a.segments}", f"PIPELINE.target_size={a.size}", "MODEL.backbone.pretrained=''"],
    )
    paddle.seed(0)
    model = build_model(cfg)
    randomise_bn(model, np.random.default_rng(0))
    model.eval()
    forms = {"unfolded": copy.deepcopy(model), "folded": inference_form(model)}
    clip = np.random.default_rng(1).standard_normal([1, a.segments, 3, a.size, a.size]).astype(np.float32)
    with paddle.no_grad():
        expected = model(paddle.to_tensor(clip)).numpy()
    with tempfile.TemporaryDirectory() as tmp:
        med = median_ms(form_runners(a, forms, clip, expected, tmp), a.rounds)
    threads = a.threads or os.cpu_count()
    where = "GPU" if a.device == "gpu" else f"CPU, {threads} threads"
    print(
        f"PP-TSMv2 (temporal attention {cfg.MODEL.backbone.temporal_attention}), 1 clip of {a.segments} frames at "
        f"{a.size}x{a.size}, {where}, median of {a.rounds} rounds:"
    )
    for key, ms in med.items():
        print(f"  {key:<28s} {ms:9.1f} ms")
    for prefix in ("dynamic", "onnxruntime"):
        if f"{prefix}_folded" in med:
            print(f"{prefix}_reparam_speedup: {med[f'{prefix}_unfolded'] / med[f'{prefix}_folded']:.2f}")
    print(f"reparam_speedup: {med['paddle_inference_unfolded'] / med['paddle_inference_folded']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
