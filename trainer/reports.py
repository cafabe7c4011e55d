"""Tables a user opens (pandas): timelines and their smoothed segments, predictions, per-class reports
(precision, recall, support, confusion pairs) as CSV and Markdown, and the comparison of runs."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pandas as pd

from common.files import write_atomic
from common.log import get_logger

log = get_logger(__name__)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return (z / z.sum(axis=-1, keepdims=True)).astype(np.float32)


def _write_csv(df: pd.DataFrame, path: str) -> None:
    write_atomic(path, df.to_csv(index=False, float_format="%.6g").encode())


def markdown(df: pd.DataFrame, floats: str = "{:.4f}") -> str:
    """A GitHub Markdown table of ``df`` (pandas' to_markdown needs tabulate, which this project does not use)."""

    def cell(v) -> str:
        if isinstance(v, (float, np.floating)):
            return "" if np.isnan(v) else floats.format(v)
        return str(v).replace("|", "\\|")

    head = "| " + " | ".join(map(str, df.columns)) + " |"
    rule = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, rule, *rows]) + "\n"


# ------------------------------------------------------------------------------------------ timelines


def timeline_table(tl, top_k: int) -> pd.DataFrame:
    """One row per window: start and end in seconds, then the top-k classes and their probabilities."""
    probs = np.stack(tl.probs)
    k = min(top_k, probs.shape[1])
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    cols = {"window": np.arange(len(tl)), "start_s": tl.starts, "end_s": tl.ends}
    for r in range(k):
        cols[f"class_{r + 1}"] = [tl.names[i] for i in top[:, r]]
        cols[f"score_{r + 1}"] = probs[np.arange(len(tl)), top[:, r]]
    if tl.latency is not None:
        cols["latency_s"] = tl.latency
    return pd.DataFrame(cols)


def segments_table(tl, min_length: float | None = None) -> pd.DataFrame:
    """Consecutive windows with the same top-1 class merged into segments that tile the video (a window
    owns the time from the midpoint with its predecessor's centre to the one with its successor's);
    segments shorter than ``min_length`` seconds (default: one window) are absorbed by the neighbour
    whose class scores higher over them, until none is left or one segment remains."""
    probs = np.stack(tl.probs)
    starts, ends = np.array(tl.starts), np.array(tl.ends)
    centres = (starts + ends) / 2
    cuts = np.concatenate([[starts[0]], (centres[1:] + centres[:-1]) / 2, [ends[-1]]])
    if min_length is None:
        min_length = float(np.median(ends - starts))
    top1 = probs.argmax(axis=1)
    segs = []  # [first window, last window, class]
    for j, c in enumerate(top1):
        if segs and segs[-1][2] == c:
            segs[-1][1] = j
        else:
            segs.append([j, j, int(c)])

    def length(s):
        return cuts[s[1] + 1] - cuts[s[0]]

    while len(segs) > 1:
        short = [i for i, s in enumerate(segs) if length(s) < min_length - 1e-9]
        if not short:
            break
        i = min(short, key=lambda i: length(segs[i]))
        s = segs[i]
        span = probs[s[0] : s[1] + 1]
        neighbours = [n for n in (i - 1, i + 1) if 0 <= n < len(segs)]
        n = max(neighbours, key=lambda n: span[:, segs[n][2]].mean())
        segs[n] = [min(s[0], segs[n][0]), max(s[1], segs[n][1]), segs[n][2]]
        del segs[i]
        merged = []  # neighbours that now share a class become one
        for s in segs:
            if merged and merged[-1][2] == s[2]:
                merged[-1][1] = s[1]
            else:
                merged.append(s)
        segs = merged
    return pd.DataFrame(
        {
            "start_s": [cuts[a] for a, _, _ in segs],
            "end_s": [cuts[b + 1] for _, b, _ in segs],
            "class": [tl.names[c] for _, _, c in segs],
            "mean_score": [float(probs[a : b + 1, c].mean()) for a, b, c in segs],
            "windows": [b - a + 1 for a, b, _ in segs],
        }
    )


def write_timeline(tl, out_dir: str, top_k: int, min_length: float | None = None) -> list[str]:
    """timeline.csv, segments.csv, timeline.json and timeline.png in ``out_dir``; returns their paths."""
    table, segs = timeline_table(tl, top_k), segments_table(tl, min_length)
    paths = [os.path.join(out_dir, n) for n in ("timeline.csv", "segments.csv", "timeline.json", "timeline.png")]
    _write_csv(table, paths[0])
    _write_csv(segs, paths[1])
    k = (len(table.columns) - 3 - (tl.latency is not None)) // 2
    doc = {
        "source": tl.source,
        "fps": tl.fps,
        "window": tl.window,
        "stride": tl.stride,
        "windows": [
            {
                "start_s": round(float(r.start_s), 4),
                "end_s": round(float(r.end_s), 4),
                "top": [[getattr(r, f"class_{i}"), round(float(getattr(r, f"score_{i}")), 6)] for i in range(1, k + 1)],
                **({"latency_s": round(float(r.latency_s), 4)} if tl.latency is not None else {}),
            }
            for r in table.itertuples(index=False)
        ],
        "segments": json.loads(segs.to_json(orient="records", double_precision=6)),
    }
    write_atomic(paths[2], json.dumps(doc, indent=1).encode())
    plot_timeline(tl, segs, paths[3])
    return paths


def plot_timeline(tl, segs: pd.DataFrame, png_path: str, curves: int = 5) -> None:
    """A label strip (the smoothed segments) over the probability curves of the classes that lead most."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    probs = np.stack(tl.probs)
    centres = (np.array(tl.starts) + np.array(tl.ends)) / 2
    lead = pd.Series(probs.argmax(axis=1)).value_counts().index.tolist()
    rest = [int(c) for c in np.argsort(-probs.mean(axis=0)) if c not in lead]
    shown = (lead + rest)[: min(curves, probs.shape[1])]
    colours = {c: plt.cm.tab10(i % 10) for i, c in enumerate(shown)}
    fig, (strip, ax) = plt.subplots(
        2, 1, figsize=(10, 3.6), sharex=True, gridspec_kw={"height_ratios": [1, 4]}, layout="constrained"
    )
    name_to_class = {n: i for i, n in enumerate(tl.names)}
    for r in segs.itertuples(index=False):
        c = name_to_class[r[2]]
        strip.axvspan(r.start_s, r.end_s, color=colours.get(c, (0.7, 0.7, 0.7, 1)), alpha=0.85)
        if r.end_s - r.start_s > 0.06 * (tl.ends[-1] - tl.starts[0]):
            strip.text((r.start_s + r.end_s) / 2, 0.5, r[2], ha="center", va="center", fontsize=8, clip_on=True)
    strip.set_yticks([])
    strip.set_title(f"{os.path.basename(str(tl.source))}: window {tl.window}, stride {tl.stride}", fontsize=9)
    for c in shown:
        ax.plot(
            centres, probs[:, c], "-", marker="." if len(centres) < 60 else None, color=colours[c], label=tl.names[c]
        )
    ax.set_ylim(0, 1)
    ax.set_xlim(tl.starts[0], tl.ends[-1])
    ax.set_xlabel("time (s)")
    ax.set_ylabel("probability")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right", ncols=min(len(shown), 5))
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=80)
    plt.close(fig)
    write_atomic(png_path, png.getvalue())


# ------------------------------------------------------------------------------------------ predictions


def class_report(true: np.ndarray, pred: np.ndarray, names: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per-class precision, recall, F1, support; the confusion pairs true -> predicted with counts,
    commonest first) of top-1 predictions against labels."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    n = len(names)
    confusion = np.zeros((n, n), np.int64)
    np.add.at(confusion, (true, pred), 1)
    tp = np.diag(confusion).astype(float)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(predicted > 0, tp / predicted, np.nan)
        recall = np.where(support > 0, tp / support, np.nan)
        f1 = 2 * precision * recall / (precision + recall)
    per_class = pd.DataFrame(
        {"class": names, "precision": precision, "recall": recall, "f1": f1, "support": support, "predicted": predicted}
    )
    t, p = np.nonzero(confusion * (1 - np.eye(n, dtype=np.int64)))
    pairs = pd.DataFrame(
        {"true": [names[i] for i in t], "predicted": [names[j] for j in p], "count": confusion[t, p]}
    ).sort_values(["count", "true", "predicted"], ascending=[False, True, True], ignore_index=True)
    return per_class, pairs


def write_class_report(true, pred, names: list[str], prefix: str) -> list[str]:
    """PREFIX.per_class.csv, PREFIX.confusion_pairs.csv and PREFIX.report.md; returns their paths."""
    per_class, pairs = class_report(true, pred, names)
    paths = [f"{prefix}.per_class.csv", f"{prefix}.confusion_pairs.csv", f"{prefix}.report.md"]
    _write_csv(per_class, paths[0])
    _write_csv(pairs, paths[1])
    accuracy = float(np.mean(np.asarray(true) == np.asarray(pred))) if len(true) else float("nan")
    md = io.StringIO()
    md.write(f"# Per-class report\n\n{len(true)} labelled videos, top-1 accuracy {accuracy:.4f}.\n\n")
    md.write(markdown(per_class))
    md.write("\n## Confusion pairs (true -> predicted)\n\n")
    md.write(markdown(pairs) if len(pairs) else "none\n")
    write_atomic(paths[2], md.getvalue().encode())
    return paths


# ------------------------------------------------------------------------------------------ runs


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


class CompareError(ValueError):
    """An output folder that holds no run; the message names it."""


def run_row(out_dir: str) -> tuple[dict, dict]:
    """(final metrics, flattened config) of one training run's OUTPUT_DIR, from metrics.jsonl and config.yaml."""
    import yaml

    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise CompareError(f"{path} does not exist; give output folders of training runs")
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a crash
    val = [r for r in records if r.get("mode") == "val"]
    summary = next((r for r in reversed(records) if r.get("mode") == "summary"), None)
    best = max(val, key=lambda r: r.get("top1", -1), default={})
    epochs = max((r.get("epoch", 0) for r in records if r.get("mode") in ("train", "val")), default=0)
    times = [r["time"] for r in records if "time" in r]
    row = {
        "run": out_dir,
        "best_top1": best.get("top1"),
        "top5": best.get("top5"),
        "best_epoch": best.get("epoch"),
        "epochs": epochs,
        "wall_s": summary["wall_s"] if summary else (times[-1] - times[0] if times else None),
        "data_wait_share": summary.get("data_wait_share") if summary else None,
        "finished": summary is not None,
    }
    cfg_path = os.path.join(out_dir, "config.yaml")
    config = {}
    if os.path.isfile(cfg_path):
        with open(cfg_path, encoding="utf-8") as f:
            config = _flatten(yaml.safe_load(f) or {})
    return row, config


def compare_runs(out_dirs: list[str], sort: str = "best_top1") -> pd.DataFrame:
    """One row per run: its final metrics, then the config keys whose values differ between the runs."""
    rows, configs = zip(*(run_row(d) for d in out_dirs))
    table = pd.DataFrame(list(rows))
    cfgs = pd.DataFrame(list(configs))
    cfgs = cfgs.drop(columns=[c for c in ("output_dir",) if c in cfgs.columns])
    differing = [c for c in cfgs.columns if cfgs[c].astype(str).nunique(dropna=False) > 1]
    table = pd.concat([table, cfgs[differing]], axis=1)
    if sort not in table.columns:
        raise CompareError(f"--sort {sort}: no such column; choose one of {', '.join(table.columns)}")
    return table.sort_values(
        sort, ascending=sort in ("wall_s", "data_wait_share"), na_position="last", ignore_index=True
    )


def compare_main(argv: list[str]) -> int:
    """``python trainer/main.py compare OUTPUT_DIR... [--sort COLUMN] [--csv FILE] [--markdown FILE]``."""
    import argparse

    p = argparse.ArgumentParser(prog="main.py compare", description="one table of several training runs")
    p.add_argument("runs", nargs="+", metavar="OUTPUT_DIR", help="the output_dir of each training run compared")
    p.add_argument("--sort", default="best_top1", help="column to sort by (default best_top1, best first)")
    p.add_argument("--csv", help="also write the table to this CSV file")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    args = p.parse_args(argv)
    try:
        table = compare_runs(args.runs, args.sort)
    except CompareError as e:
        log.error(f"compare: error: {e}")
        return 1
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))  # the table asked for
    for path, text in ((args.csv, table.to_csv(index=False)), (args.markdown, markdown(table))):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            write_atomic(path, text.encode())
    return 0
