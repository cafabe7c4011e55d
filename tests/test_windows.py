"""Many windows of one video, each frame decoded at most once (dali_pipelines/windows.py): the frames equal
independent decoding bit for bit, groups of pictures no window samples are not decoded."""

import numpy as np
import pytest

from clipdata.video import decode_frames
from dali_pipelines import windows
from dali_pipelines.sampling import sample_indices
from tools.media import write_gop_video


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    return write_gop_video(tmp_path_factory.mktemp("win") / "long.mp4", 300)


def _samples(starts, length, segments=5, clips=2):
    return [s + sample_indices(length, segments, "test", None, clips) for s in starts]


def test_the_index_reads_packets_without_decoding(long_video):
    index = windows.index_video(long_video)
    assert index.sparse and index.num_frames == 300 and index.fps == 25
    assert index.times[:3].tolist() == pytest.approx([0, 0.04, 0.08]) and index.duration() == pytest.approx(12.0)
    assert index.disposable.any() and len(np.flatnonzero(index.clean_key)) >= 20  # B-frames, a keyframe every 12


def test_window_frames_equal_independent_decoding_and_each_frame_is_decoded_at_most_once(long_video):
    index = windows.index_video(long_video)
    samples = _samples(range(0, 251, 25), 50)
    stats = windows.DecodeStats()
    got = list(windows.read_windows(index, samples, stats))
    assert [j for j, _ in got] == list(range(len(samples)))
    for j, frames in got:
        assert frames.shape == (10, 48, 64, 3)
        assert np.array_equal(frames, decode_frames(long_video, samples[j], index.num_frames)), f"window {j}"
    wanted = {i for idx in samples for i in idx.tolist()}
    assert stats.converted == len(wanted)  # every sampled frame converted once, overlapping windows share it
    assert stats.decoded < index.num_frames  # GOPs and pictures nobody needs are not decoded
    assert stats.held_max <= 50  # never more than a window's frames in memory


def test_gops_without_a_wanted_frame_are_not_decoded(long_video):
    index = windows.index_video(long_video)
    keys = np.flatnonzero(index.clean_key)
    needed = windows.packets_to_decode(index, np.array([200]))
    pos = {int(p): k for k, p in enumerate(index.packet_pts)}[int(index.pts[200])]
    start = int(keys[keys <= pos][-1])
    assert not needed[:start].any() and not needed[pos + 1 :].any() and needed[start]
    assert needed.sum() < pos - start + 1 or not index.disposable[start:pos].any()  # unwanted B-frames left out


def test_a_video_without_a_packet_index_is_decoded_in_order_with_the_same_frames(tmp_path, long_video):
    from tools.media import ffmpeg

    ts = tmp_path / "long.ts"  # MPEG-TS: Annex B H.264, no avcC: counted by the probe, decoded in order
    ffmpeg("-i", long_video, "-c", "copy", "-f", "mpegts", ts)
    index = windows.index_video(str(ts))
    assert not index.sparse and index.num_frames == 300
    samples = _samples([0, 100, 250], 50, segments=3, clips=1)
    got = dict(windows.read_windows(index, samples))
    for j, idx in enumerate(samples):
        assert np.array_equal(got[j], decode_frames(str(ts), idx, 300))
