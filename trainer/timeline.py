"""A long video as a timeline: every window scored with the model's own test sampling and transform,
each frame decoded at most once however much the windows overlap (docs/inference.md "Long videos")."""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from clipdata.video import VideoError
from dali_pipelines.windows import DecodeStats, index_video, read_windows

from . import clip_scorer, reports
from .spans import Span, parse_span  # noqa: F401 - the window and stride lengths, re-exported

log = logging.getLogger(__name__)


class TimelineError(VideoError):
    """A window or stride that does not fit the video; the message says which and the fix."""


def plan_windows(num_frames: int, window: int, stride: int) -> list[tuple[int, int]]:
    """``[start, end)`` frame ranges of ``window`` frames every ``stride`` frames; a last window is added
    flush with the end when the regular ones leave a tail, so that every frame is covered."""
    if window < 1 or stride < 1:
        raise TimelineError(f"window and stride must be >= 1 frame, got {window} and {stride}")
    if window > num_frames:
        raise TimelineError(f"window of {window} frames is longer than the video ({num_frames} frames)")
    out = [(s, s + window) for s in range(0, num_frames - window + 1, stride)]
    if out[-1][1] < num_frames:
        out.append((num_frames - window, num_frames))
    return out


@dataclass
class Timeline:
    """Scores per window: what timeline.csv / .json / .png are written from."""

    source: str
    fps: float
    window: str
    stride: str
    names: list[str]
    starts: list[float]
    ends: list[float]
    probs: list[np.ndarray]
    latency: list[float] | None = None  # live streams: seconds from the window's last frame to its scores

    def __len__(self) -> int:
        return len(self.starts)


def _windows_of(index, path: str, window: Span, w: int, s: int) -> list[tuple[int, int]]:
    """The windows of ``w`` frames every ``s`` of the indexed video; a window longer than it is an error
    that names the longest --window that fits."""
    if w > index.num_frames:
        raise TimelineError(
            f"--window {window} ({w} frames) is longer than {path} ({index.num_frames} frames, "
            f"{index.duration():.2f}s at {index.fps:g} fps); use --window {int(index.duration()) or 1}s or less"
        )
    return plan_windows(index.num_frames, w, s)


def run_timeline(
    cfg,
    scorer,
    names: list[str],
    path: str,
    *,
    window: Span,
    stride: Span,
    out_dir: str,
    top_k: int,
    min_segment: float | None = None,
):
    """Score every window of the video ``path`` and write the timeline files into ``out_dir``; returns
    their paths."""
    from tqdm import tqdm

    from common.files import check_writable

    check_writable(out_dir, "the timeline folder")  # before the work
    spec = clip_scorer.clip_spec(cfg)
    index = index_video(path)
    w, s = window.frames(index.fps), stride.frames(index.fps)
    windows = _windows_of(index, path, window, w, s)
    # at most a window's worth of sampled frames in the graph's batches (bounded memory, docs/inference.md)
    frames_per_clip = spec.num_segments * spec.num_clips
    batch = max(1, min(cfg.DATASET.batch_size, w // (2 * frames_per_clip)))
    tl = Timeline(path, index.fps, str(window), str(stride), names, [], [], [])
    ends = [index.times[e] if e < index.num_frames else index.duration() for _, e in windows]
    stats = DecodeStats()
    started = time.monotonic()
    bar = tqdm(total=len(windows), unit="window", desc=os.path.basename(path), file=sys.stderr, dynamic_ncols=True)
    try:
        clips = read_windows(index, [clip_scorer.window_indices(spec, s, e) for s, e in windows], stats)
        for j, logits in clip_scorer.score_clips(spec, scorer, clips, batch_size=batch, prefetch=2):
            tl.starts.append(float(index.times[windows[j][0]]))
            tl.ends.append(float(ends[j]))
            tl.probs.append(reports.softmax(logits))
            bar.update(1)
    finally:
        bar.close()
        if len(tl):  # what was scored is written even when a stop or an error ends the run early
            paths = reports.write_timeline(tl, out_dir, top_k, min_segment)
    took = time.monotonic() - started
    log.debug(
        "%s: %d windows of %d frames every %d in %.1fs (%.1f windows/s); decoded %d of %d frames once, held at most %d",
        path,
        len(windows),
        w,
        s,
        took,
        len(windows) / max(took, 1e-9),
        stats.decoded,
        index.num_frames,
        stats.held_max,
    )
    return paths, tl, stats
