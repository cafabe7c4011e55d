"""predict: each class name printed (and written) beside its own probability, against a direct softmax."""

import csv

import numpy as np

from tools.media import index_frames, write_video
from trainer import dist, predict

from .tiny import tiny_cfg

# names whose alphabetical order is not their index order, and logits whose order is neither
NAMES = ["zebra", "apple", "mango", "kiwi", "banana", "cherry"]
LOGITS = np.array([0.5, 2.0, -1.0, 1.25, 0.0, 3.0], np.float32)


def test_predict_pairs_each_class_name_with_its_own_probability(tmp_path, capsys):
    (tmp_path / "labels.txt").write_text("".join(f"{i} {n}\n" for i, n in enumerate(NAMES)))
    write_video(str(tmp_path / "c.mp4"), index_frames(12))
    cfg = tiny_cfg(
        tmp_path,
        f"DATASET.label_file={tmp_path / 'labels.txt'}",
        "PIPELINE.target_size=16",
        "PIPELINE.short_size=16",
        num_classes=6,
    )
    scorer = lambda imgs: np.tile(LOGITS, (imgs.shape[0], 1))  # noqa: E731 - a model of known logits
    results = predict.predict(cfg, dist.Env(0, 1, "cpu", None), scorer, str(tmp_path / "c.mp4"), top_k=5)

    e = np.exp(LOGITS.astype(np.float64))
    prob = dict(zip(NAMES, e / e.sum()))  # by name: the pairing under test
    expected = sorted(prob.items(), key=lambda kv: -kv[1])[:5]
    ((video, top),) = results
    assert [n for n, _ in top] == [n for n, _ in expected] == ["cherry", "apple", "kiwi", "zebra", "banana"]
    for name, p in top:
        assert abs(p - prob[name]) < 1e-5, f"{name} printed with {p}, its probability is {prob[name]}"

    predict.print_predictions(results)
    printed = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert [(row[1], float(row[2])) for row in printed] == [(n, round(p, 4)) for n, p in expected]
    predict.write_predictions_csv(results, str(tmp_path / "p.csv"))
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["class"], float(r["probability"])) for r in rows] == [(n, round(p, 6)) for n, p in expected]
