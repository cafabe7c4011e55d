"""The demo datasets: the motion task is direction of motion only."""

import numpy as np


def test_the_motion_task_classes_are_each_others_time_reversal():
    from preprocessing.make_demo_dataset import render_motion_clip

    right = render_motion_clip("moving right", 30, 96, 72, np.random.default_rng(4))
    left = render_motion_clip("moving left", 30, 96, 72, np.random.default_rng(4))
    np.testing.assert_array_equal(left, right[::-1])
    # the objects move right: the centre of mass of what differs from the first frame drifts right
    xs = [np.nonzero(np.abs(f.astype(int) - right[15].astype(int)).sum(axis=2) > 60)[1].mean() for f in right[[0, 29]]]
    assert xs[0] < xs[1]


def test_the_motion_task_dataset_has_two_direction_classes(tmp_path):
    from preprocessing.make_demo_dataset import main

    assert (
        main(
            [
                str(tmp_path),
                "--task",
                "motion",
                "--train-per-class",
                "1",
                "--val-per-class",
                "1",
                "--min-frames",
                "8",
                "--max-frames",
                "8",
            ]
        )
        == 0
    )
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["moving_left", "moving_right"]
    rows = (tmp_path / "kinetics_demo_val.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["moving right", "moving left"]
