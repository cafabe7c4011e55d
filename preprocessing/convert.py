"""The conversion driver shared by video2pkl.py (pkl clips) and vid2img.py (rawframe folders).

NPROC worker processes each run one ffmpeg at a time. Every output is written under a temporary name
and renamed when complete, so a rerun skips finished clips and never trusts a half-written one.
SIGINT / SIGTERM stop the workers and their ffmpeg children at once; a SIGKILL'd run leaves no
orphans either (children die with their parents on Linux).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shutil
import signal
import time

from clipdata.pkl import write_pkl
from common import log as logs
from common.files import NO_SPACE, OutputError, check_writable, write_atomic
from common.processes import fork_context, worker_init
from common.runlock import BusyError
from common.usage import UsageError

from . import shards
from .frames import ConversionError, extract_jpegs
from .kinetics import find_clip, load_class_index, read_csv
from .progress import progress

TMP_PREFIX = ".tmp-"
EXIT_OK, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

log = logs.get_logger(__name__)


def build_parser(prog: str, doc: str, output: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, description=doc.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=doc
    )
    p.add_argument("csv", help="Kinetics CSV: label,youtube_id,time_start,time_end,split")
    p.add_argument("src_dir", help="folder of the videos (flat, or one sub-folder per label)")
    p.add_argument("dst_dir", help=f"folder for the {output} (created)")
    p.add_argument("nproc", type=int, nargs="?", default=os.cpu_count(), help="parallel ffmpeg processes")
    p.add_argument(
        "--label-file",
        help="'index name' lines (preprocessing/generate_label.py); default: the classes of this CSV, sorted",
    )
    p.add_argument("--list-out", help="list file to write (default: DST_DIR.list)")
    p.add_argument("--failures", help="failed clips, one 'id<TAB>reason' a line (default: DST_DIR.failures.txt)")
    p.add_argument(
        "--jpeg-quality", type=int, default=4, metavar="Q", help="ffmpeg -q:v of the JPEGs, 2 (best) .. 31 (default 4)"
    )
    p.add_argument("--short-side", type=int, metavar="N", help="resize so the short side is N pixels (default: keep)")
    p.add_argument("--fps", type=float, metavar="N", help="resample to N frames/s (default: native rate)")
    p.add_argument(
        "--shard",
        metavar="I/N",
        help="convert only this host's part I of N (preprocessing/shards.py); then merge_shards.py LIST N",
    )
    p.add_argument(
        "--allow-decode-errors",
        action="store_true",
        help="keep clips whose decoding reported errors (default: record them as failed)",
    )
    return p


class Writer:
    """Where a clip's output goes, how it is written atomically, and how its list line reads."""

    def __init__(self, fmt: str, dst_dir: str, list_dir: str):
        self.fmt, self.dst_dir, self.list_dir = fmt, dst_dir, list_dir

    def path(self, video_id: str) -> str:
        return os.path.join(self.dst_dir, video_id + (".pkl" if self.fmt == "pkl" else ""))

    def complete_frames(self, video_id: str) -> int | None:
        """Frame count of a finished output (0 for pkl, whose count the list does not need), else None."""
        path = self.path(video_id)
        if not os.path.exists(path):
            return None
        if self.fmt == "pkl":
            return 0
        return sum(1 for name in os.listdir(path) if name.startswith("img_"))

    def write(self, video_id: str, label: int, frames: list[bytes]) -> None:
        if self.fmt == "pkl":
            write_pkl(self.path(video_id), video_id, label, frames)
            return
        tmp = os.path.join(self.dst_dir, f"{TMP_PREFIX}{video_id}-{os.getpid()}")
        os.makedirs(tmp)
        try:
            for i, data in enumerate(frames, 1):
                with open(os.path.join(tmp, f"img_{i:05d}.jpg"), "wb") as f:
                    f.write(data)
            os.rename(tmp, self.path(video_id))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def list_line(self, video_id: str, num_frames: int, label: int) -> str:
        rel = os.path.relpath(self.path(video_id), self.list_dir)
        return rel if self.fmt == "pkl" else f"{rel} {num_frames} {label}"

    def remove_stale_temporaries(self, video_ids: set[str] | None = None) -> int:
        """Outputs a killed run left half-written: all of them, or those of ``video_ids`` (a shard's:
        the other shards' are being written right now)."""
        stale = [
            n
            for n in os.listdir(self.dst_dir)
            if n.startswith(TMP_PREFIX) and (video_ids is None or self._temporary_of(n) in video_ids)
        ]
        for name in stale:
            path = os.path.join(self.dst_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
        return len(stale)

    def _temporary_of(self, name: str) -> str:
        """The clip a temporary name belongs to: pkl ``.tmp-XXXXXXXX<id>.pkl`` (formats.write_atomic's
        8 random characters), rawframes ``.tmp-<id>-<pid>``."""
        rest = name[len(TMP_PREFIX) :]
        if self.fmt == "pkl":
            return rest[8:-4] if rest.endswith(".pkl") else ""
        return rest.rsplit("-", 1)[0]


def _convert(job):
    """Worker: one clip. Returns (video_id, label, frame count or None, error or None, errno or None)."""
    writer, video_id, src, label, opts = job
    try:
        if os.path.getsize(src) == 0:
            raise ConversionError("empty file (0 bytes)")
        frames = extract_jpegs(src, **opts)
        writer.write(video_id, label, frames)
        return video_id, label, len(frames), None, None
    except ConversionError as e:
        return video_id, label, None, str(e), None
    except OSError as e:
        return video_id, label, None, str(e), e.errno


def _settings(args) -> str:
    """What makes two runs' outputs differ: the shards of one data set must agree on it."""
    labels = os.path.abspath(args.label_file) if args.label_file else "the CSV's classes"
    return (
        f"labels {labels}, jpeg quality {args.jpeg_quality}, short side {args.short_side}, fps {args.fps}, "
        f"decode errors {'allowed' if args.allow_decode_errors else 'refused'}"
    )


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def run(argv, prog: str, doc: str, fmt: str) -> int:
    logs.setup()  # the entry point of video2pkl.py and vid2img.py
    args = build_parser(prog, doc, "pkl files" if fmt == "pkl" else "rawframe folders").parse_args(argv)
    dst_dir = os.path.abspath(args.dst_dir)
    list_out = os.path.abspath(args.list_out or dst_dir + ".list")
    failures_out = args.failures or dst_dir + ".failures.txt"
    try:
        if args.nproc < 1:
            raise UsageError(f"NPROC must be >= 1, got {args.nproc}")
        if not 2 <= args.jpeg_quality <= 31:
            raise UsageError(f"--jpeg-quality must be in 2..31, got {args.jpeg_quality}")
        if args.short_side is not None and args.short_side < 2:
            raise UsageError(f"--short-side must be a number of pixels >= 2, got {args.short_side}")
        if args.fps is not None and not 0 < args.fps < math.inf:
            raise UsageError(f"--fps must be a number of frames per second > 0, got {args.fps}")
        clips, failures = read_csv(args.csv)
        if not os.path.isdir(args.src_dir):
            raise UsageError(f"SRC_DIR {args.src_dir} is not a folder")
        if args.label_file:
            class_index = load_class_index(args.label_file)
        else:
            class_index = {name: i for i, name in enumerate(sorted({c.label for c in clips}))}
            log.info(
                f"{prog}: no --label-file: {len(class_index)} classes taken from {args.csv} "
                "(pass the training label file when converting a val/test CSV)"
            )
        shard = shards.parse_shard(args.shard)
        clips, failures = shards.clips_of(shard, clips, failures)
        check_writable(dst_dir, "DST_DIR")
        for path, what in ((list_out, "the list's folder"), (failures_out, "the failures file's folder")):
            check_writable(os.path.dirname(os.path.abspath(path)), what)
        locks = shards.lock(dst_dir, prog, shard)  # a second run into DST_DIR (or of this shard) stops here
        if shard:  # until this run writes it anew, the merge must not take an earlier run's part for it
            shards.remove_part(list_out, shard)
    except (UsageError, BusyError, OutputError) as e:
        log.error(f"{prog}: error: {e}")
        return EXIT_USAGE
    try:
        run = _Run(args, prog, fmt, dst_dir, list_out, failures_out, shard)
        return _convert_clips(run, clips, failures, class_index)
    finally:
        for held in reversed(locks):
            held.release()


@dataclasses.dataclass(frozen=True)
class _Run:
    """One conversion's settings and outputs, as the steps after the checks read them."""

    args: argparse.Namespace
    prog: str
    fmt: str
    dst_dir: str
    list_out: str
    failures_out: str
    shard: shards.Shard | None


@dataclasses.dataclass
class _Tally:
    """What the workers did: the figures of the closing summary, and why the run stopped early, if it did."""

    converted: int = 0
    processed: int = 0
    frames: int = 0
    interrupted: bool = False
    no_space: str | None = None


def _convert_clips(run: _Run, clips, failures, class_index) -> int:
    """The conversion once the arguments, the outputs and the locks are checked; returns the exit status."""
    writer = Writer(run.fmt, run.dst_dir, os.path.dirname(run.list_out))
    mine = {c.video_id for c in clips} if run.shard else None
    stale = writer.remove_stale_temporaries(mine)
    jobs, lines = _plan(run.args, writer, clips, failures, class_index)
    skipped = len(lines)
    t0 = time.time()
    tally = _run_workers(run, writer, jobs, lines, failures, t0)
    writer.remove_stale_temporaries(mine)  # what the stopped workers left half-written
    try:
        written = _write_outputs(run, lines, failures, complete=not (tally.interrupted or tally.no_space))
    except OSError as e:
        if e.errno not in NO_SPACE:
            raise
        log.error(
            f"{run.prog}: cannot write the list or the failures file ({e.strerror}): free space and run the same "
            "command again; it finds the finished clips and writes them"
        )
        return EXIT_FAILURES
    _summarize(run, tally, time.time() - t0, lines, failures, skipped, stale, written)
    return _exit_status(run.prog, tally, len(lines), len(jobs), failures)


def _plan(args, writer: Writer, clips, failures, class_index) -> tuple[list, dict]:
    """The workers' jobs, and the list lines of the clips an earlier run finished; the clips that cannot
    be converted (a duplicate row, an unknown label, no video) go to ``failures``."""
    opts = dict(
        qscale=args.jpeg_quality, short_side=args.short_side, fps=args.fps, allow_decode_errors=args.allow_decode_errors
    )
    jobs, lines, seen = [], {}, set()
    for c in clips:
        if c.video_id in seen:
            failures.append((c.video_id, f"duplicate CSV row (line {c.row})"))
            continue
        seen.add(c.video_id)
        if c.label not in class_index:
            failures.append((c.video_id, f"label '{c.label}' is not in the label file"))
            continue
        label = class_index[c.label]
        n = writer.complete_frames(c.video_id)
        if n is not None:
            lines[c.video_id] = writer.list_line(c.video_id, n, label)
            continue
        src = find_clip(args.src_dir, c)
        if src is None:
            failures.append((c.video_id, f"video file not found under {args.src_dir}"))
            continue
        jobs.append((writer, c.video_id, src, label, opts))
    return jobs, lines


def _run_workers(run: _Run, writer: Writer, jobs, lines, failures, t0: float) -> _Tally:
    """Convert ``jobs`` in NPROC workers, adding to ``lines`` and ``failures``; a full disk stops the run
    (every clip after it would fail the same way), and so do SIGINT and SIGTERM."""
    tally = _Tally()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    pool = fork_context().Pool(run.args.nproc, initializer=worker_init)
    try:
        with progress(len(jobs), run.prog) as bar:
            for video_id, label, frames, error, code in pool.imap_unordered(_convert, jobs, chunksize=1):
                if code in NO_SPACE:  # every clip after it would fail the same way: stop, keep what is done
                    tally.no_space = error
                    break
                tally.processed += 1
                if error:
                    failures.append((video_id, error))
                else:
                    tally.converted += 1
                    tally.frames += frames
                    lines[video_id] = writer.list_line(video_id, frames, label)
                bar.set_postfix(
                    failed=len(failures), fps=f"{tally.frames / max(time.time() - t0, 1e-9):.0f}", refresh=False
                )
                bar.update()
        if tally.no_space:
            pool.terminate()
        else:
            pool.close()
    except KeyboardInterrupt:
        tally.interrupted = True
        pool.terminate()  # workers die at once; their ffmpeg children die with them
    finally:
        pool.join()
        signal.signal(signal.SIGTERM, previous)
    return tally


def _write_outputs(run: _Run, lines, failures, complete: bool) -> str | None:
    """The list and the failures file, or under --shard this shard's part (merge_shards.py writes the
    list and the failures file); returns the part's path."""
    if not run.shard:
        write_atomic(run.list_out, "".join(lines[v] + "\n" for v in sorted(lines)).encode())
        write_atomic(run.failures_out, "".join(f"{vid}\t{why}\n" for vid, why in sorted(failures)).encode())
        return None
    return shards.write_part(
        run.list_out,
        run.shard,
        tool=run.prog,
        source=f"{os.path.abspath(run.args.csv)} -> {run.dst_dir} ({_settings(run.args)})",
        lines=[(v, line) for v, line in lines.items()],
        failures_file=run.failures_out,
        failures=[(vid, f"{vid}\t{why}") for vid, why in failures],
        complete=complete,
    )


def _summarize(run: _Run, tally: _Tally, elapsed: float, lines, failures, skipped: int, stale: int, written) -> None:
    shard, list_out = run.shard, run.list_out
    log.info(
        f"{run.prog}: {f'shard {shard}: ' if shard else ''}{len(lines)} clips ready ({skipped} already done, "
        f"{tally.converted} converted, {tally.frames} frames in {elapsed:.1f}s = "
        f"{tally.frames / max(elapsed, 1e-9):.0f} frames/s), {len(failures)} failed; "
        + (
            f"part: {written} (when every shard is done: python preprocessing/merge_shards.py {list_out} "
            f"{shard.count} --dst-dir {run.dst_dir})"
            if shard
            else f"list: {list_out}" + (f"; failures: {run.failures_out}" if failures else "")
        )
        + (f"; removed {stale} half-written output(s) of an earlier run" if stale else "")
    )


def _exit_status(prog: str, tally: _Tally, ready: int, jobs: int, failures) -> int:
    """The exit status, with what a full disk or an interruption left to do."""
    if tally.no_space:
        log.error(
            f"{prog}: stopped early: {tally.no_space}. The {ready} finished clips are kept and listed; free space "
            f"and run the same command again to convert the remaining {jobs - tally.processed}"
        )
        return EXIT_FAILURES
    if tally.interrupted:
        log.warning(
            f"{prog}: interrupted; run the same command again to convert the remaining {jobs - tally.processed} clip(s)"
        )
        return EXIT_INTERRUPTED
    return EXIT_FAILURES if failures else EXIT_OK
