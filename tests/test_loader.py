import numpy as np
import pytest

from clipdata.errors import DataFormatError
from clipdata.pkl import write_pkl
from dali_pipelines import build_loader
from dali_pipelines.clipspec import MEAN, STD
from dali_pipelines.sampling import segment_indices
from tools.media import frame_levels, index_frames, jpeg, level_to_index, write_video


def _pkl_list(tmp_path, frames_per_clip, labels, colour=None):
    lines = []
    for i, (n, label) in enumerate(zip(frames_per_clip, labels)):
        frames = index_frames(n) if colour is None else np.broadcast_to(np.array(colour, np.uint8), (n, 48, 64, 3))
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", label, [jpeg(f) for f in frames])
        lines.append(f"c{i}.pkl")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt")


def test_output_shape_dtype_and_imagenet_normalisation(tmp_path):
    colour = (200, 100, 50)
    lst = _pkl_list(tmp_path, [20, 20, 20], [0, 1, 2], colour=colour)
    for mode in ("train", "val"):
        loader = build_loader(lst, "pkl", mode, batch_size=3, num_segments=4, target_size=32, short_size=40)
        imgs, labels = next(iter(loader))
        assert list(imgs.shape) == [3, 4, 3, 32, 32] and str(imgs.dtype) == "paddle.float32"
        assert list(labels.shape) == [3] and str(labels.dtype) == "paddle.int64"
        expected = (np.array(colour) / 255 - np.array(MEAN)) / np.array(STD)
        got = imgs.numpy().mean(axis=(0, 1, 3, 4))
        np.testing.assert_allclose(got, expected, atol=0.05)  # JPEG chroma error on a flat colour
        assert sorted(labels.numpy().tolist()) == [0, 1, 2]


# ImageNet's statistics in RGB order, written out here (not imported): the expectation must not move
# with the code it checks
IMAGENET_MEAN_RGB, IMAGENET_STD_RGB = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@pytest.mark.parametrize("source", ["pkl", "rawframes", "videos"])
def test_every_source_gives_rgb_normalised_with_imagenet_statistics(tmp_path, source):
    """A clip of one colour whose three channels differ: each output channel is that channel's value,
    normalised with ImageNet's RGB mean and std. A swap to BGR anywhere (decoding, the constants, the
    normalisation) moves channels 0 and 2 by about 0.4 here."""
    colour = (210, 120, 40)
    frames = np.broadcast_to(np.array(colour, np.uint8), (12, 48, 64, 3))
    if source == "pkl":
        write_pkl(str(tmp_path / "c.pkl"), "c", 0, [jpeg(f) for f in frames])
        line = "c.pkl"
    elif source == "rawframes":
        (tmp_path / "c").mkdir()
        for i, f in enumerate(frames):
            (tmp_path / "c" / f"img_{i + 1:05d}.jpg").write_bytes(jpeg(f))
        line = "c 12 0"
    else:
        write_video(str(tmp_path / "c.mp4"), np.ascontiguousarray(frames))
        line = "c.mp4 0"
    (tmp_path / "list.txt").write_text(line + "\n")
    loader = build_loader(
        str(tmp_path / "list.txt"),
        source,
        "val",
        batch_size=1,
        num_segments=2,
        target_size=16,
        short_size=16,
        num_workers=0,
    )
    imgs, _ = next(iter(loader))
    got = imgs.numpy().mean(axis=(0, 1, 3, 4))
    expected = (np.array(colour) / 255 - IMAGENET_MEAN_RGB) / IMAGENET_STD_RGB
    np.testing.assert_allclose(got, expected, atol=0.08)  # JPEG / H.264 chroma error on a flat colour


def test_two_ranks_draw_their_own_segments_crops_and_flips(tmp_path):
    """Training randomness is keyed by (seed, rank, epoch, position): rank 1's k-th clip must not repeat
    rank 0's draw. Every list entry is the same clip (red encodes the frame index, green a left-right
    ramp), so what differs between the ranks' outputs is only what each drew; the segments each rank
    shows are the ones its own key draws."""
    from dali_pipelines.sampling import sample_indices

    t, h, w = 40, 48, 64
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = (20 + 5 * np.arange(t)).reshape(t, 1, 1)
    frames[..., 1] = np.linspace(0, 255, w).astype(np.uint8)
    frames[..., 2] = 128
    data = [jpeg(f) for f in frames]
    for i in range(8):
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", 0, data)
    (tmp_path / "list.txt").write_text("".join(f"c{i}.pkl\n" for i in range(8)))
    seen = []
    for rank in (0, 1):
        loader = build_loader(
            str(tmp_path / "list.txt"),
            "pkl",
            "train",
            batch_size=4,
            num_segments=3,
            target_size=16,
            short_size=24,
            rank=rank,
            world_size=2,
            seed=7,
            num_workers=0,
        )
        imgs = next(iter(loader))[0].numpy()  # [4 clips, 3 segments, 3, 16, 16], epoch 0, positions 0..3
        red = imgs[:, :, 0] * IMAGENET_STD_RGB[0] + IMAGENET_MEAN_RGB[0]
        shown = np.rint((red.mean(axis=(2, 3)) * 255 - 20) / 5).astype(int)
        drawn = [sample_indices(t, 3, "train", np.random.default_rng((7, rank, 0, k))) for k in range(4)]
        np.testing.assert_array_equal(shown, np.array(drawn))
        seen.append(imgs)
    differ = [not np.allclose(seen[0][k], seen[1][k], atol=1e-3) for k in range(4)]
    assert all(differ), "rank 1 repeated rank 0's draws"
    green = [s[:, 0, 1].mean(axis=1) for s in seen]  # the ramp's profile: the crop window and the flip
    assert any(not np.allclose(green[0][k], green[1][k], atol=0.05) for k in range(4))


def test_pkl_frames_are_the_frames_at_the_sampled_indices(tmp_path):
    lst = _pkl_list(tmp_path, [30, 7, 50], [0, 1, 2])
    loader = build_loader(lst, "pkl", "val", batch_size=3, num_segments=5, target_size=32, short_size=32)
    imgs, labels = next(iter(loader))
    levels = frame_levels(imgs)
    for row, label in enumerate(labels.numpy()):
        n = [30, 7, 50][label]
        assert [level_to_index(v) for v in levels[row]] == segment_indices(n, 5, "val").tolist()


def test_h264_video_with_bframes_decodes_the_sampled_frames_on_cpu(tmp_path):
    write_video(tmp_path / "v.mp4", index_frames(40))
    (tmp_path / "videos.txt").write_text("v.mp4 1\n")
    loader = build_loader(
        str(tmp_path / "videos.txt"),
        "videos",
        "test",
        batch_size=2,
        num_segments=3,
        target_size=32,
        short_size=32,
        num_clips=2,
    )
    imgs, labels = next(iter(loader))
    assert list(imgs.shape) == [1, 6, 3, 32, 32] and labels.numpy().tolist() == [1]
    got = [level_to_index(v) for v in frame_levels(imgs)[0]]
    assert got == segment_indices(40, 3, "test", num_clips=2).tolist()
    assert (tmp_path / "videos.txt.probe.json").exists()  # frame counts are probed once and cached


def test_dense_sampling_reaches_the_decoded_frames(tmp_path):
    from dali_pipelines.sampling import dense_indices

    lst = _pkl_list(tmp_path, [50], [0])
    loader = build_loader(
        lst,
        "pkl",
        "test",
        batch_size=1,
        num_segments=4,
        target_size=32,
        short_size=32,
        num_clips=2,
        sampling="dense",
        dense_interval=5,
    )
    imgs, _ = next(iter(loader))
    got = [level_to_index(v) for v in frame_levels(imgs)[0]]
    assert got == dense_indices(50, 4, "test", num_clips=2, interval=5).tolist() == [0, 5, 10, 15, 30, 35, 40, 45]


def test_eval_visits_every_sample_once_across_ranks_with_uneven_shards(tmp_path):
    n = 7
    lst = _pkl_list(tmp_path, [12] * n, list(range(n)))
    seen = []
    for rank in range(2):
        loader = build_loader(
            lst, "pkl", "val", batch_size=2, num_segments=2, target_size=16, short_size=16, rank=rank, world_size=2
        )
        assert len(loader) == 2
        for epoch in range(2):
            got = [int(v) for _, labels in loader for v in labels.numpy()]
            if epoch == 0:
                seen += got
            else:
                assert len(got) == len(set(got))
    assert sorted(seen) == list(range(n))


def test_train_ranks_see_disjoint_samples_reshuffled_each_epoch(tmp_path):
    n = 8
    lst = _pkl_list(tmp_path, [12] * n, list(range(n)))
    loaders = [
        build_loader(
            lst,
            "pkl",
            "train",
            batch_size=2,
            num_segments=2,
            target_size=16,
            short_size=16,
            rank=r,
            world_size=2,
            seed=4,
        )
        for r in range(2)
    ]
    epochs = [[[int(v) for _, y in ld for v in y.numpy()] for _ in range(2)] for ld in loaders]
    assert not set(epochs[0][0]) & set(epochs[1][0])
    assert sorted(epochs[0][0] + epochs[1][0]) == list(range(n))
    assert epochs[0][0] != epochs[0][1] or epochs[1][0] != epochs[1][1]


def test_missing_file_is_reported_at_start_with_its_line_number(tmp_path):
    lst = _pkl_list(tmp_path, [12], [0])
    with open(lst, "a") as f:
        f.write("# a comment\nnot_there.pkl\n")
    with pytest.raises(DataFormatError, match=r"list.txt:3: .*not_there.pkl"):
        build_loader(lst, "pkl", "val", batch_size=1)


def test_malformed_list_lines_name_the_line_and_the_expected_format(tmp_path):
    (tmp_path / "raw.txt").write_text("frames/a 12\n")
    with pytest.raises(DataFormatError, match=r"raw.txt:1: expected 'frame_dir num_frames label'"):
        build_loader(str(tmp_path / "raw.txt"), "rawframes", "val", batch_size=1)
    (tmp_path / "vid.txt").write_text("a.mp4 x\n")
    with pytest.raises(DataFormatError, match=r"vid.txt:1: label 'x' is not an integer"):
        build_loader(str(tmp_path / "vid.txt"), "videos", "val", batch_size=1)


def test_label_outside_the_class_range_names_the_file(tmp_path):
    lst = _pkl_list(tmp_path, [12], [7])
    loader = build_loader(lst, "pkl", "val", batch_size=1, num_classes=5, target_size=16, short_size=16)
    with pytest.raises(Exception, match=r"c0.pkl.*label 7 is outside \[0, 5\)"):
        next(iter(loader))


def test_unknown_loader_option_is_rejected(tmp_path):
    lst = _pkl_list(tmp_path, [12], [0])
    with pytest.raises(TypeError, match="num_clip"):
        build_loader(lst, "pkl", "val", num_clip=2)


def test_lists_and_label_files_from_editors_read_alike(tmp_path):
    """A byte-order mark (Notepad, Excel) and Windows or old-Mac line ends change nothing."""
    from clipdata.lists import read_label_file, read_list

    write_pkl(str(tmp_path / "a b.pkl"), "a", 0, [jpeg(index_frames(1)[0])])
    for name, text in [("plain", "a b.pkl\n"), ("bom_crlf", "\ufeffa b.pkl\r\n\r\n"), ("cr", "a b.pkl\r")]:
        (tmp_path / f"{name}.list").write_bytes(text.encode())
        assert [s.path for s in read_list(str(tmp_path / f"{name}.list"), "pkl")] == [str(tmp_path / "a b.pkl")]
    (tmp_path / "labels.txt").write_bytes("\ufeff0 walking\r\n1 running\r\n".encode())
    assert read_label_file(str(tmp_path / "labels.txt")) == ["walking", "running"]


def test_a_list_or_label_file_in_another_encoding_names_the_line_and_the_fix(tmp_path):
    from clipdata.lists import read_label_file

    (tmp_path / "raw.txt").write_bytes("frames/a 12 0\nframes/caf\u00e9 12 1\n".encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"raw.txt:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        build_loader(str(tmp_path / "raw.txt"), "rawframes", "val", batch_size=1)
    (tmp_path / "labels.txt").write_bytes("0 caf\u00e9\n".encode("cp1252"))
    with pytest.raises(DataFormatError, match=r"labels.txt:1: not UTF-8"):
        read_label_file(str(tmp_path / "labels.txt"))


@pytest.mark.parametrize(
    "line,what",
    [
        ("frames/a 12 -1", "label '-1'"),
        ("frames/a 12 +1", "label '+1'"),
        ("frames/a 1\u00b2 0", "frame count '1\u00b2'"),
        ("frames/a 0 1", "frame count 0 must be >= 1"),
    ],
)
def test_list_counts_and_labels_are_plain_non_negative_integers(tmp_path, line, what):
    (tmp_path / "frames" / "a").mkdir(parents=True)
    (tmp_path / "raw.txt").write_text(line + "\n")
    with pytest.raises(DataFormatError, match=f"raw.txt:1: {what.replace('+', '[+]')}"):
        build_loader(str(tmp_path / "raw.txt"), "rawframes", "val", batch_size=1)


@pytest.mark.parametrize(
    "text,message",
    [
        ("0 a\n2 b\n", "class indices must be 0..1 without gaps"),
        ("0 a\n0 b\n", ":2: index 0 appears twice"),
        ("0 a b\n", ":1: expected 'index name'"),
        ("a b\n", ":1: expected 'index name'"),
    ],
)
def test_a_wrong_label_file_names_the_line_and_the_rule(tmp_path, text, message):
    from clipdata.lists import read_label_file

    (tmp_path / "labels.txt").write_text(text)
    with pytest.raises(DataFormatError, match=message):
        read_label_file(str(tmp_path / "labels.txt"))


def test_gpu_videos_without_nvdec_in_the_container_say_which_capability_to_add(tmp_path, monkeypatch):
    from clipdata.video import VideoError
    from dali_pipelines import loader

    monkeypatch.setattr(loader, "NVDEC_LIBRARY", "libnvcuvid-missing.so.1")  # a container without `video`
    monkeypatch.setenv("NVIDIA_DRIVER_CAPABILITIES", "compute,utility")
    (tmp_path / "v.list").write_text("v.mp4 0\n")
    with pytest.raises(VideoError) as e:
        build_loader(str(tmp_path / "v.list"), "videos", "train", device="gpu", batch_size=1)
    assert str(e.value) == (
        "NVDEC needs libnvcuvid-missing.so.1 from the NVIDIA driver and it cannot be loaded; in a container "
        "NVIDIA_DRIVER_CAPABILITIES must include video (it is 'compute,utility'): run it with "
        "-e NVIDIA_DRIVER_CAPABILITIES=compute,utility,video"
    )
    monkeypatch.setattr(loader, "NVDEC_LIBRARY", "libc.so.6")  # any library the loader can open
    assert loader.nvdec_unavailable() == ""
