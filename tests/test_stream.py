"""Live sources (trainer/stream.py): streams this test serves itself on 127.0.0.1 or through a FIFO, never
another address; every wait is bounded."""

import os
import signal
import socket
import subprocess
import threading
import time

import numpy as np
import pytest

from tools.media import ffmpeg
from trainer import main, stream
from trainer.predict import dynamic_scorer
from trainer.timeline import Span

from .tiny import tiny_model

NAMES = [f"class{i}" for i in range(5)]


pytestmark = pytest.mark.usefixtures("no_parent_link")


@pytest.fixture(scope="module")
def ts_file(tmp_path_factory):
    """4 s of 25 fps H.264 in MPEG-TS, a keyframe every 10 frames."""
    path = tmp_path_factory.mktemp("ts") / "live.ts"
    ffmpeg(
        "-f",
        "lavfi",
        "-i",
        "testsrc=size=64x48:rate=25",
        "-t",
        "4",
        "-c:v",
        "libx264",
        "-g",
        "10",
        "-f",
        "mpegts",
        path,
    )
    return path


@pytest.fixture
def model(tmp_path):
    cfg, net = tiny_model(tmp_path)
    cfg.PIPELINE.update(target_size=32, short_size=40, test_num_segments=3)
    return cfg, dynamic_scorer(net)


def _serve_fifo(fifo, data: bytes, *, rate: float | None = None, hold: float = 0.0, start: float = 0.0):
    """Write ``data`` into the FIFO from a thread: ``rate`` bytes/s (None: at once), then keep it open
    ``hold`` seconds (a stalled sender) before closing."""

    def run():
        time.sleep(start)
        fd = os.open(fifo, os.O_WRONLY)
        try:
            step = 4096
            for i in range(0, len(data), step):
                os.write(fd, data[i : i + step])
                if rate:
                    time.sleep(step / rate)
            time.sleep(hold)
        except BrokenPipeError:
            pass
        finally:
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _fifo(tmp_path):
    path = str(tmp_path / "live.fifo")
    os.mkfifo(path)
    return path


def test_live_sources_are_recognised(tmp_path):
    assert stream.is_live("-") and stream.is_live("udp://127.0.0.1:5000") and stream.is_live("RTSP://127.0.0.1/x")
    assert stream.is_live(_fifo(tmp_path))
    (tmp_path / "v.mp4").write_bytes(b"")
    assert not stream.is_live(str(tmp_path / "v.mp4")) and not stream.is_live(str(tmp_path / "nope.mp4"))


def test_live_windows_sample_the_frames_of_each_window(cfg):
    from trainer import clip_scorer

    cfg.PIPELINE.update(test_num_segments=4)
    w = stream.LiveWindows(clip_scorer.clip_spec(cfg), window=20, stride=10)
    assert w.rel.tolist() == [2, 7, 12, 17]
    sampled = [n for n in range(45) if w.sampled(n)]
    assert sampled == sorted({j * 10 + r for j in range(4) for r in (2, 7, 12, 17) if j * 10 + r < 45})
    assert [w.ending(n) for n in (18, 19, 29, 39)] == [None, 0, 1, 2]


def test_the_ring_drops_the_oldest_frames_when_full_and_counts_them():
    ring = stream.Ring(capacity=3)
    for n in range(5):
        ring.put((n, np.zeros(1), 0.0))
    ring.put((4, None, 0.0, 0))  # window markers are never dropped
    ring.close()
    stop = threading.Event()
    got = []
    while (item := ring.get(stop)) is not None:
        got.append(item[0])
    assert ring.dropped == 2 and got == [2, 3, 4, 4]


def test_a_fifo_stream_prints_a_line_per_window_and_writes_the_timeline(ts_file, tmp_path, model):
    cfg, scorer = model
    fifo = _fifo(tmp_path)
    _serve_fifo(fifo, ts_file.read_bytes(), rate=ts_file.stat().st_size / 4)  # 4 s of stream in about 4 s
    lines = []
    paths, tl, stats = stream.run_stream(
        cfg, scorer, NAMES, fifo, Span(1.0, "s"), Span(0.5, "s"), str(tmp_path / "out"), 3, timeout=20,
        print_line=lines.append,
    )  # fmt: skip
    assert stats["reason"] == "the stream ended" and stats["frames"] == 100 and stats["fps"] == 25
    # windows of 25 frames every 12 over 100 frames; on a loaded machine some may be skipped, never lost
    assert len(lines) == len(tl) and len(tl) + stats["skipped_windows"] == 7 and len(tl) >= 4
    assert lines[0].split()[0] == "0.00-1.00s" and "latency" in lines[0]
    assert all(0 <= x < 10 for x in tl.latency)
    assert [os.path.basename(p) for p in paths] == ["timeline.csv", "segments.csv", "timeline.json", "timeline.png"]
    import pandas as pd

    assert list(pd.read_csv(paths[0]).columns)[-1] == "latency_s"


@pytest.mark.slow
def test_a_udp_stream_on_the_loopback_address(ts_file, tmp_path, model):
    cfg, scorer = model
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # a free port on 127.0.0.1 only
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    from preprocessing.frames import ffmpeg_exe

    cmd = [ffmpeg_exe(), "-nostdin", "-loglevel", "error", "-re", "-i", str(ts_file), "-c", "copy", "-f", "mpegts"]
    sender = subprocess.Popen([*cmd, f"udp://127.0.0.1:{port}?pkt_size=1316"])
    try:
        lines = []
        paths, tl, stats = stream.run_stream(
            cfg, scorer, NAMES, f"udp://127.0.0.1:{port}", Span(10, "f"), Span(10, "f"), str(tmp_path / "out"), 2,
            timeout=3, print_line=lines.append,
        )  # fmt: skip
    finally:
        sender.kill()
        sender.wait(timeout=10)
    # UDP has no end: the sender stopping reads as a stall, named, with the windows so far kept
    assert "sent nothing for 3s" in str(stats["error"]) and stats["reason"] == "stopped early"
    assert len(tl) >= 3 and len(lines) == len(tl) and os.path.isfile(paths[0])


def test_a_source_that_never_sends_is_one_line_after_the_timeout(tmp_path, predict_argv, capsys):
    fifo = _fifo(tmp_path)
    t0 = time.monotonic()
    assert (
        main.main([*predict_argv, "--input", fifo, "--window", "1s", "--timeout", "1", "--output", str(tmp_path / "o")])
        == 1
    )
    assert time.monotonic() - t0 < 30
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"predict: error: {fifo}: sent nothing for 1s"]
    assert not os.path.exists(tmp_path / "o" / "timeline.csv")


def test_a_stalled_source_keeps_the_timeline_so_far(ts_file, tmp_path, model):
    cfg, scorer = model
    fifo = _fifo(tmp_path)
    data = ts_file.read_bytes()
    # half the stream in real time, then silence with the FIFO open
    _serve_fifo(fifo, data[: len(data) // 2], rate=len(data) / 4, hold=6)
    _, tl, stats = stream.run_stream(
        cfg, scorer, NAMES, fifo, Span(10, "f"), Span(10, "f"), str(tmp_path / "out"), 2, timeout=1.5,
        print_line=lambda line: None,
    )  # fmt: skip
    assert isinstance(stats["error"], stream.StreamError) and str(stats["error"]).endswith(
        "live.fifo: stalled for 1.5s"
    )
    import pandas as pd

    assert len(pd.read_csv(tmp_path / "out" / "timeline.csv")) == len(tl) >= 1
    assert len(tl) + stats["skipped_windows"] >= 3  # about 2 s of frames came: 5 windows of 10


@pytest.mark.slow  # 5-9 s: a real export through paddle2onnx, or a stream run in real time
def test_sigterm_ends_a_stream_cleanly_with_the_timeline_so_far(ts_file, tmp_path, model):
    cfg, scorer = model
    fifo = _fifo(tmp_path)
    _serve_fifo(fifo, ts_file.read_bytes(), rate=ts_file.stat().st_size / 10)  # 10 s: still sending at the stop
    timer = threading.Timer(6.0, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    try:
        paths, tl, stats = stream.run_stream(
            cfg, scorer, NAMES, fifo, Span(10, "f"), Span(10, "f"), str(tmp_path / "out"), 2, timeout=10,
            print_line=lambda line: None,
        )  # fmt: skip
    finally:
        timer.cancel()
    assert stats["reason"] == "stopped by SIGTERM" and "error" not in stats
    assert 1 <= len(tl) < 10 and os.path.isfile(paths[0])
    assert signal.getsignal(signal.SIGTERM) is not None  # the handlers were put back


@pytest.mark.slow  # 5-9 s: a real export through paddle2onnx, or a stream run in real time
def test_max_seconds_ends_the_stream(ts_file, tmp_path, model):
    cfg, scorer = model
    fifo = _fifo(tmp_path)
    _serve_fifo(fifo, ts_file.read_bytes(), rate=ts_file.stat().st_size / 10)
    t0 = time.monotonic()
    _, tl, stats = stream.run_stream(
        cfg, scorer, NAMES, fifo, Span(10, "f"), Span(10, "f"), str(tmp_path / "out"), 2, max_seconds=2,
        timeout=10, print_line=lambda line: None,
    )  # fmt: skip
    assert stats["reason"] == "--max-seconds 2 reached" and time.monotonic() - t0 < 15 and len(tl) < 10


def test_a_model_slower_than_the_stream_drops_frames_and_says_so(ts_file, tmp_path, model):
    cfg, scorer = model

    def slow(imgs):
        time.sleep(0.25)
        return scorer(imgs)

    fifo = _fifo(tmp_path)
    _serve_fifo(fifo, ts_file.read_bytes())  # all at once: frames arrive far faster than 4 windows/s
    lines = []
    _, tl, stats = stream.run_stream(
        cfg, slow, NAMES, fifo, Span(5, "f"), Span(5, "f"), str(tmp_path / "out"), 2, timeout=10,
        print_line=lines.append,
    )  # fmt: skip
    assert stats["dropped_frames"] > 0 and stats["skipped_windows"] > 0
    assert any(line.endswith("the model is slower than the stream") for line in lines)
    assert len(tl) + stats["skipped_windows"] <= 20


@pytest.mark.parametrize("url", ["rtsp://127.0.0.1:1/live", "http://127.0.0.1:1/live.m3u8"])
def test_an_unreachable_address_is_one_line(url, tmp_path, predict_argv, capsys):
    assert main.main([*predict_argv, "--input", url, "--timeout", "3", "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"predict: error: {url}: cannot open the stream (Connection refused)"]


@pytest.mark.slow
def test_a_pipe_on_standard_input_is_a_live_source(ts_file, tmp_path, predict_argv):
    import sys

    from .tiny import ROOT

    cmd = [sys.executable, os.path.join(ROOT, "trainer", "main.py"), *predict_argv, "-o", "PIPELINE.short_size=40"]
    cmd += ["--input", "-", "--window", "1s", "--stride", "1s", "--output", str(tmp_path / "out"), "--timeout", "20"]
    proc = subprocess.run(cmd, input=ts_file.read_bytes(), capture_output=True, timeout=300)
    out = proc.stdout.decode()
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert [line.split()[0] for line in out.splitlines()[:4]] == [
        "0.00-1.00s",
        "1.00-2.00s",
        "2.00-3.00s",
        "3.00-4.00s",
    ]
    assert "predict: the stream ended: 4 window(s) of 25 frames from 100 frames at 25 fps" in out
    assert (tmp_path / "out" / "timeline.json").is_file()


@pytest.mark.slow
def test_an_hls_playlist_over_http_on_the_loopback_address(ts_file, tmp_path, model):
    import functools
    import http.server

    cfg, scorer = model
    hls = tmp_path / "hls"
    hls.mkdir()
    ffmpeg("-i", ts_file, "-c", "copy", "-f", "hls", "-hls_time", "1", "-hls_list_size", "0", hls / "index.m3u8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(hls))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # the loopback address only
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/index.m3u8"
        lines = []
        paths, tl, stats = stream.run_stream(
            cfg, scorer, NAMES, url, Span(1.0, "s"), Span(1.0, "s"), str(tmp_path / "out"), 2, timeout=10,
            print_line=lines.append,
        )  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    assert stats["reason"] == "the stream ended" and stats["frames"] == 100
    assert len(tl) + stats["skipped_windows"] == 4 and len(lines) == len(tl) and os.path.isfile(paths[0])
