"""Which frames of a video a sample uses: TSN sparse segment sampling and TSM's dense sampling
(docs/design.md "Sampling"). Pure functions serve the DALI path, the CPU reference path and the tests.
"""

from __future__ import annotations

import numpy as np

LOADER_MODES = ("train", "val", "test")  # random segments and crops | one centre view | multi-view test
SAMPLINGS = ("segment", "dense")


def segment_indices(
    num_frames: int, num_segments: int, mode: str, rng: np.random.Generator | None = None, num_clips: int = 1
) -> np.ndarray:
    """Return 0-based frame indices (int32) for one sample.

    train: one uniformly random frame inside each of ``num_segments`` equal segments.
    val:   the centre frame of each segment.
    test:  ``num_clips`` clips of ``num_segments`` frames, clip ``j`` taking the point at fraction
           ``(j + 0.5) / num_clips`` of every segment; clip-major order, ``num_clips * num_segments``
           indices. ``num_clips=1`` equals val.
    Videos shorter than ``num_segments`` repeat frames instead of failing.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_segments < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    if mode not in LOADER_MODES:
        raise ValueError(f"mode must be one of {LOADER_MODES}, got {mode!r}")
    seg = np.arange(num_segments)
    if mode == "train":
        if rng is None:
            rng = np.random.default_rng()
        if num_frames < num_segments:
            idx = seg * num_frames // num_segments
        else:
            start = seg * num_frames // num_segments
            end = (seg + 1) * num_frames // num_segments  # end > start because n >= k
            idx = start + rng.integers(0, end - start)
    else:
        if mode == "val":
            num_clips = 1
        if num_clips < 1:
            raise ValueError(f"num_clips must be >= 1, got {num_clips}")
        frac = (np.arange(num_clips)[:, None] + 0.5) / num_clips
        idx = np.floor((seg[None, :] + frac) * num_frames / num_segments).reshape(-1)
    return np.clip(idx, 0, num_frames - 1).astype(np.int32)


def dense_indices(
    num_frames: int,
    num_segments: int,
    mode: str,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
    interval: int = 8,
) -> np.ndarray:
    """TSM's dense sampling: ``num_segments`` frames ``interval`` apart from one window of
    ``num_segments * interval`` frames.

    train: the window starts at a uniformly random frame; val: it is centred; test: ``num_clips``
    windows with starts evenly spaced from the first to the last possible one (clip-major order, like
    ``segment_indices``). Videos shorter than the window wrap around (index modulo the length).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if num_segments < 1 or interval < 1:
        raise ValueError(f"num_segments and interval must be >= 1, got {num_segments} and {interval}")
    if mode not in LOADER_MODES:
        raise ValueError(f"mode must be one of {LOADER_MODES}, got {mode!r}")
    last_start = max(0, num_frames - num_segments * interval)
    if mode == "train":
        starts = np.array([(rng or np.random.default_rng()).integers(0, last_start + 1)])
    elif mode == "val" or num_clips == 1:
        starts = np.array([last_start // 2])
    else:
        starts = np.round(np.linspace(0, last_start, num_clips)).astype(np.int64)
    idx = (starts[:, None] + np.arange(num_segments)[None, :] * interval) % num_frames
    return idx.reshape(-1).astype(np.int32)


def sample_indices(
    num_frames: int,
    num_segments: int,
    mode: str,
    rng: np.random.Generator | None = None,
    num_clips: int = 1,
    sampling: str = "segment",
    interval: int = 8,
) -> np.ndarray:
    """The frame indices of one sample under ``sampling`` ("segment" or "dense")."""
    if sampling == "dense":
        return dense_indices(num_frames, num_segments, mode, rng, num_clips, interval)
    if sampling != "segment":
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    return segment_indices(num_frames, num_segments, mode, rng, num_clips)


def shard_indices(num_samples: int, rank: int, world_size: int, mode: str, epoch: int = 0, seed: int = 0) -> np.ndarray:
    """Which samples (indices into the list) this rank visits in this epoch.

    train: a permutation drawn from ``(seed, epoch)``, the same on every rank, cut into ``world_size``
           equal disjoint blocks; the ``num_samples % world_size`` left over change every epoch. Equal
           blocks keep every rank at the same step count, which collective training requires.
    val/test: every sample exactly once over all ranks (ranks may differ by one sample).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if mode == "train":
        per_rank = num_samples // world_size
        order = np.random.default_rng([seed, epoch]).permutation(num_samples)
        return order[rank * per_rank : (rank + 1) * per_rank]
    return np.arange(rank, num_samples, world_size)
