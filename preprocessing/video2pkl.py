"""Convert the clips of a Kinetics CSV into pkl files of JPEG frames, NPROC ffmpeg processes at once.

    python preprocessing/video2pkl.py kinetics-400_train.csv SRC_DIR DST_DIR 8 --label-file labels.txt

Each clip becomes DST_DIR/<video_id>.pkl = (video_id, label_index, [jpeg_bytes, ...]) with every
decoded frame in order, and DST_DIR.list lists them. Outputs are written under a temporary name and
renamed, so a rerun (after Ctrl-C, a kill or a crash) skips finished clips and redoes the rest.
Missing, empty, truncated or undecodable videos, labels not in the label file and malformed CSV rows
are recorded in DST_DIR.failures.txt and the run goes on.
Exit status: 0 all clips converted or already done, 1 some clips failed, 2 usage error, 130 interrupted.
"""

import os
import sys

# the one shim of preprocessing/: the seeds run `python preprocessing/video2pkl.py` by path, with this folder on
# sys.path instead of the repo (an interpreter without `pip install -e .` included); tsn-video2pkl needs none
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from preprocessing.convert import run  # noqa: E402


def main(argv=None) -> int:
    return run(argv, "video2pkl", __doc__, "pkl")


if __name__ == "__main__":
    sys.exit(main())
