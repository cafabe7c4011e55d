"""Preprocessing across hosts: N shards run at once into one destination, then merged, give exactly
what one unsharded run gives; the split, the locks and the merge's refusals."""

import fcntl
import os
import subprocess
import sys

import pytest

from clipdata import pkl as formats
from clipdata import video
from common.usage import UsageError
from preprocessing import build_list, check_videos, convert, shards, vid2img, video2pkl
from preprocessing.kinetics import Clip, read_csv
from preprocessing.merge_shards import merge_main
from tools.media import index_frames, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "label,youtube_id,time_start,time_end,split\n"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 clips in 3 classes, one corrupt and one missing video, a duplicate and a malformed row."""
    root = tmp_path_factory.mktemp("k")
    rows = []
    for i in range(12):
        cls = f"class {'abc'[i % 3]}"
        folder = root / "src" / cls.replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        vid = f"v{i:02d}"
        if i == 4:
            (folder / f"{vid}_000000_000010.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
        elif i != 7:  # v07 has no file
            write_video(folder / f"{vid}_000000_000010.mp4", index_frames(6 + i))
        rows.append(f"{cls},{vid},0,10,train\n")
    rows.insert(5, "class a,v00,0,10,train\n")  # a duplicate row of v00
    rows.insert(9, "class b,broken\n")  # a malformed row
    (root / "k.csv").write_text(HEADER + "".join(rows))
    return root


def _args(root, dst, *extra):
    return [str(root / "k.csv"), str(root / "src"), str(dst), "1", *extra]


def _unstamped(data: bytes) -> bytes:
    """A pkl file's bytes with its frame index's time stamp (the time it was written) zeroed: two runs
    write the same clip at different times, everything else must be byte for byte the same."""
    if not data.endswith(formats.INDEX_END):
        return data
    body_size = formats.INDEX_FOOTER.unpack(data[-formats.INDEX_FOOTER.size :])[0]
    start = len(data) - formats.INDEX_FOOTER.size - body_size
    head = list(formats.INDEX_HEADER.unpack_from(data, start))
    head[-1] = 0  # mtime_ns
    body = formats.INDEX_HEADER.pack(*head) + data[start + formats.INDEX_HEADER.size : -formats.INDEX_FOOTER.size]
    return data[:start] + body


def _tree(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): _unstamped(open(os.path.join(d, f), "rb").read())
        for d, _, files in os.walk(folder)
        for f in files
    }


@pytest.mark.slow
@pytest.mark.parametrize("tool", ["video2pkl", "vid2img"])
def test_shards_run_at_once_and_merged_equal_one_unsharded_run(dataset, tmp_path, tool):
    module = {"video2pkl": video2pkl, "vid2img": vid2img}[tool]
    assert module.main(_args(dataset, tmp_path / "one" / "pkl")) == 1  # failures: corrupt, missing, ...
    dst = tmp_path / "three" / "pkl"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                os.path.join(ROOT, "preprocessing", f"{tool}.py"),
                *_args(dataset, dst, "--shard", f"{i}/3"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in (1, 2, 3)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode in (0, 1) for p in procs), outs
    assert all("merge_shards.py" in out for out in outs)
    assert not (tmp_path / "three" / "pkl.list").exists()  # only the merge writes the list
    assert merge_main([str(tmp_path / "three" / "pkl.list"), "3", "--dst-dir", str(dst)]) == 1
    assert _tree(dst) == _tree(tmp_path / "one" / "pkl")  # the same pkl files, byte for byte
    for name in ("pkl.list", "pkl.failures.txt"):
        assert (tmp_path / "three" / name).read_text() == (tmp_path / "one" / name).read_text()
    failures = (tmp_path / "one" / "pkl.failures.txt").read_text()
    assert "v04" in failures and "v07" in failures and "duplicate CSV row" in failures and "malformed" in failures


def test_the_split_is_balanced_deterministic_and_keeps_a_duplicate_with_its_first_row():
    clips = [Clip(f"id{i}", f"id{i}", "c", "", row) for i, row in enumerate(range(2, 12))]
    clips.append(Clip("id0", "id0", "c", "", 12))  # id0 again, on a row of shard 2/3's
    bad = [("k.csv:13", "malformed")]
    taken = [shards.clips_of(shards.Shard(i, 3), clips, bad) for i in (1, 2, 3)]
    ids = [[c.video_id for c in part] for part, _ in taken]
    assert ids == [["id0", "id3", "id6", "id9", "id0"], ["id1", "id4", "id7"], ["id2", "id5", "id8"]]
    assert [len(b) for _, b in taken] == [0, 0, 1]  # row 13 is the 12th data row: position 11, shard 3/3
    assert sorted(c.row for part, _ in taken for c in part) == sorted(c.row for c in clips)  # each once
    assert shards.items_of(shards.Shard(2, 4), list("abcdefghij")) == ["b", "f", "j"]


@pytest.mark.parametrize("text", ["0/2", "3/2", "x/2", "1/0", "1", "-1/2", "1/2/3"])
def test_a_bad_shard_is_a_one_line_usage_error(dataset, tmp_path, text, capsys):
    assert video2pkl.main(_args(dataset, tmp_path / "d", f"--shard={text}")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("video2pkl: error: --shard takes I/N with 1 <= I <= N") and "\n" not in err
    with pytest.raises(UsageError):
        shards.parse_shard(text)


def test_the_list_builder_and_check_videos_refuse_a_bad_shard_alike(dataset, tmp_path, capsys):
    lst = tmp_path / "v.list"
    lst.write_text(f"{next((dataset / 'src').rglob('*.mp4'))} 0\n")
    assert build_list.main(["videos", str(dataset / "src"), str(tmp_path / "o.list"), "--shard", "3/2"]) == 2
    assert check_videos.main([str(lst), "--shard", "0/2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": error: ")[0] for line in err] == ["build_list", "check_videos"]
    assert all("--shard takes I/N with 1 <= I <= N" in line for line in err)
    assert sorted(os.listdir(tmp_path)) == ["v.list"]  # nothing written


@pytest.mark.parametrize("source", ["pkl", "rawframes", "videos"])
def test_a_shard_of_an_empty_folder_is_the_unsharded_error_not_an_empty_part(tmp_path, source, capsys):
    (tmp_path / "empty" / "class_a").mkdir(parents=True)
    out = tmp_path / "o.list"
    for shard in ([], ["--shard", "2/3"]):
        assert build_list.main([source, str(tmp_path / "empty"), str(out), *shard]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [f"build_list: error: found no {source} under {tmp_path / 'empty'}"] * 2
    assert sorted(os.listdir(tmp_path)) == ["empty"]  # no list, no part


def test_the_merge_names_missing_unfinished_and_foreign_parts_and_writes_nothing(tmp_path, capsys):
    lst = str(tmp_path / "d.list")
    part = dict(tool="video2pkl", source="s", failures_file=str(tmp_path / "d.failures.txt"))
    shards.write_part(lst, shards.Shard(1, 4), **part, lines=[("a", "d/a.pkl")], complete=True)
    shards.write_part(lst, shards.Shard(2, 4), **part, lines=[("b", "d/b.pkl")], complete=False)
    assert merge_main([lst, "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("merge_shards: error: cannot merge 4 shards into")
    assert "shards 3,4 of 4 have no part yet (not run, still running, or killed: no d.list.shard-I-of-4.json)" in err
    assert "shard 2 of 4 is unfinished" in err and "run shard(s) 2,3,4 of 4 again (a Slurm array: --array=2,3,4)" in err
    assert "shard 1 " not in err and not os.path.exists(lst) and not os.path.exists(part["failures_file"])
    for i in (2, 3):
        shards.write_part(lst, shards.Shard(i, 4), **part, lines=[("bc"[i - 2], f"d/{'bc'[i - 2]}.pkl")], complete=True)
    shards.write_part(lst, shards.Shard(4, 4), **{**part, "source": "other"}, lines=[], complete=True)
    assert merge_main([lst, "4"]) == 2
    err = capsys.readouterr().err
    assert (
        "different runs" in err
        and "shards 1,2,3 of 4 have: video2pkl s ->" in err
        and "shard 4 of 4 has: video2pkl other" in err
    )
    assert not os.path.exists(lst)
    shards.write_part(
        lst, shards.Shard(4, 4), **part, lines=[("d", "d/d.pkl")], failures=[("x", "x\tbad")], complete=True
    )
    assert merge_main([lst, "4"]) == 1  # a clip failed, as the unsharded run's exit status says
    assert open(lst).read() == "d/a.pkl\nd/b.pkl\nd/c.pkl\nd/d.pkl\n"
    assert open(part["failures_file"]).read() == "x\tbad\n"


def test_shards_run_with_other_settings_are_not_merged(dataset, tmp_path, capsys):
    dst = tmp_path / "pkl"
    video2pkl.main(_args(dataset, dst, "--shard", "1/2"))
    video2pkl.main(_args(dataset, dst, "--shard", "2/2", "--jpeg-quality", "5"))
    capsys.readouterr()
    assert merge_main([str(dst) + ".list", "2", "--dst-dir", str(dst)]) == 2
    err = capsys.readouterr().err
    assert "different runs" in err and "jpeg quality 4" in err and "jpeg quality 5" in err
    assert not os.path.exists(str(dst) + ".list")


def test_a_shard_run_withdraws_its_earlier_part_before_it_starts(dataset, tmp_path, monkeypatch):
    """Else a merge during a rerun of a shard (say, one retrying failed clips) would take the old part."""
    dst = tmp_path / "pkl"
    video2pkl.main(_args(dataset, dst, "--shard", "1/2"))
    part = shards.part_path(str(dst) + ".list", shards.Shard(1, 2))
    assert os.path.exists(part)
    seen = []
    monkeypatch.setattr(convert, "_convert_clips", lambda *a: seen.append(os.path.exists(part)) or 130)
    assert video2pkl.main(_args(dataset, dst, "--shard", "1/2")) == 130
    assert seen == [False]


def test_locks_let_shards_of_one_split_run_together_and_refuse_everything_else(tmp_path):
    dst = str(tmp_path / "pkl")
    one = shards.lock(dst, "video2pkl", shards.Shard(1, 2))
    two = shards.lock(dst, "video2pkl", shards.Shard(2, 2))  # side by side
    try:
        with pytest.raises(shards.BusyError, match="in use by another video2pkl shard 1/2"):
            shards.lock(dst, "video2pkl", shards.Shard(1, 2))  # the same shard twice
        with pytest.raises(shards.BusyError, match=r"converted in 2 shards .*--shard 1/3 splits it in 3"):
            shards.lock(dst, "video2pkl", shards.Shard(1, 3))
        with pytest.raises(shards.BusyError, match=r"in use by shards 1/2, 2/2 \(pid"):
            shards.lock(dst, "video2pkl", None)  # an unsharded run
        assert merge_main([dst + ".list", "2", "--dst-dir", dst]) == 2  # still running
    finally:
        for held in one + two:
            held.release()
    assert shards.running_shards(dst) == ""  # the refused 1/3 let go of its lock too
    whole = shards.lock(dst, "video2pkl", None)
    try:
        with pytest.raises(shards.BusyError, match="in use by another video2pkl"):
            shards.lock(dst, "video2pkl", shards.Shard(1, 2))
        assert merge_main([dst + ".list", "2", "--dst-dir", dst]) == 2  # nor while an unsharded run writes
    finally:
        whole[0].release()


@pytest.mark.slow
def test_a_second_run_of_a_running_shard_is_refused_in_one_line(dataset, tmp_path):
    dst = str(tmp_path / "pkl")
    held = shards.lock(dst, "video2pkl", shards.Shard(2, 3))  # shard 2/3 is running (this process)
    try:
        for extra, expected in (
            (["--shard", "2/3"], f"{dst} is in use by another video2pkl shard 2/3 (pid {os.getpid()} on "),
            ([], f"{dst} is in use by shard 2/3 (pid {os.getpid()} on "),
            (["--shard", "1/2"], f"{dst} is being converted in 3 shards (shard 2/3 (pid {os.getpid()} on "),
        ):
            proc = subprocess.run(
                [sys.executable, os.path.join(ROOT, "preprocessing", "video2pkl.py"), *_args(dataset, dst, *extra)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 2 and proc.stderr.startswith(f"video2pkl: error: {expected}"), proc.stderr
            assert proc.stderr.count("\n") == 1
        assert os.listdir(dst) == []  # nothing converted
        proc = subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "preprocessing", "video2pkl.py"),
                *_args(dataset, dst, "--shard", "1/3"),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1 and "shard 1/3: " in proc.stdout  # another shard of the split runs alongside
    finally:
        for lock in held:
            lock.release()


def test_a_shard_clears_only_its_own_half_written_outputs(dataset, tmp_path):
    dst = tmp_path / "pkl"
    dst.mkdir()
    mine, theirs = dst / ".tmp-abcdefghv00_000000_000010.pkl", dst / ".tmp-abcdefghv01_000000_000010.pkl"
    mine.write_bytes(b"half")
    theirs.write_bytes(b"being written by shard 2")
    ids = {c.video_id for c in shards.clips_of(shards.Shard(1, 2), *read_csv(str(dataset / "k.csv")))[0]}
    assert "v00_000000_000010" in ids and "v01_000000_000010" not in ids
    video2pkl.main(_args(dataset, dst, "--shard", "1/2"))
    assert not mine.exists() and theirs.exists()


def test_build_list_probes_in_shards_and_the_merge_equals_one_run(dataset, tmp_path, capsys):
    src = str(dataset / "src")
    whole = str(tmp_path / "whole.list")
    assert build_list.main(["videos", src, whole, "--probe", "1"]) == 1  # v04 is unreadable
    skipped = [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines() if "skipped" in line]
    assert len(skipped) == 1 and "v04" in skipped[0]
    parts = str(tmp_path / "parts.list")
    for i in (1, 2):
        build_list.main(["videos", src, parts, "--probe", "1", "--shard", f"{i}/2"])
    assert not os.path.exists(parts)
    capsys.readouterr()
    assert merge_main([parts, "2"]) == 1
    assert [line.split(": ", 1)[1] for line in capsys.readouterr().err.splitlines()] == skipped
    assert open(parts).read() == open(whole).read()
    build_list.main(["videos", src, parts, "--shard", "1/2"])  # no frame counts: another list
    assert merge_main([parts, "2"]) == 2
    assert "frame counts probed" in capsys.readouterr().err


@pytest.mark.slow
def test_check_videos_in_shards_at_once_then_one_run_decodes_nothing_and_reports_as_one_run(dataset, tmp_path):
    lst = tmp_path / "v.list"
    videos = sorted((dataset / "src").rglob("*.mp4"))
    lst.write_text("".join(f"{v} {i % 3}\n" for i, v in enumerate(videos)) + f"{videos[0]} 99 0\n")
    cache = str(lst) + ".probe.json"
    check = [sys.executable, os.path.join(ROOT, "preprocessing", "check_videos.py"), str(lst), "--nproc", "1"]

    def run():
        proc = subprocess.run(check, capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, [line for line in proc.stderr.splitlines() if "check_videos:" in line]

    code, out, problems = run()
    assert code == 1 and f"{len(videos)} decoded now" in out and len(problems) == 2
    assert "v04" in problems[0] and "the list says 99 frames" in problems[1]
    verdicts = video.load_probe_cache(cache)
    os.unlink(cache)
    procs = [subprocess.Popen([*check, "--shard", f"{i}/3"], stdout=subprocess.PIPE, text=True) for i in (1, 2, 3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(f"shard {i}/3: {n} videos ({n} decoded now" in out for i, n, out in zip((1, 2, 3), (4, 4, 3), outs))
    assert video.load_probe_cache(cache) == verdicts  # no shard lost another's verdicts
    code, out, again = run()
    assert (code, again) == (1, problems)
    assert f"{len(videos)} videos (0 decoded now, {len(videos)} unchanged since checked)" in out


@pytest.mark.slow
def test_a_check_videos_shard_saves_its_verdicts_only_under_the_cache_lock(dataset, tmp_path):
    """So that a shard's read-merge-write of LIST.probe.json never overwrites another's meanwhile."""
    lst = tmp_path / "v.list"
    videos = sorted((dataset / "src" / "class_a").glob("*.mp4"))
    lst.write_text("".join(f"{v} 0\n" for v in videos))
    cache = str(lst) + ".probe.json"
    fd = os.open(cache + ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another shard is saving
    try:
        check = [sys.executable, os.path.join(ROOT, "preprocessing", "check_videos.py"), str(lst), "--nproc", "1"]
        proc = subprocess.Popen([*check, "--shard", "1/2"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(timeout=3)  # decoded long since (a second at most), waiting for the lock
        other = {"/elsewhere/x.mp4": video.VideoFacts(size=1, mtime_ns=1, frames=5, width=8, height=8, packets=5)}
        video.save_probe_cache(cache, other)
    finally:
        os.close(fd)
    assert proc.wait(timeout=60) == 0
    assert sorted(video.load_probe_cache(cache)) == sorted([str(videos[0]), str(videos[2]), *other])


@pytest.mark.slow
def test_the_slurm_array_template_converts_its_task_s_shard_and_merges(dataset, tmp_path):
    """The template as Slurm would run it: array tasks 1 and 2 of --array=1-2, task 2 again as a
    resubmitted --array=2 (the same shard, not shard 1 of a 1-way split), then the merge job."""
    script = os.path.join(ROOT, "launch", "slurm_preprocess.sbatch")
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_PER_TASK": "1"}
    dst = tmp_path / "pkl"

    def task(task_id, first, count):
        array = {"SLURM_ARRAY_TASK_ID": task_id, "SLURM_ARRAY_TASK_MIN": first, "SLURM_ARRAY_TASK_COUNT": count}
        return subprocess.run(
            ["bash", script, "2", str(dataset / "k.csv"), str(dataset / "src"), str(dst)],
            env={**env, **array},
            capture_output=True,
            text=True,
            timeout=300,
        )

    for task_id in ("1", "2"):
        proc = task(task_id, "1", "2")
        assert proc.returncode == 1 and f"shard {task_id}/2:" in proc.stdout  # some clips fail
    proc = task("2", "2", "1")
    assert proc.returncode == 1 and "shard 2/2: 5 clips ready (5 already done, 0 converted" in proc.stdout
    proc = task("0", "0", "2")  # --array=0-1: ids are shard numbers, 1..N
    assert proc.returncode == 2 and "--shard takes I/N with 1 <= I <= N" in proc.stderr
    assert not (tmp_path / "pkl.list").exists()
    proc = subprocess.run(["bash", script, "--merge", str(dst), "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "merge_shards: 2 shards" in proc.stdout
    assert len((tmp_path / "pkl.list").read_text().splitlines()) == 10
