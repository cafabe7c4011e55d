"""Building list files (docs/design.md "Data formats"): scanning folders, naming labels, probing frame
counts, splitting."""

from __future__ import annotations

import os

import numpy as np

from common.files import write_atomic
from common.processes import fork_context
from common.usage import UsageError

from .kinetics import VIDEO_EXTENSIONS, class_name, load_class_index
from .progress import progress


def class_folders(root: str) -> list[str]:
    """Sub-folder names of ``root`` (one per class), sorted."""
    if not os.path.isdir(root):
        raise UsageError(f"{root} is not a folder")
    names = sorted(n for n in os.listdir(root) if os.path.isdir(os.path.join(root, n)) and not n.startswith("."))
    if not names:
        raise UsageError(f"{root} has no class sub-folders; expected ROOT/<class>/<clip>")
    return names


def class_index_for(folders: list[str], label_file: str | None) -> dict[str, int]:
    """Folder name -> label index: from the label file when given (folder names may use spaces or
    underscores), else the sorted folder names."""
    if not label_file:
        return {f: i for i, f in enumerate(sorted(folders, key=class_name))}
    index = load_class_index(label_file)
    unknown = [f for f in folders if class_name(f) not in index]
    if unknown:
        raise UsageError(f"class folder(s) {unknown[:5]} are not in {label_file}")
    return {f: index[class_name(f)] for f in folders}


def videos_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, n) for n in os.listdir(folder) if n.lower().endswith(VIDEO_EXTENSIONS))


def _facts_one(path):
    from clipdata.video import VideoError, broken, probe

    try:
        return path, probe(path)
    except VideoError as e:
        return path, broken(path, e)


def probe_facts(paths: list[str], nproc: int, what: str = "probe") -> dict:
    """VideoFacts of each video by decoding it once (unreadable ones carry their error), NPROC at once."""
    facts = {}
    with fork_context().Pool(nproc) as pool, progress(len(paths), what, "video") as bar:
        for path, f in pool.imap_unordered(_facts_one, paths, chunksize=4):
            facts[path] = f
            bar.update()
    return facts


def probe_counts(paths: list[str], nproc: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Frame counts by decoding each video (what every decoder will deliver), NPROC at once, and
    (path, reason) for each unreadable video."""
    facts = probe_facts(paths, nproc)
    return (
        {p: f.frames for p, f in facts.items() if not f.error},
        sorted((p, f.error) for p, f in facts.items() if f.error),
    )


def _index_one(path):
    from clipdata.errors import DataFormatError
    from clipdata.pkl import index_pkl

    try:
        return path, index_pkl(path), None
    except (DataFormatError, OSError) as e:
        return path, None, str(e)


def index_pkls(paths: list[str], nproc: int) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Give every clip pkl its frame index in place, NPROC at once: how many were already indexed,
    appended or rewritten, and (path, reason) for each file that is not a readable clip pkl. Rerunning
    after an interruption redoes only what is not indexed yet."""
    done, bad = {"indexed": 0, "appended": 0, "rewritten": 0}, []
    with fork_context().Pool(nproc) as pool, progress(len(paths), "index", "pkl") as bar:
        for path, outcome, error in pool.imap_unordered(_index_one, paths, chunksize=8):
            if error:
                bad.append((path, error))
            else:
                done[outcome] += 1
            bar.update()
    return done, bad


def count_frames(paths: list[str], nproc: int) -> tuple[dict[str, int] | None, list[tuple[str, str]]]:
    """Probed frame counts with NPROC processes (None when NPROC is 0: the list leaves counts out),
    and (path, reason) for each unreadable video."""
    return probe_counts(paths, nproc) if nproc else (None, [])


def video_entries(rows: list[tuple[str, int]], counts: dict[str, int] | None) -> list[tuple[str, int | None, int]]:
    """(video, frame count or None, label) list entries; with counts, unreadable videos are left out."""
    if counts is None:
        return [(path, None, label) for path, label in rows]
    return [(path, counts[path], label) for path, label in rows if path in counts]


def list_lines(path: str, entries: list[tuple[str, int | None, int | None]]) -> list[str]:
    """The lines of ``(file, num_frames or None, label or None)`` entries, paths relative to the list ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    lines = []
    for file, n, label in entries:
        parts = [os.path.relpath(os.path.abspath(file), folder)]
        parts += [str(n)] if n is not None else []
        parts += [str(label)] if label is not None else []
        lines.append(" ".join(parts))
    return lines


def write_list(path: str, entries: list[tuple[str, int | None, int | None]]) -> None:
    """Write ``(file, num_frames or None, label or None)`` entries with paths relative to the list."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, "".join(line + "\n" for line in list_lines(path, entries)).encode())


def stratified_split(items_by_class: dict[str, list[str]], ratios: list[float], seed: int) -> list[dict]:
    """Split each class's items by ``ratios`` (shuffled with ``seed``): one {class: items} per split.
    Every split gets round(n * ratio) items of each class; the last split takes the remainder."""
    if not ratios or any(r < 0 for r in ratios) or abs(sum(ratios) - 1) > 1e-6:
        raise UsageError(f"ratios {ratios} must be non-negative and add up to 1")
    splits: list[dict] = [{} for _ in ratios]
    for ci, cls in enumerate(sorted(items_by_class)):
        items = list(items_by_class[cls])
        np.random.default_rng([seed, ci]).shuffle(items)
        bounds = np.round(np.cumsum(ratios) * len(items)).astype(int)
        bounds[-1] = len(items)
        start = 0
        for s, end in enumerate(bounds):
            splits[s][cls] = sorted(items[start:end])
            start = end
    return splits
