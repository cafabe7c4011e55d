"""The DALI pipelines against a NumPy/Pillow reference, frame by frame, and on broken data."""

import io

import numpy as np
import pytest
from PIL import Image

from clipdata.errors import DataFormatError
from clipdata.pkl import write_pkl
from dali_pipelines import build_loader
from dali_pipelines.reference import eval_views, eval_views_crop_first
from dali_pipelines.sampling import segment_indices
from preprocessing.make_demo_dataset import render_clip
from tools.media import ffmpeg, index_frames, jpeg, level_to_index, quadrant_frames, remux, write_video

# Grey levels, after undoing the normalisation. Same computation in Pillow: 99.9% of values within
# 2 levels, a few edge pixels up to 16 (the resampling kernels differ slightly). TSN's resize-then-crop:
# the crop may sit up to half a pixel apart, which moves sharp edges, so only the mean is bounded.
SAME_MEAN, SAME_P999, SAME_MAX = 0.5, 2.0, 16.0
TSN_MEAN = 3.0


def _levels_diff(a, b):
    return np.abs(a - b) * 0.226 * 255


def _textured_clip(n=24, w=320, h=240):
    return render_clip("spinning bar", n, w, h, np.random.default_rng(7))


def _write_sources(tmp_path, frames):
    """The same clip as pkl, rawframes and H.264 video; returns {source: (list file, decoded frames)}."""
    jpegs = [jpeg(f, quality=95) for f in frames]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
    write_pkl(str(tmp_path / "c.pkl"), "c", 2, jpegs)
    (tmp_path / "pkl.txt").write_text("c.pkl\n")
    (tmp_path / "frames").mkdir()
    for i, j in enumerate(jpegs, 1):
        (tmp_path / "frames" / f"img_{i:05d}.jpg").write_bytes(j)
    (tmp_path / "raw.txt").write_text(f"frames {len(frames)} 2\n")
    write_video(tmp_path / "c.mp4", frames)
    from clipdata.video import decode_frames

    video_frames = decode_frames(str(tmp_path / "c.mp4"), np.arange(len(frames)))
    (tmp_path / "vid.txt").write_text("c.mp4 2\n")
    return {"pkl": ("pkl.txt", decoded), "rawframes": ("raw.txt", decoded), "videos": ("vid.txt", video_frames)}


@pytest.mark.parametrize(
    "num_crops,target,short,size",
    [(1, 112, 128, (320, 240)), (3, 112, 128, (320, 240)), (10, 96, 128, (340, 256)), (1, 224, 240, (340, 256))],
)
def test_eval_output_matches_the_pillow_reference_for_every_source(tmp_path, num_crops, target, short, size):
    frames = _textured_clip(24, *size)
    sources = _write_sources(tmp_path, frames)
    for source, (list_name, decoded) in sources.items():
        loader = build_loader(
            str(tmp_path / list_name),
            source,
            "test",
            batch_size=1,
            num_segments=3,
            target_size=target,
            short_size=short,
            num_clips=2,
            num_crops=num_crops,
        )
        imgs, labels = next(iter(loader))
        assert labels.numpy().tolist() == [2]
        sampled = decoded[segment_indices(len(frames), 3, "test", num_clips=2)]
        got = imgs.numpy()[0]
        same = _levels_diff(got, eval_views_crop_first(sampled, target, short, num_crops))
        tsn = _levels_diff(got, eval_views(sampled, target, short, num_crops))
        assert got.shape == (num_crops * 6, 3, target, target)
        assert same.mean() <= SAME_MEAN and np.percentile(same, 99.9) <= SAME_P999 and same.max() <= SAME_MAX, (
            source,
            same.mean(),
            np.percentile(same, 99.9),
            same.max(),
        )
        assert tsn.mean() <= TSN_MEAN, (source, tsn.mean())


def test_each_crop_view_holds_the_sampled_frames_in_order(tmp_path):
    write_pkl(str(tmp_path / "c.pkl"), "c", 0, [jpeg(f) for f in index_frames(37)])
    (tmp_path / "l.txt").write_text("c.pkl\n")
    loader = build_loader(
        str(tmp_path / "l.txt"),
        "pkl",
        "test",
        batch_size=1,
        num_segments=4,
        target_size=16,
        short_size=16,
        num_clips=2,
        num_crops=3,
    )
    imgs, _ = next(iter(loader))
    mean = np.array([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    std = np.array([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    levels = ((imgs.numpy()[0] * std + mean) * 255).mean(axis=(1, 2, 3))
    expected = segment_indices(37, 4, "test", num_clips=2).tolist()
    assert [level_to_index(v) for v in levels] == expected * 3


def test_rawframes_decode_the_sampled_files(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    for i, f in enumerate(index_frames(23), 1):
        (folder / f"img_{i:05d}.jpg").write_bytes(jpeg(f))
    (tmp_path / "l.txt").write_text("v 23 4\n")
    imgs, labels = next(
        iter(
            build_loader(
                str(tmp_path / "l.txt"), "rawframes", "val", batch_size=1, num_segments=5, target_size=16, short_size=16
            )
        )
    )
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    levels = ((imgs.numpy()[0].transpose(0, 2, 3, 1) * std + mean) * 255).mean(axis=(1, 2, 3))
    assert [level_to_index(v) for v in levels] == segment_indices(23, 5, "val").tolist()
    assert labels.numpy().tolist() == [4]


def test_video_shorter_than_the_segment_count_repeats_frames(tmp_path):
    write_video(tmp_path / "short.mp4", index_frames(2))
    (tmp_path / "l.txt").write_text("short.mp4 0\n")
    imgs, _ = next(
        iter(
            build_loader(
                str(tmp_path / "l.txt"),
                "videos",
                "train",
                batch_size=1,
                num_segments=5,
                target_size=16,
                short_size=16,
                flip=False,
            )
        )
    )
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    levels = ((imgs.numpy()[0].transpose(0, 2, 3, 1) * std + mean) * 255).mean(axis=(1, 2, 3))
    assert [level_to_index(v) for v in levels] == [0, 0, 0, 1, 1]


def _broken_pkl_set(tmp_path, n=6):
    for i in range(n):
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", i, [jpeg(f) for f in index_frames(12)])
    data = (tmp_path / "c2.pkl").read_bytes()
    (tmp_path / "c2.pkl").write_bytes(data[: len(data) // 2])  # truncated pkl
    frames = [jpeg(f) for f in index_frames(12)]
    frames[5] = frames[5][: len(frames[5]) // 2]
    write_pkl(str(tmp_path / "c4.pkl"), "c4", 4, frames)  # one cut JPEG inside
    (tmp_path / "l.txt").write_text("".join(f"c{i}.pkl\n" for i in range(n)))
    return str(tmp_path / "l.txt")


def test_corrupt_samples_are_skipped_reported_once_and_counted_in_evaluation(tmp_path, capfd):
    loader = build_loader(
        _broken_pkl_set(tmp_path), "pkl", "val", batch_size=2, num_segments=12, target_size=16, short_size=16
    )
    for _ in range(2):  # the second epoch reports nothing new
        labels, levels = [], []
        for imgs, y in loader:
            labels += y.numpy().tolist()
            x = imgs.numpy() * 0.226 + 0.45
            levels.append(x.mean(axis=(2, 3, 4)))
        assert sorted(labels) == [0, 1, 3, 5]  # every readable sample exactly once, nothing padded
        assert np.concatenate(levels).min() * 255 > 15  # no black frames stand in for broken ones
    assert loader.skipped == 4
    err = capfd.readouterr().err
    assert err.count("skipping") == 2 and "c2.pkl" in err and "c4.pkl" in err
    assert "corrupt or truncated JPEG" in err and "not a clip pkl" in err


def test_training_tops_up_batches_so_every_rank_keeps_its_step_count(tmp_path):
    loader = build_loader(
        _broken_pkl_set(tmp_path), "pkl", "train", batch_size=2, num_segments=3, target_size=16, short_size=16
    )
    sizes = [y.shape[0] for _, y in loader]
    assert sizes == [2] * len(loader) == [2, 2, 2]
    assert loader.skipped >= 1


def test_video_list_promising_more_frames_than_the_video_has_is_caught(tmp_path, capfd):
    write_video(tmp_path / "a.mp4", index_frames(10))
    write_video(tmp_path / "b.mp4", index_frames(10))
    (tmp_path / "l.txt").write_text("a.mp4 40 0\nb.mp4 10 1\n")
    labels = [
        int(v)
        for _, y in build_loader(
            str(tmp_path / "l.txt"), "videos", "val", batch_size=2, num_segments=3, target_size=16, short_size=16
        )
        for v in y.numpy()
    ]
    assert labels == [1]
    assert "fewer frames than the 40 the list promised" in capfd.readouterr().err


def test_truncated_video_met_mid_epoch_is_skipped(tmp_path, capfd):
    write_video(tmp_path / "good.mp4", index_frames(20))
    data = (tmp_path / "good.mp4").read_bytes()
    (tmp_path / "bad.mp4").write_bytes(data[: len(data) // 3])
    (tmp_path / "l.txt").write_text("good.mp4 20 0\nbad.mp4 20 1\ngood.mp4 20 2\n")
    labels = [
        int(v)
        for _, y in build_loader(
            str(tmp_path / "l.txt"), "videos", "val", batch_size=3, num_segments=3, target_size=16, short_size=16
        )
        for v in y.numpy()
    ]
    assert labels == [0, 2]
    assert "bad.mp4" in capfd.readouterr().err


def test_wrong_rawframe_counts_are_reported_at_start_with_line_numbers(tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    for i, f in enumerate(index_frames(5), 1):
        (folder / f"img_{i:05d}.jpg").write_bytes(jpeg(f))
    for n in (4, 9):
        (tmp_path / "l.txt").write_text(f"v 5 0\nv {n} 0\n")
        with pytest.raises(DataFormatError, match=rf"l.txt:2: .*v has 5 frames, the list says {n}"):
            build_loader(str(tmp_path / "l.txt"), "rawframes", "val", batch_size=1)


def test_bad_num_crops_is_rejected(tmp_path):
    write_pkl(str(tmp_path / "c.pkl"), "c", 0, [jpeg(f) for f in index_frames(3)])
    (tmp_path / "l.txt").write_text("c.pkl\n")
    with pytest.raises(ValueError, match="num_crops must be 1, 3 or 10"):
        build_loader(str(tmp_path / "l.txt"), "pkl", "test", num_crops=5)


def test_ten_crop_views_five_to_nine_mirror_views_zero_to_four_on_a_gradient(tmp_path):
    """A clip brightening left to right: the flipped views are the unflipped ones reversed along W,
    the left corners are darker than the right ones, the centre lies between."""
    ramp = np.linspace(10, 245, 96)
    frame = np.broadcast_to(ramp[None, :, None], (64, 96, 3)).astype(np.uint8)
    write_pkl(str(tmp_path / "g.pkl"), "g", 0, [jpeg(frame)] * 4)
    (tmp_path / "g.txt").write_text("g.pkl\n")
    loader = build_loader(
        str(tmp_path / "g.txt"),
        "pkl",
        "test",
        batch_size=1,
        num_segments=1,
        target_size=32,
        short_size=48,
        num_crops=10,
        num_workers=0,
    )
    views = next(iter(loader))[0].numpy()[0]  # [10, 3, 32, 32]
    np.testing.assert_allclose(views[5:], views[:5, :, :, ::-1], atol=1e-6)
    left_to_right = views[:5, :, :, -1].mean(axis=(1, 2)) - views[:5, :, :, 0].mean(axis=(1, 2))
    assert (left_to_right > 0).all() and (views[5:, :, :, -1].mean() < views[5:, :, :, 0].mean())
    top_left, top_right, bottom_left, bottom_right, centre = views[:5].mean(axis=(1, 2, 3))
    assert top_left < centre < top_right and bottom_left < centre < bottom_right


def _with_sof_size(jpeg_bytes, width, height):
    """The JPEG with its frame header (SOF0) claiming another size; the entropy-coded data is unchanged."""
    i = jpeg_bytes.index(b"\xff\xc0")
    return jpeg_bytes[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + jpeg_bytes[i + 9 :]


def test_frames_whose_headers_the_decoder_cannot_trust_are_skipped_and_named(tmp_path, capfd):
    """A SOF claiming 65000x65000 or a height of 0 would stop every rank inside the DALI graph; frames of
    different sizes would be cut with one window: each such clip is skipped, named and counted."""
    frames = [jpeg(f) for f in index_frames(12)]
    clips = {
        "good": frames,
        "huge": [_with_sof_size(f, 65000, 65000) for f in frames],
        "flat": [_with_sof_size(f, 64, 0) for f in frames],
        "mixed": frames[:6] + [jpeg(f) for f in index_frames(6, width=96, height=64)],
    }
    for name, data in clips.items():
        write_pkl(str(tmp_path / f"{name}.pkl"), name, 0, data)
    (tmp_path / "list.txt").write_text("".join(f"{name}.pkl\n" for name in clips))
    loader = build_loader(
        str(tmp_path / "list.txt"), "pkl", "val", batch_size=4, num_segments=4, target_size=16, short_size=16
    )
    ((imgs, labels),) = list(loader)
    assert imgs.shape[0] == 1 and loader.skipped == 3
    err = capfd.readouterr().err
    assert "huge.pkl" in err and "65000x65000" in err and "flat.pkl" in err and "64x0" in err
    assert "mixed.pkl" in err and "differ in size" in err


@pytest.mark.parametrize("rotation", ["90", "180"])
def test_a_rotated_video_gives_the_same_upright_clip_on_every_path(tmp_path, rotation):
    """video2pkl and vid2img (ffmpeg applies the display matrix) and the video source (PyAV, which does
    not) must feed the model the same picture; predict reads videos the same way."""
    from preprocessing import vid2img, video2pkl

    src = tmp_path / "src" / "class_a"
    src.mkdir(parents=True)
    write_video(tmp_path / "upright.mp4", quadrant_frames(12))
    clip = src / "vid00000001_000000_000010.mp4"
    remux(tmp_path / "upright.mp4", clip, "-display_rotation", rotation)
    csv = tmp_path / "k.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\nclass a,vid00000001,0,10,train\n")
    assert video2pkl.main([str(csv), str(tmp_path / "src"), str(tmp_path / "pkl"), "1"]) == 0
    assert vid2img.main([str(csv), str(tmp_path / "src"), str(tmp_path / "raw"), "1"]) == 0
    (tmp_path / "vid.list").write_text(f"{clip} 0\n")
    views = {}
    for source, list_file in [("pkl", "pkl.list"), ("rawframes", "raw.list"), ("videos", "vid.list")]:
        loader = build_loader(
            str(tmp_path / list_file), source, "test", batch_size=1, num_segments=3, target_size=32, short_size=32
        )
        views[source] = next(iter(loader))[0].numpy()[0]
        loader.close()
    for source in ("rawframes", "videos"):
        assert views[source].shape == views["pkl"].shape
        assert _levels_diff(views[source], views["pkl"]).mean() < 3.0, source  # 2.1 measured; 126 unturned


def test_the_gpu_paths_graph_gives_the_cpu_paths_views_with_dalis_cpu_video_decoder(tmp_path):
    """The GPU path's whole graph (video bytes in; DALI decodes, turns upright, crops) run with DALI's
    CPU video decoder, which takes VP9 (H.264 only on NVDEC), on a clip with a display matrix: the same
    views as the CPU path (PyAV decodes; frames in). Only NVDEC itself is left to the GPU self-test."""
    from clipdata.lists import read_list
    from dali_pipelines.feed import ClipSpec
    from dali_pipelines.loader import DALILoader, _ClipSource, define_pipeline

    write_video(tmp_path / "upright.mp4", quadrant_frames(12))
    ffmpeg("-i", tmp_path / "upright.mp4", "-c:v", "libvpx-vp9", "-crf", "10", tmp_path / "plain.mp4")
    remux(tmp_path / "plain.mp4", tmp_path / "vp9.mp4", "-display_rotation", "90")  # a display matrix, same pictures
    (tmp_path / "vid.list").write_text("vp9.mp4 0\n")
    cpu = build_loader(
        str(tmp_path / "vid.list"),
        "videos",
        "test",
        batch_size=1,
        num_segments=3,
        target_size=32,
        short_size=32,
        num_workers=0,
    )
    expected = next(iter(cpu))[0].numpy()[0]
    spec = ClipSpec(source="videos", decode="video", mode="test", num_segments=3, target_size=32, short_size=32)
    src = _ClipSource(
        read_list(str(tmp_path / "vid.list"), "videos"),
        spec,
        batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
        drop_last=False,
    )
    pipe = define_pipeline(src, device="cpu", device_id=None, num_threads=1, prefetch=1, dtype="float32")
    pipe.build()
    got = next(iter(DALILoader(src, pipe)))[0].numpy()[0]
    assert got.shape == expected.shape
    assert _levels_diff(got, expected).mean() < 4.0  # 2.2 measured (two YUV->RGB conversions); unturned >100
