"""A PNG of the training curves (loss, top-1, LR) from metrics.jsonl."""

from __future__ import annotations

import json


def plot_curves(metrics_path: str, png_path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(metrics_path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    train = [r for r in records if r["mode"] == "train"]
    val = [r for r in records if r["mode"] == "val"]
    if not train:
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps = [r["step"] for r in train]
    axes[0].plot(steps, [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in val], [r["loss"] for r in val], "o-", label="val")
    axes[0].set_title("loss")
    axes[1].plot(steps, [r["top1"] for r in train], label="train")
    axes[1].plot([r["step"] for r in val], [r["top1"] for r in val], "o-", label="val top-1")
    axes[1].plot([r["step"] for r in val], [r["top5"] for r in val], "s--", label="val top-5")
    axes[1].set_title("accuracy")
    axes[2].plot(steps, [r["lr"] for r in train])
    axes[2].set_yscale("log")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
