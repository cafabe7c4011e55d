"""CPU video decoding: the sparse decode returns exactly the frames the in-order decode returns."""
import subprocess

import av
import numpy as np
import pytest

from dali_pipelines import video
from preprocessing.frames import ffmpeg_exe

from .media import has_bframes, index_frames, level_to_index, write_video


def _encode(path, frames, gop):
    """H.264 with B-frames and a keyframe every ``gop`` frames."""
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options={"crf": "18", "preset": "veryfast", "g": str(gop),
                                                             "keyint_min": str(gop), "bf": "3"})
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for img in frames:
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode())


def _in_order(path, indices):
    container, stream = video._open(str(path))
    try:
        got = video._decode_in_order(container, stream, set(int(i) for i in indices))
    finally:
        container.close()
    return np.stack([got[int(i)] for i in indices])


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("videos")
    write_video(root / "bframes.mp4", index_frames(50))
    _encode(root / "gop10.mp4", index_frames(50), gop=10)
    # a stream copy cut at a non-key frame: the mp4 gets an edit list hiding the decoded pre-roll
    subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", "-ss", "0.7", "-i", str(root / "gop10.mp4"), "-c",
                    "copy", str(root / "edit.mp4")], check=True)
    return root


@pytest.mark.parametrize("name", ["bframes.mp4", "gop10.mp4", "edit.mp4"])
def test_sparse_decode_returns_the_frames_of_the_in_order_decode(clips, name):
    path = clips / name
    assert has_bframes(path)
    n = video.probe(str(path)).frames
    rng = np.random.default_rng(0)
    sets = [[0], [n - 1], [n - 1, 0, n // 2, n // 2], list(range(n))]
    sets += [sorted(rng.choice(n, size=3, replace=False)) for _ in range(20)]
    for indices in sets:
        np.testing.assert_array_equal(video.decode_frames(str(path), np.array(indices), n), _in_order(path, indices))
    if name != "edit.mp4":  # frames carry their index: the right frames, not just the same ones
        levels = [level_to_index(f.mean()) for f in video.decode_frames(str(path), np.array([7, 31, 49]), n)]
        assert levels == [7, 31, 49]


def test_sparse_decode_is_taken_for_h264_mp4_and_skips_unreferenced_pictures(clips):
    for name in ("bframes.mp4", "gop10.mp4"):
        container, stream = video._open(str(clips / name))
        try:
            assert video._decode_sparse(container, stream, {5, 40}, 50) is not None
        finally:
            container.close()
    with av.open(str(clips / "bframes.mp4")) as c:
        packets = [(p.is_keyframe, video._disposable(bytes(p), 4)) for p in c.demux(video=0) if p.size]
    assert not any(disposable for key, disposable in packets if key)
    assert 0 < sum(disposable for _, disposable in packets) < len(packets)


def test_a_wrong_promised_count_falls_back_and_names_the_shortfall(clips):
    with pytest.raises(video.VideoError, match="fewer frames than the 60 the list promised"):
        video.decode_frames(str(clips / "bframes.mp4"), np.array([10, 55]), 60)
    container, stream = video._open(str(clips / "bframes.mp4"))
    try:
        assert video._decode_sparse(container, stream, {10}, 60) is None  # the packets are not the frames
    finally:
        container.close()
