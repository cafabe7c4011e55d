"""Progress bars for long preprocessing work: live on a terminal, a line every 30 s in a log."""

import sys


def progress(total: int, desc: str, unit: str = "clip", initial: int = 0):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit=unit, desc=desc, mininterval=0.2 if sys.stderr.isatty() else 30)
