"""Inference latency per clip: the dynamic model against its exported forms, in one run.

    python benchmarks/infer_bench.py [--config configs/tsm.yaml] [--segments 8] [--size 224] [--rounds 7]

Builds the config's model (random weights; ResNet-50 TSM by default), exports it the way
`run_dist.sh export --onnx` does (which checks that both exported forms agree with it within 1e-4), then
times one clip (SEGMENTS frames at SIZE x SIZE, batch 1) through the dynamic Paddle model, Paddle
Inference and onnxruntime on this machine's CPU. Rounds alternate between the three so that a noisy,
shared machine slows all of them alike; each figure is the median over rounds. The last line is
`infer_speed_ratio: X` = dynamic latency / best exported latency (above 1: exporting pays).

    python benchmarks/infer_bench.py --video [--rounds 7] [--threads N]

PP-TSMv2 (16 frames, re-parameterised as export writes it) against PP-TSM ResNet-50 (8 frames), both
exported (random weights: latency does not depend on them) and timed in the same run: one clip through Paddle
Inference and onnxruntime, then end to end per 10 s 340x256 H.264 video (made here with ffmpeg): probe (the
frame count from the demuxed packets), sparse decode of the sampled frames (clipdata.video.decode_frames),
preprocessing (short side 256, centre crop 224, normalise: PaddleVideo's Scale/CenterCrop/Normalize), the
model on its best backend and the top-5. The last line is `pptsmv2_speed_ratio: X` = PP-TSM model latency /
PP-TSMv2 model latency, best backend each (docs/deployment.md "Latency").
"""

from __future__ import annotations

import argparse
import contextlib
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
    p.add_argument("--config", default="configs/tsm.yaml", help="the model's config (default configs/tsm.yaml)")
    p.add_argument("--segments", type=int, default=8, help="frames per clip (default 8)")
    p.add_argument("--size", type=int, default=224, help="frame side in pixels (default 224)")
    p.add_argument("--rounds", type=int, default=7, help="timed rounds; the median counts (default 7)")
    p.add_argument("--width", type=int, default=None, help="backbone base_channels (default: the config's)")
    p.add_argument("--video", action="store_true", help="PP-TSMv2 against PP-TSM per clip and per 10 s video")
    p.add_argument("--threads", type=int, default=None, help="--video: CPU threads per backend (default: all cores)")
    return p.parse_args(argv)


def median_ms(calls: dict, rounds: int) -> dict:
    """The median milliseconds of each call over ``rounds`` rounds that alternate between the calls, so
    that a noisy, shared machine slows all of them alike (after one warm-up call of each: first calls
    allocate and pick kernels)."""
    for fn in calls.values():
        fn()
    times = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def exported_engines(cfg, model, clip: np.ndarray, folder: str) -> dict:
    """The dynamic model and its exported forms (written to ``folder``), each a call on ``clip``."""
    import paddle

    from trainer.export import InferenceModel, export

    report = export(cfg, model, folder, [str(i) for i in range(cfg.MODEL.head.num_classes)], sample=clip, onnx=True)
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
    predictor = InferenceModel.from_folder(folder)
    engines["paddle_inference"] = lambda: predictor.scores(clip)
    if "onnx" in report:
        import onnxruntime

        session = onnxruntime.InferenceSession(report["onnx"], providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        engines["onnxruntime"] = lambda: session.run(None, {name: clip})[0]
    return engines


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.video:
        return video_bench(a.rounds, a.threads or os.cpu_count() or 1)

    import paddle

    from trainer.config import load_config
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
        ms = median_ms(exported_engines(cfg, model, clip, tmp), a.rounds)
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


# (name, config, frames): the light model and the one it is measured against (issue 22, PaddleVideo's figures)
VIDEO_MODELS = (("PP-TSMv2", "configs/pptsmv2.yaml", 16), ("PP-TSM", "configs/pptsm.yaml", 8))
PADDLEVIDEO_MS = 456  # PaddleVideo's PP-TSMv2 doc: a 10 s video in 456 ms on a CPU


def make_video(path: str, seconds: int = 10, fps: int = 30, size: str = "340x256") -> None:
    """A ``seconds`` long H.264 mp4 at ``size`` (libx264 defaults: B-frames, a keyframe every 250 frames)."""
    import subprocess

    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-y", "-f", "lavfi"]
    cmd += ["-i", f"testsrc2=size={size}:rate={fps}:duration={seconds}", "-c:v", "libx264", "-pix_fmt", "yuv420p"]
    subprocess.run(cmd + [path], check=True)


def count_frames(path: str) -> int:
    """The probe of a new video: its frames counted from the demuxed packets (no decoding)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def preprocess(frames: np.ndarray, short: int = 256, crop: int = 224) -> np.ndarray:
    """[T, H, W, 3] uint8 RGB -> [1, T, 3, crop, crop] float32: short side to ``short`` (bilinear), centre
    crop, ImageNet mean/std (the test pipeline's settings, in PIL and NumPy as PaddleVideo's deploy does)."""
    from PIL import Image

    from dali_pipelines.clipspec import MEAN, STD

    h, w = frames.shape[1:3]
    size = (short, round(h * short / w)) if w < h else (round(w * short / h), short)
    out = np.empty([len(frames), crop, crop, 3], np.float32)
    for i, f in enumerate(frames):
        img = np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR), np.float32)
        top, left = (img.shape[0] - crop) // 2, (img.shape[1] - crop) // 2
        out[i] = img[top : top + crop, left : left + crop]
    out = (out / 255.0 - np.asarray(MEAN, np.float32)) / np.asarray(STD, np.float32)
    return out.transpose(0, 3, 1, 2)[None]


def export_video_model(name: str, config: str, frames: int, folder: str, threads: int) -> dict:
    """The exported backends of one of VIDEO_MODELS (random weights), each a model with ``scores``."""
    import paddle

    from trainer.config import load_config
    from trainer.export import InferenceModel, OnnxModel, export
    from trainer.models import build_model

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    overrides = [f"PIPELINE.num_segments={frames}", "PIPELINE.test_num_clips=1", "PIPELINE.test_num_crops=1"]
    overrides += ["PIPELINE.test_num_segments=null", "MODEL.backbone.pretrained=''"]
    cfg = load_config(os.path.join(root, config), overrides)
    paddle.seed(0)
    model = build_model(cfg)
    model.eval()
    clip = np.random.default_rng(0).standard_normal([1, frames, 3, 224, 224]).astype(np.float32)
    report = export(cfg, model, folder, [str(i) for i in range(cfg.MODEL.head.num_classes)], sample=clip, onnx=True)
    folded = hasattr(model.backbone, "reparameterize")
    print(
        f"exported {name} ({frames} frames{', re-parameterised' if folded else ''}): score difference "
        f"against the dynamic model: Paddle Inference {report['paddle_inference_max_diff']:.1e}, "
        f"onnxruntime {report['onnx_max_diff']:.1e}",
        flush=True,
    )
    return {
        "paddle_inference": InferenceModel.from_folder(folder, threads=threads),
        "onnxruntime": OnnxModel(report["onnx"], threads=threads),
    }


def video_stages(video: str, engines: dict, best: dict, frames_of: dict, rounds: int) -> dict:
    """Milliseconds of each stage (probe, decode, preprocess, model, top5) of each model, per round."""
    from clipdata.video import decode_frames
    from dali_pipelines.sampling import segment_indices

    stages = {n: {s: [] for s in ("probe", "decode", "preprocess", "model", "top5")} for n in engines}
    for _ in range(rounds):
        for n, frames in frames_of.items():
            t0 = time.perf_counter()
            count = count_frames(video)
            t1 = time.perf_counter()
            rgb = decode_frames(video, segment_indices(count, frames, "test"), count)
            t2 = time.perf_counter()
            x = preprocess(rgb)
            t3 = time.perf_counter()
            logits = engines[n][best[n]].scores(x)[0]
            t4 = time.perf_counter()
            p = np.exp(logits - logits.max())
            _ = np.argsort(-(p / p.sum()))[:5]
            t5 = time.perf_counter()
            for s, dt in zip(stages[n], (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                stages[n][s].append(1000 * dt)
    return stages


def cpu_name() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name"))
    return cpu


def video_bench(rounds: int, threads: int) -> int:
    engines, frames_of = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, config, frames in VIDEO_MODELS:
            engines[name] = export_video_model(name, config, frames, os.path.join(tmp, name), threads)
            frames_of[name] = frames
        clips = {n: np.random.default_rng(1).standard_normal([1, f, 3, 224, 224]).astype(np.float32)
                 for n, f in frames_of.items()}  # fmt: skip
        calls = {
            (n, b): (lambda m=m, c=clips[n]: m.scores(c)) for n, models in engines.items() for b, m in models.items()
        }
        model_ms = median_ms(calls, rounds)
        best = {n: min(engines[n], key=lambda b, n=n: model_ms[n, b]) for n in engines}
        video = os.path.join(tmp, "video_10s_340x256.mp4")
        make_video(video)
        stages = video_stages(video, engines, best, frames_of, rounds)

    print(
        f"CPU: {cpu_name()}, {os.cpu_count()} cores, {threads} thread(s) per backend; "
        f"median of {rounds} alternating rounds"
    )
    print("per clip (batch 1, 224x224):")
    for (n, b), ms in model_ms.items():
        print(f"  {n:<9s} {frames_of[n]:2d} frames  {b:<17s} {ms:8.1f} ms{'  (best)' if best[n] == b else ''}")
    print(f"end to end per 10 s 340x256 H.264 video (300 frames; PaddleVideo's PP-TSMv2: {PADDLEVIDEO_MS} ms):")
    for n, st in stages.items():
        med = {s: statistics.median(v) for s, v in st.items()}
        total = statistics.median([sum(parts) for parts in zip(*st.values())])
        split = ", ".join(f"{s} {v:.1f}" for s, v in med.items())
        print(f"  {n:<9s} {total:7.1f} ms ({split} ms; model on {best[n]})")
    ratio = model_ms["PP-TSM", best["PP-TSM"]] / model_ms["PP-TSMv2", best["PP-TSMv2"]]
    print(f"pptsmv2_speed_ratio: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
