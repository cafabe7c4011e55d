"""The loader's host side in worker processes: the same batches whatever the workers, every guarantee kept,
and a worker that dies or hangs ends the run with a clear error."""

import functools
import json
import os
import signal
import time
from types import SimpleNamespace

import numpy as np
import pytest

from clipdata.lists import read_list
from clipdata.pkl import write_pkl
from common.processes import WorkerError
from dali_pipelines import build_loader
from dali_pipelines.feed import ClipSpec
from dali_pipelines.loader import _ClipSource
from tools.media import index_frames, jpeg, write_video

N = 10  # clips; c3 and c7 are unreadable


@pytest.fixture()
def clips(tmp_path):
    lines = []
    for i in range(N):
        frames = [jpeg(f) for f in index_frames(12 + i, width=48 + 8 * i)]  # sizes differ: windows differ
        if i in (3, 7):
            frames = [f[:200] for f in frames]  # cut JPEGs: unreadable whichever frames are sampled
        write_pkl(str(tmp_path / f"c{i}.pkl"), f"c{i}", i, frames)
        lines.append(f"c{i}.pkl")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "list.txt")


def _epochs(list_file, mode, workers, epochs=2, first_epoch=0, **kw):
    opts = dict(batch_size=3, num_segments=2, target_size=16, short_size=16, seed=5, num_workers=workers)
    loader = build_loader(list_file, "pkl", mode, **{**opts, **kw})
    loader.set_epoch(first_epoch)
    out = [[(imgs.numpy(), labels.numpy()) for imgs, labels in loader] for _ in range(epochs)]
    loader.close()
    return out, loader


@pytest.mark.parametrize("mode", ["train", "val"])
def test_batches_do_not_depend_on_the_number_of_workers(clips, mode):
    inline, _ = _epochs(clips, mode, 0)
    for workers in (1, 3):
        parallel, _ = _epochs(clips, mode, workers)
        assert len(parallel) == len(inline)
        for epoch_a, epoch_b in zip(inline, parallel):
            assert len(epoch_a) == len(epoch_b)
            for (imgs_a, labels_a), (imgs_b, labels_b) in zip(epoch_a, epoch_b):
                np.testing.assert_array_equal(labels_a, labels_b)
                np.testing.assert_array_equal(imgs_a, imgs_b)
    if mode == "train":  # augmentation does differ between epochs
        assert not all(np.array_equal(a[0], b[0]) for a, b in zip(inline[0], inline[1]))


def test_resume_at_an_epoch_repeats_it_exactly_with_workers(clips):
    straight, _ = _epochs(clips, "train", 2, epochs=3)
    resumed, _ = _epochs(clips, "train", 2, epochs=1, first_epoch=2)
    for (imgs_a, labels_a), (imgs_b, labels_b) in zip(straight[2], resumed[0]):
        np.testing.assert_array_equal(labels_a, labels_b)
        np.testing.assert_array_equal(imgs_a, imgs_b)


def test_training_batches_are_topped_up_and_skips_reported_once_and_counted(clips, capfd):
    epochs, loader = _epochs(clips, "train", 2, epochs=3)
    for epoch in epochs:
        assert len(epoch) == 3 and all(len(labels) == 3 for _, labels in epoch)
        assert not {3, 7} & {int(v) for _, labels in epoch for v in labels}
    err = capfd.readouterr().err
    assert err.count("c3.pkl") == 1 and err.count("c7.pkl") <= 1
    assert loader.skipped >= 3  # c3 is in every epoch's 9 of 10; each read counts


def test_evaluation_visits_every_readable_sample_once_with_workers(clips):
    seen, skipped = [], 0
    for rank in range(2):
        loader = build_loader(
            clips,
            "pkl",
            "val",
            batch_size=2,
            num_segments=2,
            target_size=16,
            short_size=16,
            rank=rank,
            world_size=2,
            num_workers=2,
        )
        epochs = [[int(v) for _, labels in loader for v in labels.numpy()] for _ in range(2)]
        assert epochs[0] == epochs[1]
        seen += epochs[0]
        skipped += loader.skipped
        loader.close()
    assert sorted(seen) == [i for i in range(N) if i not in (3, 7)]
    assert skipped == 4  # both unreadable samples, in each of the two epochs


def _gone(pid: int, within: float = 10.0) -> bool:
    end = time.time() + within
    while time.time() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:
                return True
        except ChildProcessError:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.timeout(60)
def _dead(pid: int) -> bool:
    """A zombie, or already reaped (it can be reaped between any two looks at /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] == "Z"
    except FileNotFoundError:
        return True


def test_a_worker_that_dies_ends_the_run_with_a_clear_error(clips):
    loader = build_loader(
        clips, "pkl", "train", batch_size=3, num_segments=2, target_size=16, short_size=16, num_workers=2
    )
    pids = loader._source.feed.worker_pids
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    while not _dead(pids[0]):
        time.sleep(0.01)
    t = time.time()
    with pytest.raises(
        WorkerError, match=r"loader worker process pid \d+ \(killed by SIGKILL\) died while reading .*c\d.pkl"
    ):
        for _ in loader:
            pass
    assert time.time() - t < 30
    assert all(_gone(p) for p in pids)


@pytest.mark.timeout(60)
def test_a_worker_that_hangs_on_a_file_ends_the_run_after_the_timeout(clips, tmp_path):
    os.mkfifo(tmp_path / "stuck.pkl")  # open() blocks forever: a hung filesystem
    with open(clips, "a") as f:
        f.write("stuck.pkl\n")
    loader = build_loader(
        clips,
        "pkl",
        "val",
        batch_size=11,
        num_segments=2,
        target_size=16,
        short_size=16,
        num_workers=2,
        worker_timeout=2,
    )
    pids = loader._source.feed.worker_pids
    t = time.time()
    with pytest.raises(WorkerError, match=r"returned nothing for 2 s while reading .*stuck.pkl"):
        next(iter(loader))
    assert time.time() - t < 20
    assert all(_gone(p) for p in pids)


def test_a_video_is_demuxed_once_not_on_every_read_and_again_when_it_changes(tmp_path, monkeypatch):
    """The GPU path's host side (the bytes NVDEC gets, and its packet check) runs without a GPU."""
    import dali_pipelines.feed as feed

    for i in range(2):
        write_video(tmp_path / f"v{i}.mp4", index_frames(20 + 5 * i))
    (tmp_path / "videos.txt").write_text("v0.mp4 20 0\nv1.mp4 1\n")  # a listed count, and one to probe
    calls = []
    real = feed.stream_info
    monkeypatch.setattr(feed, "stream_info", lambda data, name: calls.append(name) or real(data, name))
    monkeypatch.setattr(feed, "probe", lambda path: calls.append(path) or pytest.fail("decoded again"))

    def source():
        from clipdata.video import load_probe_cache, probe_cached

        list_file = str(tmp_path / "videos.txt")
        samples = read_list(list_file, "videos")
        facts = load_probe_cache(list_file + ".probe.json")
        facts.update(probe_cached([s.path for s in samples if not s.num_frames], list_file + ".probe.json", facts))
        spec = ClipSpec(source="videos", decode="video", mode="val", num_segments=3, target_size=16, short_size=16)
        return _ClipSource(
            samples,
            spec,
            batch_size=2,
            rank=0,
            world_size=1,
            seed=0,
            drop_last=False,
            facts=facts,
            cache_file=list_file + ".probe.json",
        )

    src = source()
    for epoch in range(3):
        src.epoch = epoch
        encoded, idx, *_, labels = src(SimpleNamespace(iteration=0))
        assert [len(e) for e in encoded] == [os.path.getsize(tmp_path / f"v{i}.mp4") for i in range(2)]
        assert [list(i) for i in idx] == [[3, 10, 16], [4, 12, 20]] and [int(x) for x in labels] == [0, 1]
    assert calls == [str(tmp_path / "v0.mp4")]  # v1's packets came with its start-up probe
    assert source() and calls == [str(tmp_path / "v0.mp4")]  # the next run reads them from the cache
    os.utime(tmp_path / "v0.mp4", ns=(1, 1))  # the file changed: probed again, not trusted
    src = source()
    src(SimpleNamespace(iteration=0))
    assert calls == [str(tmp_path / "v0.mp4")] * 2


def test_a_video_shorter_than_its_listed_count_is_skipped_before_nvdec(tmp_path, capfd):
    write_video(tmp_path / "v.mp4", index_frames(20))
    (tmp_path / "videos.txt").write_text("v.mp4 30 0\n")
    samples = read_list(str(tmp_path / "videos.txt"), "videos")
    src = _ClipSource(
        samples,
        ClipSpec(source="videos", decode="video", mode="val", num_segments=3, target_size=16, short_size=16),
        batch_size=1,
        rank=0,
        world_size=1,
        seed=0,
        drop_last=False,
        num_workers=1,
    )
    with pytest.raises(StopIteration):
        src(SimpleNamespace(iteration=0))
    assert src.skipped == 1 and "has 20 frames, fewer than the 30 the list promised" in capfd.readouterr().err
    src.feed.close()


def test_the_worker_timeout_fires_before_the_ranks_collective_timeout(monkeypatch):
    """A rank waiting on a hung file must say so before its peers' collective gives up without naming it."""
    from common.processes import COLLECTIVE_TIMEOUT_ENV, worker_timeout_within_collective

    monkeypatch.delenv(COLLECTIVE_TIMEOUT_ENV, raising=False)
    assert worker_timeout_within_collective(120.0) == 120.0  # one rank: no collective to beat
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "30")  # gloo
    assert worker_timeout_within_collective(120.0) == 20.0
    assert worker_timeout_within_collective(5.0) == 5.0
    monkeypatch.setenv(COLLECTIVE_TIMEOUT_ENV, "1800")  # NCCL's default
    assert worker_timeout_within_collective(120.0) == 120.0


def _note_seen_while_reading(exit_dir, s):
    with open(os.path.join(exit_dir, "reading.1.json")) as f:
        return json.load(f)["files"]


def test_the_files_a_rank_reads_are_noted_before_it_reads_them(tmp_path, monkeypatch):
    """A rank stopped or stuck in a read can write nothing then: the note (common/exits.py) is there already."""
    from clipdata.lists import Sample
    from common.processes import ParallelMap

    monkeypatch.setenv("TSN_EXIT_DIR", str(tmp_path))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    samples = [Sample(path=f"/data/v{i}.pkl", label=0, num_frames=0, line=i + 1) for i in range(4)]
    read = functools.partial(_note_seen_while_reading, str(tmp_path))
    inline = ParallelMap(read, 0, ahead=2, timeout=30)
    inline.submit([(s,) for s in samples])
    assert [inline.next()[1] for _ in samples] == [("ok", [s.path]) for s in samples]  # each read saw its file
    (tmp_path / "reading.1.json").write_text("{}")
    workers = ParallelMap(str, 1, ahead=2, timeout=30, chunk=2)  # the note names the chunk the rank waits for
    try:
        workers.submit([(s,) for s in samples])
        workers.next()
        assert json.loads((tmp_path / "reading.1.json").read_text())["files"] == ["/data/v0.pkl", "/data/v1.pkl"]
        workers.next(), workers.next()
        assert json.loads((tmp_path / "reading.1.json").read_text())["files"] == ["/data/v2.pkl", "/data/v3.pkl"]
    finally:
        workers.close()
