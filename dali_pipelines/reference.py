"""NumPy/Pillow references of the evaluation transforms.

``eval_views`` is the plain TSN definition: resize the short side of every frame to ``short_size``,
cut the test crops, resize a crop to ``target_size`` if it is not already, flip, normalise, CHW.
The DALI pipeline instead crops the same window from the decoded frame and resizes it once (fewer
pixels); ``eval_views_crop_first`` is that computation in Pillow. The two definitions differ only by
a sub-pixel registration of the crop when the scale is not a round ratio; tests hold the pipeline to
both, with the tolerances stated there.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from . import clipspec
from .crops import test_windows

MEAN = np.array(clipspec.MEAN, np.float32)
STD = np.array(clipspec.STD, np.float32)


def normalise(img: np.ndarray) -> np.ndarray:
    """uint8 HWC RGB -> float32 CHW, ImageNet-normalised."""
    return ((img.astype(np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)


def eval_views(frames: np.ndarray, target_size: int, short_size: int, num_crops: int = 1) -> np.ndarray:
    """frames [T, H, W, 3] uint8 -> [num_crops * T, 3, target, target] float32, crop-major (the
    pipeline's order)."""
    h, w = frames.shape[1:3]
    k = short_size / min(w, h)
    rw, rh = int(round(w * k)), int(round(h * k))
    resized = [Image.fromarray(f).resize((rw, rh), Image.BILINEAR) for f in frames]
    out = []
    for win, flip in test_windows(w, h, target_size, short_size, num_crops):
        box = tuple(int(round(v)) for v in (win[0] * rw, win[1] * rh, (win[0] + win[2]) * rw, (win[1] + win[3]) * rh))
        for img in resized:
            crop = img.crop(box)
            if crop.size != (target_size, target_size):
                crop = crop.resize((target_size, target_size), Image.BILINEAR)
            arr = np.asarray(crop)
            out.append(normalise(arr[:, ::-1] if flip else arr))
    return np.stack(out)


def eval_views_crop_first(frames: np.ndarray, target_size: int, short_size: int, num_crops: int = 1) -> np.ndarray:
    """The pipeline's computation: each window rounded to whole pixels of the decoded frame (as DALI's
    slice rounds it), cropped, resized straight to ``target_size``."""
    h, w = frames.shape[1:3]
    out = []
    for win, flip in test_windows(w, h, target_size, short_size, num_crops):
        box = (round(win[0] * w), round(win[1] * h), round((win[0] + win[2]) * w), round((win[1] + win[3]) * h))
        for f in frames:
            crop = Image.fromarray(f).crop(box).resize((target_size, target_size), Image.BILINEAR)
            arr = np.asarray(crop)
            out.append(normalise(arr[:, ::-1] if flip else arr))
    return np.stack(out)
