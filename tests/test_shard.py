"""Preprocessing across hosts: N shards run at once into one destination, then merged, give exactly
what one unsharded run gives; the split, the locks and the merge's refusals."""

import os
import subprocess
import sys

import pytest

from preprocessing import build_list, shards, vid2img, video2pkl
from preprocessing.kinetics import Clip, UsageError, read_csv
from preprocessing.merge_shards import merge_main

from .media import index_frames, write_video

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


def _tree(folder):
    return {
        os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
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


def test_the_merge_names_missing_unfinished_and_foreign_parts_and_writes_nothing(tmp_path, capsys):
    lst = str(tmp_path / "d.list")
    shards.write_part(lst, shards.Shard(1, 3), tool="video2pkl", source="s", lines=[("a", "d/a.pkl")], complete=True)
    shards.write_part(lst, shards.Shard(2, 3), tool="video2pkl", source="s", lines=[("b", "d/b.pkl")], complete=False)
    assert merge_main([lst, "3"]) == 2
    err = capsys.readouterr().err
    assert "shard 2/3: unfinished" in err and "shard 3/3: no part yet (d.list.shard-3-of-3.json" in err
    assert "shard 1/3" not in err and not os.path.exists(lst)
    shards.write_part(lst, shards.Shard(2, 3), tool="video2pkl", source="s", lines=[("b", "d/b.pkl")], complete=True)
    shards.write_part(lst, shards.Shard(3, 3), tool="video2pkl", source="other", lines=[], complete=True)
    assert merge_main([lst, "3"]) == 2
    assert "different runs" in capsys.readouterr().err and not os.path.exists(lst)
    shards.write_part(lst, shards.Shard(3, 3), tool="video2pkl", source="s", lines=[("c", "d/c.pkl")], complete=True)
    assert merge_main([lst, "3"]) == 0
    assert open(lst).read() == "d/a.pkl\nd/b.pkl\nd/c.pkl\n"


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
    whole = shards.lock(dst, "video2pkl", None)
    try:
        with pytest.raises(shards.BusyError, match="in use by another video2pkl"):
            shards.lock(dst, "video2pkl", shards.Shard(1, 2))
    finally:
        whole[0].release()


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


def test_build_list_probes_in_shards_and_the_merge_equals_one_run(dataset, tmp_path):
    src = str(dataset / "src")
    whole = str(tmp_path / "whole.list")
    build_list.main(["videos", src, whole, "--probe", "1"])
    parts = str(tmp_path / "parts.list")
    for i in (1, 2):
        build_list.main(["videos", src, parts, "--probe", "1", "--shard", f"{i}/2"])
    assert not os.path.exists(parts)
    merge_main([parts, "2"])
    assert open(parts).read() == open(whole).read()


@pytest.mark.slow
def test_the_slurm_array_template_converts_its_task_s_shard_and_merges(dataset, tmp_path):
    """The template as Slurm would run it: two array tasks (ids 0 and 1), then the merge job."""
    script = os.path.join(ROOT, "launch", "slurm_preprocess.sbatch")
    env = {**os.environ, "PYTHON": sys.executable, "SLURM_SUBMIT_DIR": ROOT, "SLURM_CPUS_PER_TASK": "1"}
    dst = tmp_path / "pkl"
    for task in ("0", "1"):
        array = {"SLURM_ARRAY_TASK_ID": task, "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_COUNT": "2"}
        proc = subprocess.run(
            ["bash", script, str(dataset / "k.csv"), str(dataset / "src"), str(dst)],
            env={**env, **array},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 1 and f"shard {int(task) + 1}/2:" in proc.stdout  # some clips fail
    proc = subprocess.run(["bash", script, "--merge", str(dst), "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 1 and "merge_shards: 2 shards" in proc.stdout
    assert len((tmp_path / "pkl.list").read_text().splitlines()) == 10
