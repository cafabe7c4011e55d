"""Accuracy counting and the metrics.jsonl log (DESIGN §7)."""
from __future__ import annotations

import json
import os
import time

import numpy as np


def topk_correct(scores: np.ndarray, labels: np.ndarray, ks=(1, 5)) -> list[int]:
    """How many rows have their label among the top-k scores, for each k."""
    order = np.argsort(-scores, axis=1)
    hits = order == labels.reshape(-1, 1)
    return [int(hits[:, :k].any(axis=1).sum()) for k in ks]


class MetricsLog:
    """Appends one JSON object a line; only the main rank writes."""

    def __init__(self, output_dir: str, enabled: bool = True):
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self.enabled = enabled
        if enabled:
            os.makedirs(output_dir, exist_ok=True)

    def start_new(self) -> None:
        if self.enabled and os.path.exists(self.path):
            os.replace(self.path, self.path + ".prev")

    def write(self, **record) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **record}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
