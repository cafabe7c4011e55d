"""The miniature demo data set the tests and the GPU self-test train on: rendered clips of the demo's
classes, converted to pkl by the preprocessing the user runs (make_demo_dataset, generate_label, video2pkl)."""

from __future__ import annotations

import os


def build_demo_set(root: str, train_per_class: int = 3, val_per_class: int = 2) -> str:
    """``root`` with train/val mp4s, ``label.txt`` and ``{train,val}_pkl.list`` (12-40 frames a clip, seed 1).
    Built once: a folder that already holds ``val_pkl.list`` is returned as it is."""
    from preprocessing import generate_label, make_demo_dataset, video2pkl

    if os.path.exists(os.path.join(root, "val_pkl.list")):
        return root
    csvs = make_demo_dataset.make_dataset(
        root, seed=1, train_per_class=train_per_class, val_per_class=val_per_class, min_frames=12, max_frames=40
    )
    label_file = os.path.join(root, "label.txt")
    if generate_label.main([csvs["train"], label_file]) != 0:
        raise RuntimeError(f"generate_label failed for {csvs['train']}")
    for split in ("train", "val"):
        args = [csvs[split], os.path.join(root, split), os.path.join(root, f"{split}_pkl"), "2"]
        if video2pkl.main([*args, "--label-file", label_file]) != 0:
            raise RuntimeError(f"video2pkl of the demo {split} split failed (see its output above)")
    return root
