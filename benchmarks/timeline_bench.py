"""A long video's timeline against scoring each window as an independent clip; a live stream's latency.

    python benchmarks/timeline_bench.py [--minutes 10] [--window 10s] [--stride 5s] [--config configs/tsn.yaml]
                                        [--width 8] [--size 112] [--stream-seconds 30] [--video PATH]

Makes (once, cached at --video) a MINUTES-long 340x256 25 fps H.264 mp4 with x264's defaults (a keyframe
every 250 frames, B-frames), then scores every window of WINDOW every STRIDE two ways with the same model
(the config's, random weights, backbone width WIDTH at SIZE px: the model's cost is the same on both
sides) and the same test transform:
  timeline    `predict --window`'s path (trainer/timeline.py): one pass over the file, each sampled frame
              decoded once, GOPs no window samples not decoded at all;
  per-window  what PaddleVideo's predictor does with a clip: open the file, seek to the nearest keyframe
              at or before the window's start, decode forward to its last sampled frame, sample, score.
Both decode with PyAV's frame+slice threads and score in batches of DATASET.batch_size. Then a live
stream: the video's first STREAM_SECONDS as MPEG-TS, written in real time (ffmpeg -re) into a FIFO and
scored by `predict --input FIFO`'s path; its per-window latency (the window's last frame to its result).
The model's time (the same work on both sides) is measured inside each run and set apart: the last line
is `timeline_speed_ratio: X` = per-window seconds / timeline seconds without it (decode, sample, test
transform; goal >= 3); the end-to-end ratio with the model is printed above it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings

import numpy as np

warnings.filterwarnings("ignore")


def make_video(path: str, minutes: float) -> None:
    from preprocessing.frames import ffmpeg_exe

    if os.path.isfile(path):
        return
    tmp = path + ".tmp.mp4"
    subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", "-f", "lavfi", "-i",
         f"testsrc2=size=340x256:rate=25:duration={60 * minutes:g}", "-c:v", "libx264", "-preset", "veryfast",
         "-pix_fmt", "yuv420p", tmp],
        check=True,
    )  # fmt: skip
    os.replace(tmp, path)


def per_window_clips(path: str, index, windows, spec, stats: dict):
    """(window, sampled frames) the way a one-clip predictor gets them: reopen, seek, decode forward, sample."""
    from clipdata.video import _open, _to_rgb
    from trainer import clip_scorer

    frame_of = {int(p): i for i, p in enumerate(index.pts)}
    for j, (s, e) in enumerate(windows):
        idx = clip_scorer.window_indices(spec, s, e)
        wanted, last = set(idx.tolist()), int(idx.max())
        container, stream = _open(path)
        rgb = _to_rgb(path)
        got = {}
        try:
            container.seek(int(index.pts[s]), backward=True, any_frame=False, stream=stream)
            for frame in container.decode(stream):
                stats["decoded"] += 1
                i = frame_of.get(frame.pts)
                if i in wanted and i not in got:
                    got[i] = rgb(frame)
                if i is not None and i >= last and len(got) == len(wanted):
                    break
        finally:
            container.close()
        yield j, np.stack([got[i] for i in idx.tolist()])


def stream_latency(cfg, scorer, names, video: str, seconds: float, window, stride) -> dict:
    """Latencies of a real-time MPEG-TS stream through a FIFO (trainer/stream.py)."""
    from preprocessing.frames import ffmpeg_exe
    from trainer.stream import run_stream

    with tempfile.TemporaryDirectory() as tmp:
        fifo = os.path.join(tmp, "live.fifo")
        os.mkfifo(fifo)
        cmd = [ffmpeg_exe(), "-nostdin", "-y", "-loglevel", "error", "-re", "-i", video, "-t", f"{seconds:g}"]
        cmd += ["-c", "copy", "-f", "mpegts", fifo]
        sender = threading.Timer(1.0, lambda: subprocess.run(cmd, timeout=seconds + 60))
        sender.start()
        _, tl, stats = run_stream(
            cfg, scorer, names, fifo, window, stride, os.path.join(tmp, "out"), 1, timeout=30,
            print_line=lambda line: None,
        )  # fmt: skip
        sender.join()
    lat = np.array(tl.latency)
    return {**stats, "median": float(np.median(lat)), "p95": float(np.percentile(lat, 95)), "n": len(lat)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10, help="length of the long video (default 10)")
    p.add_argument("--window", default="10s", help="window length, as predict --window (default 10s)")
    p.add_argument("--stride", default="5s", help="window start every, as predict --stride (default 5s)")
    p.add_argument("--config", default="configs/tsn.yaml", help="the model's config (default configs/tsn.yaml)")
    p.add_argument("--width", type=int, default=8, help="backbone base_channels (default 8: decoding dominates)")
    p.add_argument("--size", type=int, default=112, help="frame side in pixels (default 112)")
    p.add_argument("--stream-seconds", type=float, default=30, help="length of the live stream timed (default 30)")
    p.add_argument(
        "--video",
        default=os.path.join(tempfile.gettempdir(), "timeline_bench_340x256.mp4"),
        help="the long video, made once and kept here",
    )
    return p.parse_args(argv)


class TimedScorer:
    """The model's scorer with its seconds counted: the model's time is the same on both sides, to be set apart."""

    def __init__(self, score):
        self.score, self.seconds = score, 0.0

    def __call__(self, imgs):
        t = time.perf_counter()
        out = self.score(imgs)
        self.seconds += time.perf_counter() - t
        return out


def build_scorer(a: argparse.Namespace):
    """(config, TimedScorer) of the config's model at --width and --size, random weights."""
    import paddle

    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.predict import dynamic_scorer

    overrides = [f"MODEL.backbone.base_channels={a.width}", "MODEL.backbone.pretrained=''"]
    overrides += [f"PIPELINE.target_size={a.size}", f"PIPELINE.short_size={a.size * 8 // 7}", "DATASET.label_file=''"]
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), a.config), overrides)
    paddle.seed(0)
    model = build_model(cfg)
    return cfg, TimedScorer(dynamic_scorer(model))


def run_timeline(
    spec, scorer: TimedScorer, index, windows, *, batch: int, index_s: float, window_frames: int
) -> tuple[dict, float, float]:
    """(logits by window, seconds, the model's seconds) of the timeline path; prints its line."""
    from dali_pipelines import windows as sparse
    from trainer import clip_scorer

    stats = sparse.DecodeStats()
    scorer.seconds = 0.0
    t = time.perf_counter()
    ours = dict(
        clip_scorer.score_clips(
            spec,
            scorer,
            sparse.read_windows(index, [clip_scorer.window_indices(spec, *w) for w in windows], stats),
            batch_size=batch,
            prefetch=2,
        )
    )
    timeline_s, timeline_model = time.perf_counter() - t + index_s, scorer.seconds
    print(
        f"timeline:   {timeline_s:7.1f}s ({len(windows) / timeline_s:.2f} windows/s; index {index_s:.1f}s); decoded "
        f"{stats.decoded} of {index.num_frames} frames, {stats.converted} to RGB, at most {stats.held_max} held "
        f"(a window is {window_frames})"
    )
    return ours, timeline_s, timeline_model


def run_per_window(video: str, spec, scorer: TimedScorer, index, windows, batch: int) -> tuple[dict, float, float]:
    """(logits by window, seconds, the model's seconds) of the per-window path; prints its line."""
    from trainer import clip_scorer

    base = {"decoded": 0}
    scorer.seconds = 0.0
    t = time.perf_counter()
    theirs = dict(
        clip_scorer.score_clips(
            spec, scorer, per_window_clips(video, index, windows, spec, base), batch_size=batch, prefetch=2
        )
    )
    per_window_s, per_window_model = time.perf_counter() - t, scorer.seconds
    print(
        f"per-window: {per_window_s:7.1f}s ({len(windows) / per_window_s:.2f} windows/s); decoded "
        f"{base['decoded']} frames ({base['decoded'] / len(windows):.0f} per window)"
    )
    return theirs, per_window_s, per_window_model


def main(argv=None) -> int:
    a = parse_args(argv)

    from dali_pipelines import windows as sparse
    from trainer import clip_scorer, timeline

    t = time.perf_counter()
    make_video(a.video, a.minutes)
    print(
        f"video: {a.video} ({os.path.getsize(a.video) / 1e6:.1f} MB; made or found in {time.perf_counter() - t:.0f}s)"
    )
    cfg, scorer = build_scorer(a)
    names = [str(i) for i in range(cfg.MODEL.head.num_classes)]
    spec = clip_scorer.clip_spec(cfg)
    window, stride = timeline.parse_span(a.window), timeline.parse_span(a.stride)

    t = time.perf_counter()
    index = sparse.index_video(a.video)
    index_s = time.perf_counter() - t
    w, s = window.frames(index.fps), stride.frames(index.fps)
    windows = timeline.plan_windows(index.num_frames, w, s)
    batch = cfg.DATASET.batch_size
    print(
        f"{cfg.MODEL.name} ResNet-{cfg.MODEL.backbone.depth} width {a.width} at {a.size}px, "
        f"{spec.num_segments} segments x {spec.num_clips} clip(s) x {spec.num_crops} crop(s) per window; "
        f"{index.num_frames} frames at {index.fps:g} fps, {len(windows)} windows of {w} frames every {s}; "
        f"batch {batch}; {os.cpu_count()} CPU cores"
    )
    for _ in clip_scorer.score_clips(
        spec, scorer, [(None, np.zeros((spec.num_segments, 256, 340, 3), np.uint8))], batch_size=1
    ):
        pass  # warm-up: the model's first call picks its kernels

    ours, timeline_s, timeline_model = run_timeline(
        spec, scorer, index, windows, batch=batch, index_s=index_s, window_frames=w
    )
    theirs, per_window_s, per_window_model = run_per_window(a.video, spec, scorer, index, windows, batch)
    diff = max(float(np.abs(ours[j] - theirs[j]).max()) for j in ours)
    print(f"same scores: max |logit difference| {diff:.2e} over {len(ours)} windows")
    assert diff < 1e-4, "the two paths disagree: the benchmark compares different work"

    if a.stream_seconds > 0:
        r = stream_latency(cfg, scorer, names, a.video, a.stream_seconds, window, stride)
        print(
            f"stream (FIFO, MPEG-TS in real time at {r['fps']:g} fps, {r['frames']} frames): {r['n']} windows, latency "
            f"median {1000 * r['median']:.0f} ms, p95 {1000 * r['p95']:.0f} ms per window; "
            f"{r['dropped_frames']} frames dropped"
        )
    print(
        f"end to end (with the model's {timeline_model:.1f}s and {per_window_model:.1f}s): "
        f"{per_window_s / timeline_s:.2f}x; without it (decode, sample, transform): "
        f"{per_window_s - per_window_model:.1f}s against {timeline_s - timeline_model:.1f}s"
    )
    print(f"timeline_speed_ratio: {(per_window_s - per_window_model) / (timeline_s - timeline_model):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
