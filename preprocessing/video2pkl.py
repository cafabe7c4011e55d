"""Convert the clips of a Kinetics CSV into pkl files of JPEG frames, NPROC ffmpeg processes at once.

    python preprocessing/video2pkl.py kinetics-400_train.csv SRC_DIR DST_DIR 8 --label-file labels.txt

Each clip becomes DST_DIR/<video_id>.pkl = (video_id, label_index, [jpeg_bytes, ...]), written to a
temporary name and renamed, so a rerun skips finished clips and never trusts a half-written one.
Exit status: 0 all clips converted, 1 some clips failed (listed in the failures file), 2 usage error.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import time

if __package__ in (None, ""):  # run by path: make the repo importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from preprocessing.kinetics import UsageError, find_clip, load_class_index, read_csv  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="Kinetics CSV: label,youtube_id,time_start,time_end,split")
    p.add_argument("src_dir", help="folder of the videos (flat, or one sub-folder per label)")
    p.add_argument("dst_dir", help="folder for the pkl files (created)")
    p.add_argument("nproc", type=int, nargs="?", default=os.cpu_count(), help="parallel ffmpeg processes")
    p.add_argument("--label-file", help="'index name' lines (preprocessing/generate_label.py); "
                   "default: classes of this CSV, sorted")
    p.add_argument("--list-out", help="pkl list to write (default: DST_DIR.list)")
    p.add_argument("--failures", help="failed clips, one 'id<TAB>reason' a line (default: DST_DIR.failures.txt)")
    p.add_argument("--jpeg-quality", type=int, default=4, metavar="Q",
                   help="ffmpeg -q:v for the JPEGs, 2 (best) .. 31 (default 4)")
    p.add_argument("--short-side", type=int, help="resize so the short side is N pixels (default: keep)")
    p.add_argument("--fps", type=float, help="resample to N frames/s (default: native)")
    return p.parse_args(argv)


def _convert(job):
    """Worker: one clip -> one pkl. Returns (video_id, frames or None, error or None)."""
    from dali_pipelines.formats import write_pkl
    from preprocessing.frames import ConversionError, extract_jpegs
    video_id, src, dst, label, q, short_side, fps = job
    try:
        if os.path.getsize(src) == 0:
            raise ConversionError("empty file (0 bytes)")
        frames = extract_jpegs(src, q, short_side, fps)
        write_pkl(dst, video_id, label, frames)
        return video_id, len(frames), None
    except (ConversionError, OSError) as e:
        return video_id, None, str(e)


def main(argv=None) -> int:
    args = parse_args(argv)
    dst_dir = os.path.abspath(args.dst_dir)
    list_out = args.list_out or dst_dir + ".list"
    failures_out = args.failures or dst_dir + ".failures.txt"
    try:
        if args.nproc < 1:
            raise UsageError(f"NPROC must be >= 1, got {args.nproc}")
        if not 2 <= args.jpeg_quality <= 31:
            raise UsageError(f"--jpeg-quality must be in 2..31, got {args.jpeg_quality}")
        clips, failures = read_csv(args.csv)
        if not os.path.isdir(args.src_dir):
            raise UsageError(f"SRC_DIR {args.src_dir} is not a folder")
        if args.label_file:
            class_index = load_class_index(args.label_file)
        else:
            class_index = {name: i for i, name in enumerate(sorted({c.label for c in clips}))}
            print(f"video2pkl: no --label-file: {len(class_index)} classes taken from {args.csv} "
                  "(pass the training label file when converting a val/test CSV)")
        try:
            os.makedirs(dst_dir, exist_ok=True)
            probe = os.path.join(dst_dir, ".write-test")
            open(probe, "wb").close()
            os.unlink(probe)
        except OSError as e:
            raise UsageError(f"DST_DIR {dst_dir} is not writable ({e.strerror})") from None
    except UsageError as e:
        print(f"video2pkl: error: {e}", file=sys.stderr)
        return 2

    jobs, done = [], []
    for c in clips:
        dst = os.path.join(dst_dir, c.video_id + ".pkl")
        if c.label not in class_index:
            failures.append((c.video_id, f"label '{c.label}' is not in the label file"))
            continue
        if os.path.exists(dst):
            done.append(dst)
            continue
        src = find_clip(args.src_dir, c)
        if src is None:
            failures.append((c.video_id, f"video file not found under {args.src_dir}"))
            continue
        jobs.append((c.video_id, src, dst, class_index[c.label], args.jpeg_quality, args.short_side, args.fps))

    from tqdm import tqdm
    t0, n_frames, skipped = time.time(), 0, len(done)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.nproc) as pool, tqdm(total=len(jobs), unit="clip", desc="video2pkl") as bar:
        for video_id, frames, error in pool.imap_unordered(_convert, jobs, chunksize=1):
            if error:
                failures.append((video_id, error))
            else:
                n_frames += frames
                done.append(os.path.join(dst_dir, video_id + ".pkl"))
            bar.set_postfix(failed=len(failures), fps=f"{n_frames / max(time.time() - t0, 1e-9):.0f}")
            bar.update()

    from dali_pipelines.formats import write_atomic
    list_dir = os.path.dirname(os.path.abspath(list_out))
    write_atomic(list_out, "".join(os.path.relpath(p, list_dir) + "\n" for p in sorted(done)).encode())
    write_atomic(failures_out, "".join(f"{vid}\t{why}\n" for vid, why in failures).encode())
    print(f"video2pkl: {len(done)} clips ready ({skipped} already done, {len(done) - skipped} converted, "
          f"{n_frames} frames in {time.time() - t0:.1f}s), {len(failures)} failed; list: {list_out}"
          + (f"; failures: {failures_out}" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
