import numpy as np
import pytest

from dali_pipelines.sampling import dense_indices, sample_indices, segment_indices, shard_indices


@pytest.mark.parametrize("n,k", [(100, 3), (10, 3), (3, 3), (250, 8)])
def test_train_sampling_takes_one_frame_inside_each_segment(n, k):
    rng = np.random.default_rng(0)
    for _ in range(50):
        idx = segment_indices(n, k, "train", rng)
        assert idx.dtype == np.int32 and idx.shape == (k,)
        for i, f in enumerate(idx):
            assert i * n // k <= f < (i + 1) * n // k


def test_train_sampling_covers_every_frame_of_a_segment_and_is_reproducible():
    seen = set()
    rng = np.random.default_rng(1)
    for _ in range(400):
        seen.add(int(segment_indices(30, 3, "train", rng)[0]))
    assert seen == set(range(10))
    a = segment_indices(300, 8, "train", np.random.default_rng(5))
    b = segment_indices(300, 8, "train", np.random.default_rng(5))
    assert (a == b).all()


def test_val_sampling_takes_segment_centres():
    assert segment_indices(30, 3, "val").tolist() == [5, 15, 25]
    assert segment_indices(100, 4, "val").tolist() == [12, 37, 62, 87]


@pytest.mark.parametrize("mode", ["train", "val", "test"])
def test_video_shorter_than_segment_count_repeats_frames(mode):
    idx = segment_indices(2, 5, mode, np.random.default_rng(0))
    assert len(idx) == 5 and set(idx.tolist()) <= {0, 1}
    assert (np.diff(idx) >= 0).all()
    assert segment_indices(1, 3, mode, np.random.default_rng(0)).tolist() == [0, 0, 0]


def test_test_sampling_gives_evenly_offset_clips():
    idx = segment_indices(100, 2, "test", num_clips=2)
    assert idx.tolist() == [12, 62, 37, 87]  # clip 0 then clip 1, each one frame per segment
    assert segment_indices(90, 3, "test", num_clips=1).tolist() == segment_indices(90, 3, "val").tolist()


def test_sampling_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_frames"):
        segment_indices(0, 3, "val")
    with pytest.raises(ValueError, match="mode"):
        segment_indices(10, 3, "training")


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (5, 1)])
def test_eval_shards_visit_every_sample_exactly_once(n, world):
    parts = [shard_indices(n, r, world, "val") for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == list(range(n))


def test_train_shards_are_disjoint_equal_and_reshuffle_each_epoch():
    n, world = 23, 2
    e0 = [shard_indices(n, r, world, "train", epoch=0, seed=3) for r in range(world)]
    e1 = [shard_indices(n, r, world, "train", epoch=1, seed=3) for r in range(world)]
    assert len(e0[0]) == len(e0[1]) == n // world
    assert not set(e0[0]) & set(e0[1])
    assert e0[0].tolist() != e1[0].tolist()
    again = shard_indices(n, 0, world, "train", epoch=0, seed=3)
    assert again.tolist() == e0[0].tolist()


def test_dense_sampling_takes_frames_a_fixed_interval_apart_from_one_window():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = dense_indices(100, 8, "train", rng, interval=4)
        assert (np.diff(idx) == 4).all() and 0 <= idx[0] <= 100 - 32
        starts.add(int(idx[0]))
    assert len(starts) > 30 and max(starts) == 68  # every start of a window that fits is drawn
    assert dense_indices(100, 8, "val", interval=4).tolist() == list(range(34, 66, 4))


def test_dense_test_clips_spread_their_windows_over_the_video():
    idx = dense_indices(200, 4, "test", num_clips=3, interval=8).reshape(3, 4)
    assert idx[:, 0].tolist() == [0, 84, 168] and (np.diff(idx, axis=1) == 8).all()
    assert (
        dense_indices(200, 4, "test", num_clips=1, interval=8).tolist()
        == dense_indices(200, 4, "val", interval=8).tolist()
    )


def test_dense_sampling_wraps_around_a_video_shorter_than_its_window():
    idx = dense_indices(10, 8, "train", np.random.default_rng(0), interval=8)
    assert idx.tolist() == [(k * 8) % 10 for k in range(8)]


def test_sample_indices_dispatches_on_the_sampling_and_rejects_others():
    assert sample_indices(30, 3, "val").tolist() == segment_indices(30, 3, "val").tolist()
    assert (
        sample_indices(100, 8, "val", sampling="dense", interval=4).tolist()
        == dense_indices(100, 8, "val", interval=4).tolist()
    )
    with pytest.raises(ValueError, match="sampling must be one of"):
        sample_indices(30, 3, "val", sampling="uniform")
