"""Top-k classes of videos, through the same loader (and so the same preprocessing) as the test mode,
scored by the dynamic model or by an exported one (Paddle Inference)."""

from __future__ import annotations

import os

import numpy as np
import paddle

from clipdata.lists import Sample, read_label_file
from clipdata.video import VideoError
from dali_pipelines.clipspec import ClipSpec

from . import dist
from .engine import make_loader
from .metrics import softmax


def _inputs(path: str) -> list[str]:
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path} does not exist")
    if path.endswith((".txt", ".list")):  # a list file: 'path', 'path label' or 'path num_frames label' lines
        from clipdata.lists import text_lines

        return [_video_path(line) for line in map(str.strip, text_lines(path)) if line and not line.startswith("#")]
    return [path]


def _video_path(line: str) -> str:
    """The path of a list line (it may hold spaces) without its trailing label / frame count."""
    for _ in range(2):
        parts = line.rsplit(maxsplit=1)
        if len(parts) == 2 and parts[1].isascii() and parts[1].isdigit():
            line = parts[0]
    return line


def dynamic_scorer(model):
    """Batch of clips (a Paddle tensor) -> logits (numpy) with the dynamic model."""
    model.eval()

    def scores(imgs):
        with paddle.no_grad():
            return model(imgs.astype("float32")).numpy()

    return scores


def exported_scorer(inference_model):
    """Batch of clips (a Paddle tensor) -> logits (numpy) with an exported model (export.InferenceModel)."""
    return lambda imgs: inference_model.scores(imgs.astype("float32").numpy())


def predict(cfg, env: dist.Env, scorer, input_path: str, top_k: int = 5) -> list[tuple[str, list[tuple[str, float]]]]:
    """[(video, [(class name, probability), ...])] for each video of ``input_path``; ``scorer`` is
    ``dynamic_scorer(model)`` or ``exported_scorer(...)``."""
    if not cfg.DATASET.label_file:
        raise FileNotFoundError("predict needs DATASET.label_file to name the classes")
    names = read_label_file(cfg.DATASET.label_file)
    videos = _inputs(input_path)
    for v in videos:
        if not os.path.isfile(v):
            raise FileNotFoundError(f"video {v} does not exist")
    samples = [Sample(os.path.abspath(v), -1, 0, i + 1) for i, v in enumerate(videos)]
    spec = ClipSpec.from_config(cfg, "test", device=env.device, source="videos", labelled=False)
    loader = make_loader(cfg, dist.Env(0, 1, env.device, env.device_id), "test", spec=spec, samples=samples)
    logits = [scorer(imgs) for imgs, _ in loader]
    if loader.skipped:  # the messages above name them; scores must never shift onto another video
        raise VideoError(f"{loader.skipped} of {len(videos)} video(s) could not be read (see above)")
    logits = np.concatenate(logits)
    probs = softmax(logits)
    k = min(top_k, len(names))
    out = []
    for v, p in zip(videos, probs):
        top = np.argsort(-p)[:k]
        out.append((v, [(names[i], float(p[i])) for i in top]))
    return out


def print_predictions(results) -> None:
    for video, top in results:
        print(f"{video}:")
        for rank, (name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<30s} {prob:.4f}")


def write_predictions_csv(results, path: str) -> None:
    import csv
    import io

    from common.files import write_atomic

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["video", "rank", "class", "probability"])
    for video, top in results:
        for rank, (name, prob) in enumerate(top, 1):
            w.writerow([video, rank, name, f"{prob:.6f}"])
    write_atomic(path, buf.getvalue().encode())
