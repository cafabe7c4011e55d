"""Crop windows against the published TSN protocols, written out here independently of crops.py."""

import numpy as np
import pytest

from dali_pipelines import crops


def _pixels(win, rw, rh):
    """A relative window back in pixels of the frame as TSN sees it (short side resized)."""
    return np.array([win[0] * rw, win[1] * rh, win[2] * rw, win[3] * rh], dtype=np.float64)


@pytest.mark.parametrize("width, height, short", [(340, 256, 256), (320, 240, 256), (256, 340, 256)])
def test_ten_crops_are_the_four_corners_and_the_centre_then_the_same_mirrored(width, height, short):
    k = short / min(width, height)
    rw, rh = width * k, height * k
    s = 224
    corners_and_centre = [
        [0, 0, s, s],
        [rw - s, 0, s, s],
        [0, rh - s, s, s],
        [rw - s, rh - s, s, s],
        [(rw - s) / 2, (rh - s) / 2, s, s],
    ]
    got = crops.test_windows(width, height, s, short, 10)
    assert [bool(f) for _, f in got] == [False] * 5 + [True] * 5
    np.testing.assert_allclose([_pixels(w, rw, rh) for w, _ in got], corners_and_centre * 2, atol=1e-3)


def test_three_crops_run_along_the_long_side_and_one_crop_is_the_centre():
    rw, rh = 340, 256
    three = crops.test_windows(340, 256, 224, 256, 3)
    np.testing.assert_allclose(
        [_pixels(w, rw, rh) for w, _ in three], [[0, 16, 224, 224], [58, 16, 224, 224], [116, 16, 224, 224]], atol=1e-3
    )
    assert not any(f for _, f in three)
    ((centre, flip),) = crops.test_windows(340, 256, 224, 256, 1)
    np.testing.assert_allclose(_pixels(centre, rw, rh), [58, 16, 224, 224], atol=1e-3)
    assert not flip


def test_multiscale_crops_take_tsn_sizes_at_the_thirteen_fixed_offsets():
    # TSN (Wang et al. 2016) MultiScaleCrop on a 340x256 frame: sides from 256 x (1, .875, .75, .66),
    # a side within 3 px of 224 counting as 224, at most one scale step between width and height,
    # placed at one of 13 positions of a 5x5 grid: the corners, the centre, the edge midpoints, and
    # the four quarter points
    sides = [256, 224, 192, 168]
    sizes = {(w, h) for i, h in enumerate(sides) for j, w in enumerate(sides) if abs(i - j) <= 1}
    grid = {(0, 0), (4, 0), (0, 4), (4, 4), (2, 2), (0, 2), (4, 2), (2, 4), (2, 0), (1, 1), (3, 1), (1, 3), (3, 3)}
    rng = np.random.default_rng(0)
    seen_sizes, seen_spots = set(), set()
    for _ in range(3000):
        x, y, w, h = _pixels(crops.multiscale_window(340, 256, rng, 224, 256), 340, 256)
        size = (round(w), round(h))
        assert size in sizes
        seen_sizes.add(size)
        if h > 255:  # the full height: no room to move vertically
            assert abs(y) < 1e-3
            continue
        gx, gy = x / ((340 - w) / 4), y / ((256 - h) / 4)
        assert abs(gx - round(gx)) < 1e-3 and abs(gy - round(gy)) < 1e-3
        seen_spots.add((round(gx), round(gy)))
    assert seen_sizes == sizes and seen_spots == grid
