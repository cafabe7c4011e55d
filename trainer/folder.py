"""Many videos (a folder, or a list file) scored with the loader's host-side workers: unreadable files
are skipped and listed, a rerun resumes from the output, a labelled list gets a per-class report
(docs/inference.md "Folders and lists")."""

from __future__ import annotations

import csv
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from clipdata.errors import DataFormatError
from clipdata.lists import Sample, text_lines
from common.files import write_atomic
from common.log import get_logger
from common.processes import default_num_workers
from dali_pipelines.feed import sample_pool

from . import clip_scorer, reports

VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".flv", ".mpg", ".mpeg", ".ts", ".mts", ".m2ts",
    ".wmv", ".3gp", ".ogv", ".vob", ".h264", ".264", ".hevc", ".y4m",
)  # fmt: skip
HEADER = ["video", "rank", "class", "probability"]
REPORT_SUFFIXES = (".per_class.csv", ".confusion_pairs.csv", ".report.md")  # reports.write_class_report

log = get_logger(__name__)


@dataclass(frozen=True)
class Inputs:
    videos: list[str]
    labels: list[int] | None  # per video, from a labelled list
    not_videos: list[str]  # files of a folder without a video's extension


def folder_inputs(folder: str, output: str | None = None) -> Inputs:
    """The videos under ``folder`` (recursively, sorted; hidden files and ``output`` with the reports
    written beside it left out), and its other files, which are listed as skipped."""
    videos, others = [], []
    excluded = set()
    if output:
        out = os.path.abspath(output)
        excluded = {out, f"{out}.skipped.csv"} | {f"{os.path.splitext(out)[0]}{x}" for x in REPORT_SUFFIXES}
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = os.path.join(root, name)
            if name.startswith(".") or os.path.abspath(path) in excluded:
                continue
            (videos if name.lower().endswith(VIDEO_EXTENSIONS) else others).append(path)
    if not videos:
        raise DataFormatError(
            f"folder {folder} holds no videos (files ending {', '.join(VIDEO_EXTENSIONS[:6])}, ...)"
            + (f"; it holds {len(others)} other file(s)" if others else "")
        )
    return Inputs(videos, None, others)


def list_inputs(list_file: str) -> Inputs:
    """The videos of a list file (``path``, ``path label`` or ``path num_frames label`` lines; paths may
    hold spaces; relative ones resolve against the list's folder); labels when every line has one."""
    base = os.path.dirname(os.path.abspath(list_file))
    videos, labels = [], []
    for line in map(str.strip, text_lines(list_file)):
        if not line or line.startswith("#"):
            continue
        path, label = line, None
        for _ in range(2):
            parts = path.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].isascii() and parts[1].isdigit():
                path, label = parts[0], int(parts[1]) if label is None else label
        videos.append(path if os.path.isabs(path) or os.path.exists(path) else os.path.join(base, path))
        labels.append(label)
    if not videos:
        raise DataFormatError(f"list file {list_file} lists no videos; write one video path a line")
    return Inputs(videos, labels if all(v is not None for v in labels) else None, [])


def done_videos(output: str) -> dict[str, list[tuple[str, float]]]:
    """Videos an earlier run already wrote to ``output`` (all their ranks), with their top classes; the
    file is rewritten without a last video cut short by a stop, so that appending continues it."""
    if not os.path.isfile(output):
        return {}
    rows: dict[str, list[tuple[int, str, float]]] = {}
    with open(output, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        if next(reader, None) != HEADER:
            raise DataFormatError(
                f"{output} exists but is not a predictions CSV ({','.join(HEADER)}); give another --output"
            )
        for row in reader:
            if len(row) != 4 or not row[1].isdigit():
                continue
            try:
                rows.setdefault(row[0], []).append((int(row[1]), row[2], float(row[3])))
            except ValueError:
                continue
    k = max((len(r) for r in rows.values()), default=0)
    done = {
        v: [(c, p) for _, c, p in sorted(r)]
        for v, r in rows.items()
        if sorted(i for i, _, _ in r) == list(range(1, k + 1))
    }
    if len(done) != len(rows):  # rewrite the complete videos only
        lines = [HEADER] + [[v, i, c, f"{p:.6f}"] for v, top in done.items() for i, (c, p) in enumerate(top, 1)]
        write_atomic(output, _csv_text(lines).encode())
    return done


def _csv_text(rows) -> str:
    import io

    buf = io.StringIO()
    csv.writer(buf).writerows(rows)
    return buf.getvalue()


def _decoded(
    spec, paths: list[str], todo: list[int], skipped: list, *, num_workers: int, ahead: int, timeout: float, seed: int
):
    """(position, sampled frames) of each readable video, in order, decoded (and probed) in workers."""
    feed = sample_pool(spec, num_workers, ahead=ahead, timeout=timeout)
    try:
        k = 0
        while k < len(todo) or feed.in_flight:
            want = feed.want()
            if want and k < len(todo):
                items = [
                    (Sample(os.path.abspath(paths[i]), i, 0, i + 1), (seed, 0, 0, i), None) for i in todo[k : k + want]
                ]
                feed.submit(items)
                k += len(items)
            (s, _, _), (status, value) = feed.next()
            if status == "ok":
                yield s.label, value[0][0]
            else:
                skipped.append((paths[s.label], value))
    finally:
        feed.close()


def run_folder(cfg, scorer, names: list[str], inputs: Inputs, output: str | None, top_k: int) -> dict:
    """Score every video of ``inputs``; with ``output``, append to it (resuming: videos already there are
    not redone), list the unreadable ones in OUTPUT.skipped.csv and, for a labelled list, write the
    per-class report beside it. Without ``output`` the predictions are printed. Returns the counts."""
    from tqdm import tqdm

    spec = clip_scorer.clip_spec(cfg)
    videos = inputs.videos
    _check_labels(inputs.labels, names)
    done, todo = _resume(videos, output)
    workers = default_num_workers() if cfg.DATASET.num_workers is None else cfg.DATASET.num_workers
    skipped: list[tuple[str, str]] = [(p, "not a video file (by its extension)") for p in inputs.not_videos]
    started, scored = time.monotonic(), 0
    out, writer = _open_output(output) if output else (None, None)
    bar = tqdm(total=len(todo), unit="file", file=sys.stderr, dynamic_ncols=True, disable=not output)
    try:
        clips = _decoded(
            spec,
            videos,
            todo,
            skipped,
            num_workers=workers,
            ahead=2 * cfg.DATASET.batch_size,
            timeout=cfg.DATASET.worker_timeout,
            seed=cfg.seed,
        )
        results = clip_scorer.score_clips(spec, scorer, clips, batch_size=cfg.DATASET.batch_size, prefetch=2)
        for i, logits in results if todo else ():  # nothing left: no graph, no workers
            p = reports.softmax(logits)
            top = [(names[c], float(p[c])) for c in np.argsort(-p, kind="stable")[: min(top_k, len(names))]]
            done[videos[i]] = top
            scored += 1
            if out is not None:
                writer.writerows([videos[i], r, c, f"{q:.6f}"] for r, (c, q) in enumerate(top, 1))
                out.flush()
                bar.update(1)
            else:  # no OUTPUT: the predictions themselves, on stdout as predict.print_predictions writes them
                print(f"{videos[i]}:")
                for r, (c, q) in enumerate(top, 1):
                    print(f"  {r}. {c:<30s} {q:.4f}")
    finally:
        bar.close()
        if out is not None:
            out.close()
    took = time.monotonic() - started
    result = {"videos": len(videos), "scored": scored, "skipped": len(skipped), "seconds": took, "workers": workers}
    log.info(
        f"predict: {scored} video(s) scored in {took:.1f}s ({scored / max(took, 1e-9):.2f} files/s, "
        f"{workers} decode worker(s))" + (f" -> {output}" if output else "")
    )
    if skipped:
        _report_skipped(skipped, output)
    if output and inputs.labels is not None:
        result["top1"] = _class_report(inputs, names, done, output)
    return result


def _resume(videos: list[str], output: str | None) -> tuple[dict, list[int]]:
    """The predictions already in OUTPUT (an earlier run's), and the positions of the videos still to score."""
    done = done_videos(output) if output else {}
    todo = [i for i, v in enumerate(videos) if v not in done]
    if done:
        log.info(
            f"predict: {len(videos) - len(todo)} of {len(videos)} video(s) are already in {output}; "
            f"scoring the other {len(todo)}"
        )
    return done, todo


def _check_labels(labels: list[int] | None, names: list[str]) -> None:
    bad = sorted({t for t in labels or [] if not 0 <= t < len(names)})
    if bad:
        raise DataFormatError(
            f"labels {bad[:5]} of the input list are outside [0, {len(names)}); check the list against the label file"
        )


def _open_output(output: str):
    """OUTPUT opened to append to, and its CSV writer; a new file starts with the header."""
    new = not os.path.isfile(output)
    out = open(output, "a", newline="", encoding="utf-8")
    writer = csv.writer(out)
    if new:
        writer.writerow(HEADER)
    return out, writer


def _report_skipped(skipped: list[tuple[str, str]], output: str | None) -> None:
    """Name the first ten skipped files; with ``output``, list them all in OUTPUT.skipped.csv."""
    for path, why in skipped[:10]:
        log.warning(f"predict: skipped {path}: {why}")
    if len(skipped) > 10:
        log.warning(f"predict: ... and {len(skipped) - 10} more skipped")
    if output:
        listing = f"{output}.skipped.csv"
        write_atomic(listing, _csv_text([["video", "reason"], *skipped]).encode())
        log.info(f"predict: {len(skipped)} file(s) skipped, listed in {listing}")


def _class_report(inputs: Inputs, names: list[str], done: dict, output: str) -> float:
    """The per-class report of a labelled list beside OUTPUT, over every video in it; returns the top-1."""
    by_name = {n: c for c, n in enumerate(names)}
    videos = inputs.videos
    pairs = [(inputs.labels[i], by_name[done[v][0][0]]) for i, v in enumerate(videos) if v in done]
    true, pred = np.array([t for t, _ in pairs], np.int64), np.array([q for _, q in pairs], np.int64)
    paths = reports.write_class_report(true, pred, names, os.path.splitext(output)[0])
    top1 = float(np.mean(true == pred)) if len(true) else float("nan")
    log.info(f"predict: top-1 {top1:.4f} on {len(true)} labelled video(s); per-class report: {', '.join(paths)}")
    return top1
