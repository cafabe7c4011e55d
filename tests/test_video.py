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


def _damaged(path, frames=50):
    """An H.264 mp4 whose middle third of coded data is garbage (the container still states every frame)."""
    write_video(path, index_frames(frames))
    data = bytearray(path.read_bytes())
    start = data.index(b"mdat")
    for k in range(start + (len(data) - start) // 3, start + (len(data) - start) // 2):
        data[k] = (data[k] * 7 + 13) & 0xFF
    path.write_bytes(bytes(data))
    return path


def test_a_video_damaged_before_its_stated_end_is_unreadable_unless_partial_clips_are_allowed(tmp_path):
    path = _damaged(tmp_path / "bad.mp4")
    with pytest.raises(video.VideoError, match=r"bad.mp4: decoding fails after (\d+) of the 50 frames the container states"):
        video.probe(str(path))
    partial = video.probe(str(path), allow_partial=True)
    assert 0 < partial.frames < 50


def test_the_loader_skips_a_damaged_video_once_probed_and_keeps_the_verdict(tmp_path, capfd, monkeypatch):
    from dali_pipelines import build_loader
    write_video(tmp_path / "good.mp4", index_frames(30))
    _damaged(tmp_path / "bad.mp4")
    (tmp_path / "videos.txt").write_text("good.mp4 0\nbad.mp4 1\n")

    def labels(**options):
        loader = build_loader(str(tmp_path / "videos.txt"), "videos", "val", batch_size=2, num_segments=3,
                              target_size=16, short_size=16, num_workers=1, **options)
        return sorted(int(v) for _, y in loader for v in y.numpy()), loader.skipped

    assert labels() == ([0], 1)
    assert "bad.mp4" in capfd.readouterr().err
    monkeypatch.setattr(video, "probe", lambda *a: pytest.fail("probed again"))  # the verdict is cached
    assert labels() == ([0], 1)
    monkeypatch.undo()
    assert labels(allow_partial_videos=True) == ([0, 1], 0)
