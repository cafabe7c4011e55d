"""Accuracy counting and the metrics.jsonl log (docs/design.md "Observability")."""

from __future__ import annotations

import json
import os
import time

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    """Class probabilities of a [N, classes] array of logits."""
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def topk_correct(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k scores, for each k."""
    order = np.argsort(-scores, axis=1)
    hits = order == labels.reshape(-1, 1)
    return [int(hits[:, :k].any(axis=1).sum()) for k in ks]


class MetricsLog:
    """Appends one JSON object a line to OUTPUT_DIR/metrics.jsonl, and the same scalars to VisualDL
    (OUTPUT_DIR/vdl) when visualdl is installed; only the main rank writes."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled, self._vdl = enabled, None
        if enabled:
            os.makedirs(output_dir, exist_ok=True)
            try:
                from visualdl import LogWriter
            except ImportError:
                pass
            else:
                self._vdl = LogWriter(logdir=os.path.join(output_dir, "vdl"))

    def start_new(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.replace(self.path, self.path + ".prev")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._vdl is not None:
            for key, value in record.items():
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if numeric and key not in ("time", "epoch", "step"):
                    self._vdl.add_scalar(f"{record.get('mode', 'run')}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        if self._vdl is not None:
            self._vdl.close()
            self._vdl = None


def write_test_report(output_dir: str, prefix: str, result: dict, names: list[str]) -> list[str]:
    """Per-class accuracy and the confusion matrix as CSV (and the matrix as a PNG); returns the paths."""
    import csv

    confusion, per_class = result["confusion"], result["per_class_accuracy"]
    paths = [
        os.path.join(output_dir, f"{prefix}_per_class.csv"),
        os.path.join(output_dir, f"{prefix}_confusion.csv"),
        os.path.join(output_dir, f"{prefix}_confusion.png"),
    ]
    with open(paths[0], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["class", "samples", "correct", "accuracy"])
        for i, name in enumerate(names):
            w.writerow([name, int(confusion[i].sum()), int(confusion[i, i]), f"{per_class[i]:.4f}"])
    with open(paths[1], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted"] + names)
        for i, name in enumerate(names):
            w.writerow([name] + [int(v) for v in confusion[i]])
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(names)
    fig, ax = plt.subplots(figsize=(min(4 + 0.35 * n, 40), min(3.5 + 0.35 * n, 40)))
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    if n <= 40:
        ax.set_xticks(range(n), names, rotation=90)
        ax.set_yticks(range(n), names)
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        color="white" if rates[i, j] > 0.5 else "black",
                        fontsize=8,
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion ({int(confusion.sum())} clips, top-1 {result['top1']:.3f})")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(paths[2], dpi=80)
    plt.close(fig)
    return paths
