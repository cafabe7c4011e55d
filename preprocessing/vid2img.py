"""Convert the clips of a Kinetics CSV into rawframe folders of JPEGs, NPROC ffmpeg processes at once.

    python preprocessing/vid2img.py kinetics-400_train.csv SRC_DIR DST_DIR 8 --label-file labels.txt

Each clip becomes the folder DST_DIR/<video_id>/ holding img_00001.jpg, img_00002.jpg, ... (every
decoded frame, in order), and DST_DIR.list lists 'frame_dir num_frames label' lines. A folder is
written under a temporary name and renamed when complete, so a rerun skips finished clips and redoes
the rest. Bad clips are recorded in DST_DIR.failures.txt and the run goes on.
Exit status: 0 all clips converted or already done, 1 some clips failed, 2 usage error, 130 interrupted.
"""

import sys

from preprocessing.convert import run


def main(argv=None) -> int:
    return run(argv, "vid2img", __doc__, "rawframes")


if __name__ == "__main__":
    sys.exit(main())
