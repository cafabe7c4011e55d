"""Crop windows of the TSN augmentations, as pure functions of the frame size and an RNG.

A window is ``(x0, y0, w, h)`` relative to the decoded frame (all in [0, 1]). The pipeline crops that
window from every frame of the clip and resizes it to ``target_size`` squared, so one window (and one
flip) applies to the whole clip. Cropping before resizing is equivalent to TSN's "resize the short side
to ``short_size``, then crop ``target_size``" and touches fewer pixels.
"""

from __future__ import annotations

import math

import numpy as np

TSN_SCALES = (1.0, 0.875, 0.75, 0.66)


def _relative(x0: float, y0: float, w: float, h: float, width: float, height: float) -> np.ndarray:
    return np.array([x0 / width, y0 / height, w / width, h / height], dtype=np.float32)


def center_window(width: int, height: int, target_size: int, short_size: int) -> np.ndarray:
    """Centre crop of ``target_size`` after resizing the short side to ``short_size``."""
    side = min(width, height) * min(1.0, target_size / short_size)
    return _relative((width - side) / 2, (height - side) / 2, side, side, width, height)


def multiscale_window(
    width: int,
    height: int,
    rng: np.random.Generator,
    target_size: int,
    short_size: int,
    scales=TSN_SCALES,
    max_distort: int = 1,
) -> np.ndarray:
    """TSN's multi-scale crop: crop sides drawn from ``scales`` x short side (aspect distortion at most
    ``max_distort`` scale steps), placed at one of 13 fixed offsets of a 5x5 grid."""
    k = short_size / min(width, height)
    rw, rh = width * k, height * k  # the frame as TSN sees it, short side resized
    base = min(rw, rh)
    sizes = [int(base * s) for s in scales]
    sizes = [target_size if abs(s - target_size) < 3 else s for s in sizes]
    pairs = [(w, h) for i, h in enumerate(sizes) for j, w in enumerate(sizes) if abs(i - j) <= max_distort]
    cw, ch = pairs[rng.integers(len(pairs))]
    cw, ch = min(cw, rw), min(ch, rh)
    sx, sy = (rw - cw) / 4, (rh - ch) / 4
    grid = [(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)]
    gx, gy = grid[rng.integers(len(grid))]
    return _relative(gx * sx, gy * sy, cw, ch, rw, rh)


def random_resized_window(
    width: int, height: int, rng: np.random.Generator, area=(0.08, 1.0), ratio=(3 / 4, 4 / 3)
) -> np.ndarray:
    """Inception-style random-resized crop; falls back to the largest centred crop of legal aspect."""
    total = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        a = total * rng.uniform(*area)
        r = math.exp(rng.uniform(*log_ratio))
        w, h = math.sqrt(a * r), math.sqrt(a / r)
        if w <= width and h <= height:
            return _relative(rng.uniform(0, width - w), rng.uniform(0, height - h), w, h, width, height)
    r = width / height
    if r < ratio[0]:
        w, h = width, width / ratio[0]
    elif r > ratio[1]:
        w, h = height * ratio[1], height
    else:
        w, h = width, height
    return _relative((width - w) / 2, (height - h) / 2, w, h, width, height)


def test_windows(
    width: int, height: int, target_size: int, short_size: int, num_crops: int
) -> list[tuple[np.ndarray, bool]]:
    """(window, flip) of each test crop, on the frame whose short side is resized to ``short_size``.

    1: the centre crop. 3: three ``target_size`` squares spread along the long side (start, centre,
    end). 10: the four corners and the centre, each also flipped.
    """
    k = short_size / min(width, height)
    rw, rh = width * k, height * k
    side = min(target_size, rw, rh)
    if num_crops == 1:
        return [(center_window(width, height, target_size, short_size), False)]
    if num_crops == 3:
        if rw >= rh:
            spots = [(0, (rh - side) / 2), ((rw - side) / 2, (rh - side) / 2), (rw - side, (rh - side) / 2)]
        else:
            spots = [((rw - side) / 2, 0), ((rw - side) / 2, (rh - side) / 2), ((rw - side) / 2, rh - side)]
        return [(_relative(x, y, side, side, rw, rh), False) for x, y in spots]
    if num_crops == 10:
        spots = [(0, 0), (rw - side, 0), (0, rh - side), (rw - side, rh - side), ((rw - side) / 2, (rh - side) / 2)]
        windows = [_relative(x, y, side, side, rw, rh) for x, y in spots]
        return [(w, False) for w in windows] + [(w, True) for w in windows]
    raise ValueError(f"num_crops must be 1, 3 or 10, got {num_crops}")
