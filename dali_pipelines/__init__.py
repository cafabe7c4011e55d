"""GPU (or CPU) data pipelines built on NVIDIA DALI: TSN sampling, decode, augment, hand-off to Paddle."""


def build_loader(*args, **kwargs):
    """See :func:`dali_pipelines.loader.build_loader`; imported lazily so that the formats and
    sampling helpers load without DALI or Paddle."""
    from .loader import build_loader as _build

    return _build(*args, **kwargs)
