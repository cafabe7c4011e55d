"""Inference latency per clip: the dynamic model against its exported forms, in one run.

    python benchmarks/infer_bench.py [--config configs/tsm.yaml] [--segments 8] [--size 224] [--rounds 7]

Builds the config's model (random weights; ResNet-50 TSM by default), exports it the way
`run_dist.sh export --onnx` does (which checks that both exported forms agree with it within 1e-4), then
times one clip (SEGMENTS frames at SIZE x SIZE, batch 1) through the dynamic Paddle model, Paddle
Inference and onnxruntime on this machine's CPU. Rounds alternate between the three so that a noisy,
shared machine slows all of them alike; each figure is the median over rounds. The last line is
`infer_speed_ratio: X` = dynamic latency / best exported latency (above 1: exporting pays).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tsm.yaml")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--width", type=int, default=None, help="backbone base_channels (default: the config's)")
    a = p.parse_args(argv)

    import paddle

    from trainer.config import load_config
    from trainer.export import InferenceModel, export
    from trainer.models import build_model

    overrides = [
        f"PIPELINE.num_segments={a.segments}",
        f"PIPELINE.target_size={a.size}",
        "PIPELINE.test_num_clips=1",
        "PIPELINE.test_num_crops=1",
        "PIPELINE.test_num_segments=null",
        "MODEL.backbone.pretrained=''",
    ] + ([f"MODEL.backbone.base_channels={a.width}"] if a.width else [])
    cfg = load_config(a.config, overrides)
    paddle.seed(0)
    model = build_model(cfg)
    model.eval()
    clip = np.random.default_rng(0).standard_normal([1, a.segments, 3, a.size, a.size]).astype(np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        report = export(cfg, model, tmp, [str(i) for i in range(cfg.MODEL.head.num_classes)], sample=clip, onnx=True)
        print(
            f"exported {cfg.MODEL.name} ResNet-{cfg.MODEL.backbone.depth}; score difference against the dynamic "
            f"model (export fails beyond 1e-4): Paddle Inference {report['paddle_inference_max_diff']:.1e}, "
            f"onnxruntime {report.get('onnx_max_diff', float('nan')):.1e}"
        )
        engines = {}
        tensor = paddle.to_tensor(clip)

        def dynamic():
            with paddle.no_grad():
                return model(tensor).numpy()

        engines["dynamic"] = dynamic
        predictor = InferenceModel.from_folder(tmp)
        engines["paddle_inference"] = lambda: predictor.scores(clip)
        if "onnx" in report:
            import onnxruntime

            session = onnxruntime.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
            name = session.get_inputs()[0].name
            engines["onnxruntime"] = lambda: session.run(None, {name: clip})[0]
        times = {k: [] for k in engines}
        for fn in engines.values():  # warm-up: first calls allocate and pick kernels
            fn()
        for _ in range(a.rounds):
            for k, fn in engines.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(
        f"{cfg.MODEL.name} ResNet-{cfg.MODEL.backbone.depth}, 1 clip of {a.segments} frames at {a.size}x{a.size}, "
        f"{os.cpu_count()} CPU cores, median of {a.rounds} alternating rounds:"
    )
    for k, v in ms.items():
        print(f"  {k:<17s} {v:8.1f} ms/clip  ({ms['dynamic'] / v:.2f}x dynamic)")
    best = min((k for k in ms if k != "dynamic"), key=ms.get)
    print(f"best exported: {best}")
    print(f"infer_speed_ratio: {ms['dynamic'] / ms[best]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
