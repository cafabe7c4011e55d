"""common/exits.py: which rank's end caused a job's failure, and whether a restart can help (no processes)."""

import io
import json
import os
import signal

import pytest

from common import exits


def _job(tmp_path, ranks=None, records=(), states=None, first=None):
    """A log folder as a failed attempt leaves it: the launcher's view {rank: (exit, time)} and the ranks'
    own records (rank, kind, message[, collective])."""
    if ranks is not None:
        seen = {str(r): {"pid": 100 + r, "exit": code, "time": t} for r, (code, t) in ranks.items()}
        failures = [t for code, t in ranks.values() if code]
        (tmp_path / "launcher.json").write_text(
            json.dumps(
                {
                    "first_failure": first if first is not None else min(failures, default=None),
                    "ranks": seen,
                    "states": {str(r): s for r, s in (states or {}).items()},
                }
            )
        )
    for rank, kind, message, *collective in records:
        code = 2 if kind in ("config", "usage") else 1  # as trainer/main.py exits
        record = {"rank": rank, "pid": 100 + rank, "kind": kind, "message": message, "exit": code, "time": 0.0}
        if collective:
            record["collective"] = collective[0]
        (tmp_path / f"exit.{rank}.json").write_text(json.dumps(record))
    out = io.StringIO()
    status = exits.report(str(tmp_path), out)
    return status, out.getvalue()


GLOO_RESET = "RuntimeError: [gloo/transport/tcp/pair.cc:576] Read error [127.0.0.1]:19867: Connection reset by peer"


def test_the_rank_killed_first_is_the_cause_not_the_peer_that_lost_it(tmp_path):
    # the peer's error is seen a tick before the killed rank's end: the kill is still the cause
    status, out = _job(tmp_path, {0: (1, 10.00), 1: (-9, 10.05)}, [(0, "crash", GLOO_RESET, True)])
    assert out.splitlines()[0] == "rank 1 (pid 101): signal: killed by SIGKILL"
    assert out.splitlines()[1].startswith("  then rank 0 (pid 100): crash: RuntimeError: [gloo")
    assert status == 0  # a crash: a restart may help


def test_an_abort_inside_the_communication_library_is_not_the_cause(tmp_path):
    status, out = _job(tmp_path, {0: (-signal.SIGABRT, 10.0), 1: (-signal.SIGKILL, 10.0)})
    assert out.startswith("rank 1 (pid 101): signal: killed by SIGKILL")


def test_a_stopped_rank_is_named_as_the_one_the_others_waited_for(tmp_path):
    timeout = "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:80] TIMEOUT self_rank = none"
    status, out = _job(tmp_path, {0: (1, 40.0), 1: (-9, 43.1)}, [(0, "crash", timeout, True)], states={1: "T"})
    assert out.startswith("rank 1 (pid 101): stuck: was stopped (SIGSTOP")
    assert status == 0


def test_a_rank_in_uninterruptible_io_is_named(tmp_path):
    status, out = _job(tmp_path, {0: (-6, 40.0), 1: (-9, 43.1)}, states={1: "D"})
    assert out.startswith("rank 1 (pid 101): stuck: was stuck in uninterruptible I/O")


def test_a_rank_passing_through_io_as_another_fails_on_its_own_is_not_the_cause(tmp_path):
    status, out = _job(tmp_path, {0: (2, 5.0), 1: (-15, 5.3)}, [(0, "config", "config error: x")], states={1: "D"})
    assert status == 3 and out.startswith("rank 0 (pid 100): config: config error: x")


def test_the_launchers_own_kill_seconds_later_is_not_a_cause(tmp_path):
    # rank 0 fails on a file; rank 1, busy in C++, ignores SIGTERM and is killed 3 s later by the launcher
    status, out = _job(tmp_path, {0: (1, 10.0), 1: (-9, 13.2)}, [(0, "data", "train: error: x.pkl hangs")])
    assert out.startswith("rank 0 (pid 100): data: train: error: x.pkl hangs")
    assert status == 3 and "a restart would fail the same way" in out


@pytest.mark.parametrize("kind", exits.NOT_RESTARTABLE)
def test_an_error_that_is_not_a_crash_is_not_restartable(tmp_path, kind):
    status, out = _job(tmp_path, {0: (2, 5.0), 1: (2, 5.0)}, [(0, kind, "m"), (1, kind, "m")])
    assert status == 3 and out.startswith(f"rank 0 (pid 100): {kind}: m")


def test_a_crash_of_our_own_is_restartable_and_outranks_the_peers_abort(tmp_path):
    status, out = _job(tmp_path, {0: (-6, 5.0), 1: (1, 5.2)}, [(1, "crash", "ZeroDivisionError: division by zero")])
    assert status == 0 and out.startswith("rank 1 (pid 101): crash: ZeroDivisionError")


def test_the_ranks_own_records_suffice_when_the_launcher_wrote_none(tmp_path):
    status, out = _job(tmp_path, None, [(1, "config", "config error: epochs = 0 (-o epochs=0): must be >= 1")])
    assert status == 3 and out.startswith("rank 1 (pid 101): config: config error: epochs = 0")


def test_no_record_at_all_says_so(tmp_path):
    status, out = _job(tmp_path)
    assert status == 1 and "no rank left a record" in out


def test_a_rank_writes_its_record_into_the_exit_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(exits.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "3")
    exits.write_record("crash", "Traceback...\nRuntimeError: [gloo] TIMEOUT", 1)
    record = json.loads((tmp_path / "exit.3.json").read_text())
    assert record["rank"] == 3 and record["pid"] == os.getpid() and record["kind"] == "crash"
    assert record["message"] == "RuntimeError: [gloo] TIMEOUT" and record["collective"] is True
    path, content = exits.record_bytes("crash", "rank 3: the ranks' rendezvous did not complete", -9)
    assert path == str(tmp_path / "exit.3.json") and json.loads(content)["message"].startswith("rank 3: the ranks'")
    exits.clear(str(tmp_path))
    assert not list(tmp_path.iterdir())


def test_without_an_exit_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(exits.EXIT_DIR_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    exits.write_record("config", "config error: x", 2)
    assert exits.record_bytes("config", "x", 2) == ("", b"")
    assert not list(tmp_path.iterdir())


class _Proc:
    def __init__(self, pid, codes):
        self.pid, self._codes = pid, list(codes)

    def poll(self):
        return self._codes.pop(0) if len(self._codes) > 1 else self._codes[0]


def test_the_watcher_notes_each_end_and_what_the_others_did_at_the_first_failure(tmp_path):
    procs = {0: _Proc(os.getpid(), [None, 1]), 1: _Proc(os.getpid(), [None])}  # rank 1 still running
    w = exits.Watcher(lambda: list(procs.items()))
    w.poll()
    assert w.ends == {} and w.first_failure is None
    w.poll()
    assert w.ends[0]["exit"] == 1 and w.first_failure == w.ends[0]["time"]
    assert w.states == {1: "R"}  # this very process, running
    w.write(str(tmp_path))
    written = json.loads((tmp_path / "launcher.json").read_text())
    assert written["ranks"]["0"]["exit"] == 1 and written["states"] == {"1": "R"}


def test_the_jobs_exit_status_is_its_causes(tmp_path):
    _job(tmp_path, {0: (-15, 5.0), 1: (2, 5.0)}, [(0, "config", "m"), (1, "config", "m")])
    assert exits.exit_status(str(tmp_path)) == 2  # not Paddle's 241 for the rank it stopped
    exits.clear(str(tmp_path))
    _job(tmp_path, {0: (1, 10.0), 1: (-9, 10.05)}, [(0, "crash", GLOO_RESET, True)])
    assert exits.exit_status(str(tmp_path)) == 137


def _note(tmp_path, rank, files, pid=None, t=1.0):
    note = {"rank": rank, "pid": 100 + rank if pid is None else pid, "files": files, "time": t}
    (tmp_path / f"reading.{rank}.json").write_text(json.dumps(note))


def test_a_stopped_rank_is_named_with_the_files_its_loader_was_reading(tmp_path):
    _note(tmp_path, 1, [f"/data/v{i}.pkl" for i in range(10)], t=39.0)
    _note(tmp_path, 0, ["/data/other.pkl"], t=39.5)  # the rank that waited: not named with its files
    timeout = "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:80] TIMEOUT self_rank = none"
    status, out = _job(tmp_path, {0: (1, 40.0), 1: (-9, 43.1)}, [(0, "crash", timeout, True)], states={1: "T"})
    first = out.splitlines()[0]
    assert first.startswith("rank 1 (pid 101): stuck: was stopped (SIGSTOP")
    assert first.endswith(
        "; its loader was reading /data/v0.pkl, /data/v1.pkl, /data/v2.pkl, /data/v3.pkl, "
        "/data/v4.pkl, /data/v5.pkl, /data/v6.pkl, /data/v7.pkl (and 2 more)"
    )
    assert "other.pkl" not in out


def test_a_rank_in_uninterruptible_io_is_named_with_its_file(tmp_path):
    _note(tmp_path, 1, ["/mnt/hung/v3.pkl"], t=12.0)
    status, out = _job(tmp_path, {0: (-6, 40.0), 1: (-9, 43.1)}, states={1: "D"})
    assert out.splitlines()[0].endswith("the others waited for it; its loader was reading /mnt/hung/v3.pkl")


@pytest.mark.parametrize("pid, t", [(999, 39.0), (None, 41.0)], ids=["another process", "after the first failure"])
def test_a_note_of_another_process_or_of_later_reads_names_no_file(tmp_path, pid, t):
    _note(tmp_path, 1, ["/data/v1.pkl"], pid=pid, t=t)
    status, out = _job(tmp_path, {0: (-6, 40.0), 1: (-9, 43.1)}, states={1: "T"})
    assert out.startswith("rank 1 (pid 101): stuck: was stopped") and "v1.pkl" not in out


def test_a_rank_notes_its_files_whole_and_only_when_they_change(tmp_path, monkeypatch):
    monkeypatch.setenv(exits.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "2")
    note = exits.ReadingNote()
    note(["/data/a_long_name.pkl", "/data/b_long_name.pkl"])
    path = tmp_path / "reading.2.json"
    written = json.loads(path.read_text())
    assert written["files"] == ["/data/a_long_name.pkl", "/data/b_long_name.pkl"]
    assert written["pid"] == os.getpid() and written["rank"] == 2
    path.write_text("{}")
    note(["/data/a_long_name.pkl", "/data/b_long_name.pkl"])  # the same files: nothing written
    assert path.read_text() == "{}"
    note(["/data/a_long_name.pkl", "/data/b_long_name.pkl", "/data/c.pkl"])
    note(["c.pkl"])  # shorter than the note it overwrites in place: still one whole note
    assert json.loads(path.read_text())["files"] == ["c.pkl"]
    assert [p.name for p in tmp_path.iterdir()] == ["reading.2.json"]
    exits.clear(str(tmp_path))
    assert not list(tmp_path.iterdir())
    monkeypatch.delenv(exits.EXIT_DIR_ENV)
    exits.ReadingNote()(["d.pkl"])  # outside run_dist.sh: nothing
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- the ranks' logged events (common/log.py)


def test_a_rank_logs_as_it_printed_and_keeps_its_warnings_as_events(tmp_path, monkeypatch, capsys):
    from common import log as logs

    monkeypatch.setenv(exits.EXIT_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("PADDLE_TRAINER_ID", "1")
    monkeypatch.delenv(logs.FORMAT_ENV, raising=False)
    try:
        logs.setup()
        log = logs.get_logger("dali_pipelines.loader")
        log.info("train: epoch 1")
        log.warning("dali_pipelines: skipping a.pkl (list line 3): truncated")
        log.error("train: error: b.pkl: not a pkl file")
        captured = capsys.readouterr()
        assert captured.out == "train: epoch 1\n"  # the text and the stream a print had
        assert captured.err == (
            "dali_pipelines: skipping a.pkl (list line 3): truncated\ntrain: error: b.pkl: not a pkl file\n"
        )
        events = [json.loads(line) for line in (tmp_path / "events.1.jsonl").read_text().splitlines()]
        assert [(e["rank"], e["level"], e["logger"]) for e in events] == [
            (1, "WARNING", "dali_pipelines.loader"),
            (1, "ERROR", "dali_pipelines.loader"),
        ]
        logs.setup(fmt="rank %(rank)s: %(message)s")  # a second set-up replaces the first
        log.info("x")
        assert capsys.readouterr().out == "rank 1: x\n"
    finally:
        monkeypatch.delenv(exits.EXIT_DIR_ENV)
        logs.setup()


def test_without_records_the_ranks_last_warnings_and_errors_are_shown_under_their_logs(tmp_path):
    (tmp_path / "workerlog.0").write_text("")
    lines = [{"rank": 0, "message": f"dali_pipelines: skipping clip{i}.pkl"} for i in range(7)]
    (tmp_path / "events.0.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"cut')
    (tmp_path / "events.1.jsonl").write_text("")
    out = io.StringIO()
    assert exits.notes(str(tmp_path), out) == 0
    assert out.getvalue() == f"  rank 0 ({tmp_path / 'workerlog.0'}):\n" + "".join(
        f"    dali_pipelines: skipping clip{i}.pkl\n" for i in range(2, 7)
    )
    assert exits.notes(str(tmp_path / "none"), io.StringIO()) == 1
    exits.clear(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["workerlog.0"]


def test_a_rank_that_died_without_a_word_is_named_with_its_log(tmp_path):
    (tmp_path / "workerlog.1").write_text("Traceback ...\nModuleNotFoundError: No module named 'paddle'\n")
    status, out = _job(tmp_path, {0: (0, 1.0), 1: (1, 1.0)})
    assert status == 0
    log = tmp_path / "workerlog.1"
    assert out == f"rank 1 (pid 101): crash: exit status 1 without a message of its own (its log: {log})\n"
