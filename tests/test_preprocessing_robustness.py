"""Interruptions and broken inputs at scale: what a multi-hour Kinetics conversion must survive."""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from clipdata.pkl import read_pkl
from preprocessing import vid2img, video2pkl
from preprocessing.frames import ffmpeg_exe
from tools.media import ffmpeg, has_bframes, index_frames, remux, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADER = "label,youtube_id,time_start,time_end,split\n"


def _ffmpeg_frame_count(path):
    """Frames ffmpeg itself decodes (edit lists applied), for comparison."""
    out = subprocess.run(
        [ffmpeg_exe(), "-nostdin", "-i", str(path), "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "null", "-"],
        capture_output=True,
        text=True,
    ).stderr
    return int(out.rsplit("frame=", 1)[1].split()[0])


def test_frame_count_matches_ffmpeg_for_bframes_and_an_edit_list(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    write_video(src / "full0000000_000000_000010.mp4", index_frames(50))
    # a stream copy cut at a non-key frame: the mp4 gets an edit list hiding the decoded pre-roll
    remux(src / "full0000000_000000_000010.mp4", src / "edit0000000_000000_000010.mp4", "-ss", "0.7")
    assert has_bframes(src / "edit0000000_000000_000010.mp4")
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "a,full0000000,0,10,train\na,edit0000000,0,10,train\n")
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "out"), "2"]) == 0
    for vid in ("full0000000", "edit0000000"):
        _, _, frames = read_pkl(str(tmp_path / "out" / f"{vid}_000000_000010.pkl"))
        assert len(frames) == _ffmpeg_frame_count(src / f"{vid}_000000_000010.mp4")
    assert len(read_pkl(str(tmp_path / "out" / "edit0000000_000000_000010.pkl"))[2]) < 50


def _truncated_and_undecodable(src):
    """A truncated mp4 (moov first, half the data gone) and one whose every frame is garbage."""
    full = src / "full.mp4"
    noise = np.random.default_rng(0).integers(0, 255, (40, 120, 160, 3), dtype=np.uint8)
    write_video(full, noise)  # every frame costs bytes, so a truncated file keeps a decodable prefix
    ffmpeg("-i", full, "-c", "copy", "-movflags", "+faststart", src / "fs.mp4")
    data = (src / "fs.mp4").read_bytes()
    (src / "trunc000000_000000_000010.mp4").write_bytes(data[: len(data) * 2 // 3])
    data = bytearray(full.read_bytes())
    mdat = data.index(b"mdat") + 4
    moov = data.index(b"moov") - 4
    data[mdat:moov] = bytes(moov - mdat)  # keep the container, zero every coded frame
    (src / "zeroframes0_000000_000010.mp4").write_bytes(bytes(data))


def test_truncated_and_zero_frame_videos_are_recorded_not_converted(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _truncated_and_undecodable(src)
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "a,trunc000000,0,10,train\na,zeroframes0,0,10,train\n")
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "out"), "1"]) == 1
    failures = dict(line.split("\t") for line in (tmp_path / "out.failures.txt").read_text().splitlines())
    assert set(failures) == {"trunc000000_000000_000010", "zeroframes0_000000_000010"}
    assert all(why.startswith(("ffmpeg failed", "no decodable frames")) for why in failures.values())
    assert os.listdir(tmp_path / "out") == []
    # a user who prefers the decodable part of a truncated clip can ask for it
    assert video2pkl.main([str(csv), str(src), str(tmp_path / "out2"), "1", "--allow-decode-errors"]) == 1
    assert os.listdir(tmp_path / "out2") == ["trunc000000_000000_000010.pkl"]


def test_vid2img_writes_rawframe_folders_and_a_rawframes_list(tmp_path):
    src = tmp_path / "src" / "b"
    src.mkdir(parents=True)
    write_video(src / "clip0000000_000001_000011.mp4", index_frames(17))
    csv = tmp_path / "k.csv"
    csv.write_text(HEADER + "a,other000000,0,10,train\nb,clip0000000,1,11,train\n")
    labels = tmp_path / "l.txt"
    labels.write_text("0 a\n1 b\n")
    args = [str(csv), str(tmp_path / "src"), str(tmp_path / "frames"), "1", "--label-file", str(labels)]
    assert vid2img.main(args) == 1  # other000000 is missing
    folder = tmp_path / "frames" / "clip0000000_000001_000011"
    assert sorted(os.listdir(folder)) == [f"img_{i:05d}.jpg" for i in range(1, 18)]
    assert (tmp_path / "frames.list").read_text() == "frames/clip0000000_000001_000011 17 1\n"
    assert vid2img.main(args) == 1  # rerun: the folder counts as done and is listed again
    assert (tmp_path / "frames.list").read_text() == "frames/clip0000000_000001_000011 17 1\n"


@pytest.fixture(scope="module")
def slow_clips(tmp_path_factory):
    """Eight names for one noisy 480x360 clip that takes ffmpeg about a second or two to convert."""
    root = tmp_path_factory.mktemp("slow")
    src = root / "src"
    src.mkdir()
    base = np.random.default_rng(0).integers(0, 255, (8, 360, 480, 3), dtype=np.uint8)
    write_video(src / "slow.mp4", np.stack([base[i % 8] for i in range(240)]))
    rows = []
    for i in range(8):
        os.symlink(src / "slow.mp4", src / f"slow{i:07d}_000000_000010.mp4")
        rows.append(f"a,slow{i:07d},0,10,train\n")
    (root / "k.csv").write_text(HEADER + "".join(rows))
    return root


def _processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(pid))
            except OSError:
                pass
    return found


def _start(slow_clips, out):
    cmd = [
        sys.executable,
        os.path.join(ROOT, "preprocessing", "video2pkl.py"),
        str(slow_clips / "k.csv"),
        str(slow_clips / "src"),
        str(out),
        "2",
    ]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_first_output(out, proc, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if out.is_dir() and any(n.endswith(".pkl") and not n.startswith(".") for n in os.listdir(out)):
            return
        time.sleep(0.05)
    raise AssertionError("no clip was converted in time")


def _complete_outputs_load(out):
    names = [n for n in os.listdir(out) if n.endswith(".pkl") and not n.startswith(".")]
    for n in names:
        assert len(read_pkl(str(out / n))[2]) == 240
    return names


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_leaves_no_orphans_no_trusted_partial_file_and_resumes(slow_clips, tmp_path, sig):
    out = tmp_path / "out"
    proc = _start(slow_clips, out)
    _wait_for_first_output(out, proc)
    os.kill(proc.pid, sig)
    proc.wait(timeout=10)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in proc.stderr.read()
    deadline = time.time() + 5  # workers and their ffmpeg children are gone within a few seconds
    while _processes_mentioning(str(out)) and time.time() < deadline:
        time.sleep(0.1)
    assert _processes_mentioning(str(out)) == []
    done_before = _complete_outputs_load(out)
    assert 1 <= len(done_before) < 8
    # the rerun converts only the rest and cleans up what the killed run left half-written
    mtimes = {n: os.stat(out / n).st_mtime_ns for n in done_before}
    rerun = _start(slow_clips, out)
    stdout, _ = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, stdout
    assert f"{len(done_before)} already done" in stdout
    assert sorted(_complete_outputs_load(out)) == sorted(f"slow{i:07d}_000000_000010.pkl" for i in range(8))
    assert all(os.stat(out / n).st_mtime_ns == t for n, t in mtimes.items())
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]
    assert len((tmp_path / "out.list").read_text().split()) == 8


@pytest.fixture
def small_disk(tmp_path):
    """A 96 KiB tmpfs (root only), unmounted afterwards even when the test fails."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_a_full_disk_stops_the_conversion_early_keeps_what_is_done_and_the_rerun_finishes(tmp_path, small_disk, capsys):
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):  # noise frames: each pkl is tens of KiB, so a few fill the disk
        write_video(src / f"vid{i:08d}_000000_000010.mp4", rng.integers(0, 255, (8, 96, 128, 3), dtype=np.uint8))
        rows.append(f"a,vid{i:08d},0,10,train\n")
    (tmp_path / "k.csv").write_text(HEADER + "".join(rows))
    out = small_disk / "pkl"
    argv = [str(tmp_path / "k.csv"), str(src), str(out), "1", "--list-out", str(tmp_path / "pkl.list")]
    argv += ["--failures", str(tmp_path / "failures.txt")]
    assert video2pkl.main(argv) == 1
    err = capsys.readouterr().err
    assert "stopped early: " in err and "No space left on device" in err and "run the same command again" in err
    done = sorted(os.listdir(out))
    assert 0 < len(done) < 16 and not [n for n in done if n.startswith(".tmp-")]
    for name in done:  # what is kept is whole
        assert len(read_pkl(str(out / name))[2]) == 8
    assert (tmp_path / "pkl.list").read_text().split() == [f"disk/pkl/{n}" for n in done]
    assert (tmp_path / "failures.txt").read_text() == ""  # the clips it did not get to are not failures
    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    assert video2pkl.main(argv) == 0
    assert len(os.listdir(out)) == 16


def test_an_unwritable_list_folder_is_a_usage_error_before_any_work(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "k.csv").write_text(HEADER + "a,vid00000001,0,10,train\n")
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)]).returncode:
        pytest.skip("needs root for a read-only bind mount")
    try:
        argv = [str(tmp_path / "k.csv"), str(tmp_path / "src"), str(tmp_path / "out"), "1"]
        assert video2pkl.main([*argv, "--list-out", str(ro / "x.list")]) == 2
        err = capsys.readouterr().err
        assert f"the list's folder {ro} is not writable (Read-only file system" in err
        assert not os.listdir(tmp_path / "out")  # nothing converted
    finally:
        subprocess.run(["umount", str(ro)])
