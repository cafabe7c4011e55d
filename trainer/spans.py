"""Lengths of windows and strides on a video: seconds (``10s``) or frames (``250``); a pure module that
the command line reads without loading the decoders or pandas."""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """A window or stride length: seconds ("10s", "2.5s") or frames ("250", "250f")."""

    value: float
    unit: str  # "s" | "f"

    def frames(self, fps: float) -> int:
        return int(self.value) if self.unit == "f" else max(1, int(round(self.value * fps)))

    def __str__(self) -> str:
        return f"{self.value:g}s" if self.unit == "s" else f"{int(self.value)} frames"


def parse_span(text: str) -> Span:
    """``--window`` / ``--stride``: a positive number of seconds (``10s``) or of frames (``250``, ``250f``)."""
    t = text.strip().lower()
    unit = "s" if t.endswith("s") else "f"
    number = t[:-1] if t[-1:] in ("s", "f") else t
    try:
        value = float(number) if unit == "s" else int(number)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(
            f"expected seconds > 0 (e.g. 10s) or a number of frames >= 1 (e.g. 250), got {text!r}"
        )
    return Span(value, unit)
