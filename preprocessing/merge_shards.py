"""Assemble the list and failures file of a data set converted (or listed) in N shards.

    python preprocessing/merge_shards.py DST_DIR.list N [--dst-dir DST_DIR]

Run it once every `--shard I/N` run of video2pkl.py, vid2img.py or build_list.py has finished: it
writes the list (and the failures file) exactly as one unsharded run would have, or names the shards
that are missing, unfinished or still running and writes nothing (exit 2). Exit 1 when clips failed.
"""

import sys

from preprocessing.shards import merge_main

if __name__ == "__main__":
    sys.exit(merge_main())
