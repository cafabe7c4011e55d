"""What `predict --input` scores beyond one clip, and how: a long video as a timeline (--window), a live
source (pipe, FIFO, network address), a folder or a list of videos (docs/inference.md)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys

from common.log import get_logger

from .spans import Span, parse_span

log = get_logger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """predict's options for timelines, streams and folders (trainer/main.py parse_args)."""

    def seconds(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = -1
        if not v > 0:
            raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
        return v

    p.add_argument(
        "--window",
        type=parse_span,
        help="predict: score a long video or a live stream window by window, each this long: seconds (10s) "
        "or frames (250); writes timeline.csv/.json/.png and segments.csv into --output DIR",
    )
    p.add_argument(
        "--stride", type=parse_span, help="predict --window: start a window this often (default: half the window)"
    )
    p.add_argument(
        "--min-segment",
        type=seconds,
        help="predict --window: shortest segment of segments.csv in seconds (default: a window)",
    )
    p.add_argument("--max-seconds", type=seconds, help="predict on a live stream: stop after this many seconds")
    p.add_argument(
        "--timeout",
        type=seconds,
        default=10.0,
        help="predict on a live stream: seconds the source may send nothing before it counts as stalled (default 10)",
    )


def _timeline_dir(cfg, args, source: str) -> str:
    if args.output:
        return args.output
    if source == "-" or "://" in source:
        name = "stream-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    else:
        name = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    return os.path.join(cfg.output_dir, "timeline", name)


def dispatch(cfg, env, scorer, names: list[str], args) -> int | None:
    """Run predict on what ``args.input`` is, or None for one clip (trainer/predict.py as before)."""
    from common.files import check_writable

    from . import stream  # the decoders and pandas load only when predict runs

    source = args.input
    live = stream.is_live(source)
    if live or args.window is not None:
        window = args.window or Span(10.0, "s")
        stride = args.stride or Span(
            window.value / 2 if window.unit == "s" else max(1, int(window.value) // 2), window.unit
        )
        out_dir = _timeline_dir(cfg, args, source)
        if live:
            return _predict_live(cfg, scorer, names, args, window=window, stride=stride, out_dir=out_dir)
        return _predict_timeline(cfg, scorer, names, args, window=window, stride=stride, out_dir=out_dir)
    if os.path.isdir(source) or source.endswith((".txt", ".list")):
        return _predict_folder(cfg, scorer, names, args)
    if args.output:
        check_writable(os.path.dirname(os.path.abspath(args.output)), "the folder of --output")
    return None


def _predict_live(cfg, scorer, names: list[str], args, *, window: Span, stride: Span, out_dir: str) -> int:
    """A live source as a timeline, a line per window as it is scored, then the run's figures."""
    from . import stream

    paths, tl, stats = stream.run_stream(
        cfg,
        scorer,
        names,
        args.input,
        window,
        stride,
        out_dir,
        args.top_k,
        max_seconds=args.max_seconds,
        timeout=args.timeout,
        print_line=lambda line: print(line, flush=True),  # each window's prediction: the product, on stdout
    )
    lat = sorted(tl.latency or [0.0])
    median, p95 = lat[len(lat) // 2], lat[min(len(lat) - 1, int(0.95 * len(lat)))]
    log.info(
        f"predict: {stats['reason']}: {stats['windows']} window(s) of {stats['window_frames']} frames from "
        f"{stats['frames']} frames at {stats['fps']:g} fps in {stats['seconds']:.1f}s; latency median "
        f"{1000 * median:.0f} ms, p95 {1000 * p95:.0f} ms; "
        f"{stats['dropped_frames']} frame(s) dropped, {stats['skipped_windows']} window(s) skipped"
        + (" (the model is slower than the stream)" if stats["dropped_frames"] else "")
    )
    if paths:
        log.info(f"predict: timeline -> {', '.join(paths)}")
    if "error" in stats:
        raise stats["error"]
    return 0


def _predict_timeline(cfg, scorer, names: list[str], args, *, window: Span, stride: Span, out_dir: str) -> int:
    """One video file as a timeline of windows."""
    from . import timeline

    source = args.input
    if not os.path.isfile(source):
        raise FileNotFoundError(f"--input {source} is not a video file (--window scores one video)")
    paths, tl, stats = timeline.run_timeline(
        cfg,
        scorer,
        names,
        source,
        window=window,
        stride=stride,
        out_dir=out_dir,
        top_k=args.top_k,
        min_segment=args.min_segment,
    )
    log.info(
        f"predict: {len(tl)} window(s) of {window} every {stride} over {tl.ends[-1]:.1f}s; decoded "
        f"{stats.decoded} frame(s) once, at most {stats.held_max} held -> {', '.join(paths)}"
    )
    return 0


def _predict_folder(cfg, scorer, names: list[str], args) -> int:
    """Every video of a folder or a list file, checked before the work."""
    from common.files import check_writable

    from . import folder

    source = args.input
    if not os.path.exists(source):
        raise FileNotFoundError(f"--input {source} does not exist")
    if args.output:  # before the work, like every other output
        check_writable(os.path.dirname(os.path.abspath(args.output)), "the folder of --output")
    if os.path.isdir(source):
        inputs = folder.folder_inputs(source, args.output)
    else:
        inputs = folder.list_inputs(source)
        missing = [v for v in inputs.videos if not os.path.isfile(v)]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} video(s) of {source} do not exist: {', '.join(missing[:3])}"
                + (" ..." if len(missing) > 3 else "")
            )
    folder.run_folder(cfg, scorer, names, inputs, args.output, args.top_k)
    return 0


def is_compare(argv: list[str] | None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return bool(argv) and argv[0] == "compare"
