"""The training losses every mode shares: cross-entropy against smoothed labels and mixup of a batch
(docs/training.md); the plain loop (trainer.engine) and distillation (trainer.distill) build on them."""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F


def classification_loss(logits, labels, smoothing: float = 0.0):
    """Mean cross-entropy against labels smoothed towards the uniform distribution by ``smoothing``."""
    logp = F.log_softmax(logits.astype("float32"), axis=1)
    nll = -paddle.take_along_axis(logp, labels.reshape([-1, 1]).astype("int64"), axis=1).squeeze(1)
    return ((1 - smoothing) * nll - smoothing * logp.mean(axis=1)).mean()


def mixup(imgs, labels, alpha: float, rng: np.random.Generator):
    """(mixed clips, the partner labels, the weight of the own labels) for a batch: each clip is blended
    with another clip of the batch by lambda ~ Beta(alpha, alpha) (mixup, Zhang et al. 2018)."""
    lam = float(rng.beta(alpha, alpha))
    perm = paddle.to_tensor(rng.permutation(labels.shape[0]))
    return imgs * lam + paddle.gather(imgs, perm) * (1 - lam), paddle.gather(labels, perm), lam
