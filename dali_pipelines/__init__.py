"""GPU (or CPU) data pipelines built on NVIDIA DALI: TSN sampling, decode, augment, hand-off to Paddle.

``build_loader`` (and ``build_spec_loader``, ``LoaderRun``) are ``dali_pipelines.loader``'s, reached
through this package on first use, so that importing the sampling and crop helpers loads neither the
loader nor what it needs; ``help(dali_pipelines.build_loader)`` shows the real signature."""

_LOADER_NAMES = ("build_loader", "build_spec_loader", "LoaderRun")


def __getattr__(name):
    if name in _LOADER_NAMES:
        from . import loader

        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LOADER_NAMES])
