"""Precise-BN: recompute BatchNorm statistics over many training batches before evaluation.

Running averages drift with the weights during training; averaging the batch statistics of
``num_iters`` batches under the final weights (and then over all ranks) gives the statistics the
evaluation should use.
"""

from __future__ import annotations

import paddle

from . import dist
from .dist import batch_norms


def precise_bn(model, loader, env: dist.Env) -> int:
    """Replace every BN's running mean/variance by the average over the loader's batches (one epoch
    of it); returns the number of batches used."""
    bns = batch_norms(model)
    momenta = [bn._momentum for bn in bns]
    for bn in bns:
        bn._mean.set_value(paddle.zeros_like(bn._mean))
        bn._variance.set_value(paddle.zeros_like(bn._variance))
    was_training = model.training
    model.train()
    n = 0
    try:
        with paddle.no_grad():
            for imgs, _ in loader:
                n += 1
                for bn in bns:  # running = (n-1)/n * running + 1/n * batch: the mean over batches
                    bn._momentum = (n - 1) / n
                model(imgs.astype("float32"))  # as evaluate runs it (an AMP loader yields float16)
    finally:
        for bn, m in zip(bns, momenta):
            bn._momentum = m
        if was_training:  # Layer.train() takes no mode on Paddle 2.x: set it by name
            model.train()
        else:
            model.eval()
    dist.average_bn_buffers(model, env)
    return n
