"""What one loader's samples are: the source, the frames, the views and the normalisation (``ClipSpec``).

``ClipSpec.from_config`` is the one place a config's clip settings become a loader's: the trainer's
loaders, export's preprocessing.json, predict and the clip scorer all take the spec it returns.
"""

from __future__ import annotations

from dataclasses import dataclass

from clipdata.lists import SOURCES

from .sampling import LOADER_MODES, SAMPLINGS

# ImageNet's RGB statistics: the graph normalises with them and preprocessing.json states them
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROPS = ("multiscale", "random_resized")  # training crops
NUM_CROPS = (1, 3, 10)  # test views per clip: centre, three along the long side, ten (five and their flips)
DEVICES = ("cpu", "gpu")


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """How every sample of one loader is read and cut: the source, the frames and the views."""

    source: str  # the list's format: "pkl" | "rawframes" | "videos"
    # what the DALI graph decodes: "jpeg" (nvJPEG / libjpeg), "video" (NVDEC), or "frames" (nothing:
    # PyAV decoded them in the feed, the CPU path for videos)
    decode: str
    mode: str  # "train" | "val" | "test"
    num_segments: int
    target_size: int
    short_size: int
    num_clips: int = 1
    num_crops: int = 1
    crop: str = "multiscale"
    flip: bool = True
    sampling: str = "segment"
    dense_interval: int = 8
    num_classes: int | None = None
    allow_partial_videos: bool = False  # keep the decodable part of a video damaged before its end

    @property
    def views(self) -> int:
        """Frames the model sees per sample: crops x clips x segments (1 x 1 x segments outside test)."""
        return self.num_crops * self.num_clips * self.num_segments

    @classmethod
    def create(
        cls,
        source: str = "pkl",
        mode: str = "train",
        *,
        device: str = "cpu",
        num_segments: int = 3,
        target_size: int = 224,
        short_size: int = 256,
        num_clips: int = 1,
        num_crops: int = 1,
        crop: str = "multiscale",
        flip: bool = True,
        sampling: str = "segment",
        dense_interval: int = 8,
        num_classes: int | None = None,
        allow_partial_videos: bool = False,
    ) -> ClipSpec:
        """The spec of ``build_loader``'s keywords (its docstring says what each means), checked: what
        the graph decodes follows from the source and the device, and clips and crops count in test
        mode only."""
        for name, value, known in (
            ("source", source, SOURCES),
            ("mode", mode, LOADER_MODES),
            ("crop", crop, CROPS),
            ("sampling", sampling, SAMPLINGS),
        ):
            if value not in known:
                raise ValueError(f"{name} must be one of {known}, got {value!r}")
        if device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
        if num_crops not in NUM_CROPS:
            raise ValueError(f"num_crops must be 1, 3 or 10, got {num_crops!r}")
        if mode != "test":
            num_clips, num_crops = 1, 1
        return cls(
            source=source,
            decode="jpeg" if source != "videos" else ("video" if device == "gpu" else "frames"),
            mode=mode,
            num_segments=num_segments,
            target_size=target_size,
            short_size=short_size,
            num_clips=num_clips,
            num_crops=num_crops,
            crop=crop,
            flip=flip,
            sampling=sampling,
            dense_interval=dense_interval,
            num_classes=num_classes,
            allow_partial_videos=bool(allow_partial_videos),
        )

    @classmethod
    def from_config(
        cls, cfg, mode: str, *, device: str = "cpu", source: str | None = None, labelled: bool = True
    ) -> ClipSpec:
        """The clip of ``mode`` that ``cfg`` (``trainer.config.load_config``'s) asks for: the only
        reading of a config's clip settings. Test mode takes PIPELINE.test_num_segments (else
        num_segments), test_num_clips and test_num_crops. ``device`` is where the graph decodes,
        ``source`` replaces DATASET.source, and ``labelled=False`` drops the label check (predict's
        inputs carry no labels)."""
        d, p = cfg.DATASET, cfg.PIPELINE
        return cls.create(
            source or d.source,
            mode,
            device=device,
            num_segments=(p.test_num_segments or p.num_segments) if mode == "test" else p.num_segments,
            target_size=p.target_size,
            short_size=p.short_size,
            num_clips=p.test_num_clips,
            num_crops=p.test_num_crops,
            crop=p.crop,
            flip=p.flip,
            sampling=p.sampling,
            dense_interval=p.dense_interval,
            num_classes=cfg.MODEL.head.num_classes if labelled else None,
            allow_partial_videos=d.allow_partial_videos,
        )
