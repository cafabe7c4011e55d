"""Write the label file of a Kinetics CSV: its classes sorted, one 'index name' a line.

    python preprocessing/generate_label.py kinetics-400_train.csv kinetics400_label.txt

Class names with spaces are written with underscores ("air drumming" -> "air_drumming") so that every
line splits into exactly two fields.
"""

from __future__ import annotations

import argparse
import sys

from common import log as logs
from common.usage import UsageError
from preprocessing.kinetics import read_csv, write_label_file

log = logs.get_logger("preprocessing.generate_label")  # by name: run by path, __name__ is "__main__"


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv", help="Kinetics CSV with a 'label' column")
    p.add_argument("label_file", help="output: 'index name' lines")
    args = p.parse_args(argv)
    try:
        clips, bad = read_csv(args.csv)
    except UsageError as e:
        log.error(f"generate_label: error: {e}")
        return 2
    classes = sorted({c.label for c in clips})
    if not classes:
        log.error(f"generate_label: error: {args.csv} has no valid rows")
        return 2
    write_label_file(args.label_file, classes)
    for where, why in bad:
        log.warning(f"generate_label: skipped {where}: {why}")
    log.info(f"generate_label: {len(classes)} classes -> {args.label_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
