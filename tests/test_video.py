"""CPU video decoding: the sparse decode returns exactly the frames the in-order decode returns."""

import subprocess

import av
import numpy as np
import pytest

from clipdata import video
from preprocessing.frames import ffmpeg_exe
from tools.media import (
    damaged_video,
    ffmpeg,
    has_bframes,
    index_frames,
    level_to_index,
    quadrant_frames,
    remux,
    write_video,
)


def _encode(path, frames, gop, open_gop=False):
    """H.264 with B-frames and a keyframe every ``gop`` frames (``open_gop``: with leading pictures)."""
    options = {"crf": "18", "preset": "veryfast", "g": str(gop), "keyint_min": str(gop), "bf": "3"}
    if open_gop:
        options["x264-params"] = "open-gop=1"
    with av.open(str(path), "w", format="mp4") as out:
        stream = out.add_stream("libx264", rate=25, options=options)
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
    _encode(root / "opengop.mp4", index_frames(50), gop=10, open_gop=True)
    # a stream copy cut at a non-key frame: the mp4 gets an edit list hiding the decoded pre-roll
    remux(root / "gop10.mp4", root / "edit.mp4", "-ss", "0.7")
    return root


@pytest.mark.parametrize("name", ["bframes.mp4", "gop10.mp4", "opengop.mp4", "edit.mp4"])
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


def test_each_wanted_frame_is_decoded_from_its_own_clean_start_and_a_group_of_pictures_once():
    # (pts, keyframe) in decode order: I0 P3 B1 B2 | I4 P7 B5 B6 | I8 P11 B9 B10
    gops = [(0, True), (3, False), (1, False), (2, False)]
    packets = [(pts + 4 * g, key) for g in range(3) for pts, key in gops]
    assert video.decode_ranges(packets, {1}) == [(0, 2)]  # up to the packet shown at 1, not the whole group
    assert video.decode_ranges(packets, {1, 2, 3}) == [(0, 3)]  # one group, decoded once for its frames
    assert video.decode_ranges(packets, {1, 10}) == [(0, 2), (8, 11)]  # the middle group is not decoded
    assert video.decode_ranges(packets, {2, 5}) == [(0, 6)]  # spans that touch are one
    # an open group: the keyframe shown at 8 has a leading picture (7, decoded after it): no clean start
    opened = [(0, True), (2, False), (1, False), (3, False), (8, True), (7, False), (9, False)]
    assert video.decode_ranges(opened, {9}) == [(0, 6)]


def test_frames_in_later_groups_of_pictures_are_decoded_from_their_own_keyframe(clips):
    with av.open(str(clips / "gop10.mp4")) as c:
        packets = [(p.pts, p.is_keyframe) for p in c.demux(video=0) if p.size]
    order = sorted(pts for pts, _ in packets)
    starts = [k for k, (_, key) in enumerate(packets) if key]
    assert len(starts) == 5
    ranges = video.decode_ranges(packets, {order[5], order[45]})
    assert len(ranges) == 2 and ranges[1][0] == starts[4]
    for threads in ("NONE", "FRAME"):  # frame threading changes nothing either
        for indices in ([5, 45], [12, 13, 38], [49, 0]):
            got = video.decode_frames(str(clips / "gop10.mp4"), np.array(indices), 50, threads=threads)
            np.testing.assert_array_equal(got, _in_order(clips / "gop10.mp4", indices))


def test_a_wrong_promised_count_falls_back_and_names_the_shortfall(clips):
    with pytest.raises(video.VideoError, match="fewer frames than the 60 the list promised"):
        video.decode_frames(str(clips / "bframes.mp4"), np.array([10, 55]), 60)
    container, stream = video._open(str(clips / "bframes.mp4"))
    try:
        assert video._decode_sparse(container, stream, {10}, 60) is None  # the packets are not the frames
    finally:
        container.close()


def test_a_video_damaged_before_its_stated_end_is_unreadable_unless_partial_clips_are_allowed(tmp_path):
    path = damaged_video(tmp_path / "bad.mp4")
    with pytest.raises(
        video.VideoError, match=r"bad.mp4: decoding fails after (\d+) of the 50 frames the container states"
    ):
        video.probe(str(path))
    partial = video.probe(str(path), allow_partial=True)
    assert 0 < partial.frames < 50


def test_the_loader_skips_a_damaged_video_once_probed_and_keeps_the_verdict(tmp_path, capfd, monkeypatch):
    from dali_pipelines import build_loader

    write_video(tmp_path / "good.mp4", index_frames(30))
    damaged_video(tmp_path / "bad.mp4")
    (tmp_path / "videos.txt").write_text("good.mp4 0\nbad.mp4 1\n")

    def labels(**options):
        loader = build_loader(
            str(tmp_path / "videos.txt"),
            "videos",
            "val",
            batch_size=2,
            num_segments=3,
            target_size=16,
            short_size=16,
            num_workers=1,
            **options,
        )
        return sorted(int(v) for _, y in loader for v in y.numpy()), loader.skipped

    assert labels() == ([0], 1)
    assert "bad.mp4" in capfd.readouterr().err
    monkeypatch.setattr(video, "probe", lambda *a: pytest.fail("probed again"))  # the verdict is cached
    assert labels() == ([0], 1)
    monkeypatch.undo()
    assert labels(allow_partial_videos=True) == ([0, 1], 0)


# Rotated videos: phones store portrait clips as landscape pictures plus a display matrix. ffmpeg
# (video2pkl, vid2img) applies it; every other path must show the same upright frames.
ROTATIONS = {
    "rot90": ["-display_rotation", "90"],
    "rot180": ["-display_rotation", "180"],
    "rot270": ["-display_rotation", "270"],
    "hflip": ["-display_hflip"],
    "rot90_hflip": ["-display_rotation", "90", "-display_hflip"],
}


def _ffmpeg_rgb(path, width, height):
    """Every frame as ffmpeg shows it (it applies the display matrix), [N, height, width, 3]."""
    out = subprocess.run(
        [ffmpeg_exe(), "-loglevel", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
        check=True,
        capture_output=True,
    ).stdout
    return np.frombuffer(out, np.uint8).reshape(-1, height, width, 3)


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    d = tmp_path_factory.mktemp("rotated")
    write_video(d / "upright.mp4", quadrant_frames())
    for name, args in ROTATIONS.items():
        remux(d / "upright.mp4", d / f"{name}.mp4", *args)
    return d


@pytest.mark.parametrize("name", sorted(ROTATIONS))
def test_decoded_frames_are_upright_exactly_as_ffmpeg_shows_them(rotated, name):
    path = rotated / f"{name}.mp4"
    facts = video.probe(str(path))
    assert (facts.width, facts.height) == ((48, 64) if "90" in name or "270" in name else (64, 48))
    shown = _ffmpeg_rgb(path, facts.width, facts.height)
    got = video.decode_frames(str(path), np.arange(12), 12)
    assert got.shape == shown.shape == (12, facts.height, facts.width, 3)
    assert np.abs(got.astype(int) - shown).max() <= 2  # swscale builds may round a level apart
    with open(path, "rb") as f:
        packets, layout = video.stream_info(f.read(), str(path))
    assert layout == (facts.width, facts.height, facts.turns, facts.mirror) and packets == 12
    # the coded pictures are the upright clip's: turning them back must give those
    plain = video.decode_frames(str(rotated / "upright.mp4"), np.arange(12), 12)
    np.testing.assert_array_equal(got, video.upright(plain, facts.turns, facts.mirror))


def test_a_display_matrix_at_another_angle_is_an_unreadable_video_naming_it(rotated):
    remux(rotated / "upright.mp4", rotated / "rot45.mp4", "-display_rotation", "45")
    with pytest.raises(video.VideoError, match=r"rot45.mp4: .*45 degrees.*re-encode it upright"):
        video.probe(str(rotated / "rot45.mp4"))


@pytest.mark.parametrize("mirror,turns", [(m, t) for m in (0, 1) for t in range(4)])
def test_the_gpu_graph_turns_frames_upright_like_the_cpu_path(mirror, turns):
    """loader._upright is what the GPU graph runs on NVDEC's frames; DALI's CPU operators compute the
    same, so it is checked here on odd sizes, exactly, against video.upright."""
    from nvidia.dali import fn, pipeline_def

    from dali_pipelines.loader import _upright

    frames = np.random.default_rng(turns).integers(0, 255, (3, 5, 7, 3), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: [frames], batch=True, layout="FHWC")
        m = fn.external_source(source=lambda: [np.array(mirror, np.int32)], batch=True)
        a = fn.external_source(source=lambda: [np.array(90.0 * turns, np.float32)], batch=True)
        return _upright(x, mirror=m, angle=a)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    np.testing.assert_array_equal(np.array(out[0]), video.upright(frames, turns, bool(mirror)))


def test_the_gpu_feed_passes_the_turn_and_upright_size_of_a_rotated_video(rotated):
    """The GPU path's host side (NVDEC decodes in the graph): crop windows are taken in the upright
    frame and the graph is told how to turn."""
    from clipdata.lists import Sample
    from dali_pipelines.feed import ClipSpec, load_sample

    spec = ClipSpec(source="videos", decode="video", mode="test", num_segments=3, target_size=32, short_size=32)
    row, facts = load_sample(spec, Sample(str(rotated / "rot90.mp4"), 0, 12, 1), (0, 0, 0, 0))
    raw, indices, mirror, angle, start, shape = row[:6]
    assert (facts.width, facts.height, facts.turns) == (48, 64, 1)
    assert (int(mirror), float(angle)) == (0, 90.0)
    assert start[0] + shape[0] <= 48 and start[1] + shape[1] <= 64  # (x, y) within the upright frame


def test_a_checked_list_keeps_a_damaged_video_with_a_listed_count_from_nvdec(tmp_path, capsys):
    """Lines with counts are only demuxed on the GPU path; check_videos decodes them once and the
    loader then skips the damaged one there too."""
    from clipdata.lists import read_list
    from dali_pipelines.feed import ClipSpec, load_sample
    from preprocessing import check_videos

    write_video(tmp_path / "good.mp4", index_frames(50))
    damaged_video(tmp_path / "bad.mp4")
    lst = str(tmp_path / "v.list")
    (tmp_path / "v.list").write_text("good.mp4 50 0\nbad.mp4 50 1\ngood.mp4 55 0\n")
    good, bad, _ = read_list(lst, "videos")
    spec = ClipSpec(source="videos", decode="video", mode="val", num_segments=3, target_size=16, short_size=16)
    load_sample(spec, bad, (0, 0, 0, 1))  # unchecked: the demux looks fine, NVDEC would get it
    assert check_videos.main([lst, "--nproc", "2"]) == 1
    err = capsys.readouterr().err
    assert "v.list:2: " in err and "bad.mp4: decoding fails after" in err
    assert "v.list:3: the list says 55 frames, " in err and "decodes to 50" in err
    cache = video.load_probe_cache(lst + ".probe.json")
    with pytest.raises(video.VideoError, match="decoding fails after"):
        load_sample(spec, bad, (0, 0, 0, 1), cache[bad.path])
    assert load_sample(spec, good, (0, 0, 0, 0), cache[good.path])[1] is None  # trusted, not probed again
    assert check_videos.main([lst]) == 1
    assert "0 decoded now, 2 unchanged since checked" in capsys.readouterr().out


def _gradients(n, width, height):
    """Smooth colour gradients that move with the frame index: scaled by any bicubic scaler, they stay close."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [
            np.stack([x * 255 // width, y * 255 // height, (x + y + 2 * i) * 255 // (width + height + 2 * n)], -1)
            for i in range(n)
        ]
    ).astype(np.uint8)


@pytest.fixture(scope="module")
def resized(tmp_path_factory):
    """Two H.264 clips of 64x48 and 40x30 joined with ``-c copy``: the frame size changes at frame 20."""
    d = tmp_path_factory.mktemp("resized")
    write_video(d / "a.mp4", _gradients(20, 64, 48))
    write_video(d / "b.mp4", _gradients(20, 40, 30))
    (d / "parts.txt").write_text(f"file '{d / 'a.mp4'}'\nfile '{d / 'b.mp4'}'\n")
    ffmpeg("-f", "concat", "-safe", "0", "-i", d / "parts.txt", "-c", "copy", d / "both.mp4")
    return d / "both.mp4"


def test_check_videos_names_a_list_count_one_frame_beyond_the_video(tmp_path, capsys):
    """One frame too many in the list is the count NVDEC would pad with a black frame: named too."""
    from preprocessing import check_videos

    write_video(tmp_path / "v.mp4", index_frames(12))
    (tmp_path / "v.list").write_text("v.mp4 13 0\n")
    assert check_videos.main([str(tmp_path / "v.list")]) == 1
    assert "v.list:1: the list says 13 frames, " in capsys.readouterr().err


def test_a_resolution_change_mid_stream_is_scaled_to_the_first_size_as_ffmpeg_does(resized):
    facts = video.probe(str(resized))
    assert (facts.frames, facts.width, facts.height) == (40, 64, 48)
    assert facts.size_change == "64x48 to 40x30 at frame 20"
    shown = _ffmpeg_rgb(resized, 64, 48)  # video2pkl and vid2img get these frames
    assert shown.shape[0] == 40
    for indices in ([5, 25, 35], [25, 39], [30], list(range(40))):
        got = video.decode_frames(str(resized), np.array(indices), 40)
        assert got.shape == (len(indices), 48, 64, 3)
        diff = np.abs(got.astype(int) - shown[indices])
        assert diff.max() <= 12 and diff.mean() < 2.5, (indices, diff.max(), diff.mean())
        np.testing.assert_array_equal(got, _in_order(resized, indices))


def test_a_resolution_change_is_read_on_the_cpu_skipped_on_the_gpu_and_reported_by_check_videos(resized, capsys):
    from clipdata.lists import read_list
    from dali_pipelines import build_loader
    from dali_pipelines.feed import ClipSpec, load_sample
    from preprocessing import check_videos

    lst = resized.parent / "v.list"
    lst.write_text("both.mp4 40 1\n")
    loader = build_loader(
        str(lst), "videos", "val", batch_size=1, num_segments=3, target_size=16, short_size=16, num_workers=0
    )
    assert [int(y.numpy()[0]) for _, y in loader] == [1] and loader.skipped == 0
    assert check_videos.main([str(lst)]) == 1
    err = capsys.readouterr().err
    assert "v.list:1: " in err and "both.mp4: its frame size changes mid-stream (64x48 to 40x30 at frame 20)" in err
    (sample,) = read_list(str(lst), "videos")
    facts = video.load_probe_cache(str(lst) + ".probe.json")[sample.path]
    spec = ClipSpec(source="videos", decode="video", mode="val", num_segments=3, target_size=16, short_size=16)
    with pytest.raises(video.VideoError, match=r"both.mp4: its frame size changes mid-stream.*re-encode it"):
        load_sample(spec, sample, (0, 0, 0, 0), facts)
