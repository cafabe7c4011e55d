"""build_loader: list file -> DALI pipeline -> batches of Paddle tensors.

Python reads what each sample needs (the sampled JPEGs of a pkl, rawframe files, or a video's bytes)
and computes the sampling and crop window; DALI decodes (nvJPEG / NVDEC on GPU), crops, resizes,
flips and normalises. Outputs reach Paddle through DLPack without a copy.
"""
from __future__ import annotations

import math
import os
import warnings

import numpy as np

from . import crops
from .formats import SOURCES, DataFormatError, Sample, jpeg_size, read_list, read_pkl
from .sampling import MODES, segment_indices, shard_indices
from .video import decode_frames, probe_cached

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
CROPS = ("multiscale", "random_resized")
DEFAULT_OPTIONS = dict(num_clips=1, crop="multiscale", flip=True, num_threads=2, prefetch=2,
                       dtype="float32", drop_last=None, device_id=None, num_classes=None, samples=None)


class _ClipSource:
    """Batched external source: one call returns one batch (the last one of an eval epoch may be
    short, so evaluation sees every sample exactly once)."""

    def __init__(self, samples, source, kind, mode, batch_size, num_segments, num_clips, target_size,
                 short_size, crop, flip, rank, world_size, seed, drop_last, num_classes, sizes):
        self.samples, self.source, self.kind, self.mode = samples, source, kind, mode
        self.batch_size, self.num_segments, self.num_clips = batch_size, num_segments, num_clips
        self.target_size, self.short_size, self.crop, self.flip = target_size, short_size, crop, flip
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.num_classes, self.sizes = num_classes, sizes
        self.epoch, self._order, self._rng = 0, None, None

    def num_batches(self) -> int:
        n = len(shard_indices(len(self.samples), self.rank, self.world_size, self.mode))
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def _start_epoch(self):
        self._order = shard_indices(len(self.samples), self.rank, self.world_size, self.mode,
                                    self.epoch, self.seed)
        self._rng = np.random.default_rng([self.seed, self.rank, self.epoch])

    def __call__(self, info):
        if info.iteration == 0:
            self._start_epoch()
        if info.iteration >= self.num_batches():
            raise StopIteration
        picked = self._order[info.iteration * self.batch_size:(info.iteration + 1) * self.batch_size]
        rows = [self._load(self.samples[i]) for i in picked]
        return tuple(list(col) for col in zip(*rows))

    def _indices(self, n):
        return segment_indices(n, self.num_segments, self.mode, self._rng, self.num_clips)

    def _load(self, s: Sample):
        label = s.label
        if self.source == "pkl":
            _, label, frames = read_pkl(s.path)
            if not frames:
                raise DataFormatError(f"{s.path}: pkl holds no frames")
            data = [np.frombuffer(frames[i], np.uint8) for i in self._indices(len(frames))]
            width, height = jpeg_size(frames[0])
        elif self.source == "rawframes":
            data = []
            for i in self._indices(s.num_frames):
                with open(os.path.join(s.path, f"img_{i + 1:05d}.jpg"), "rb") as f:
                    data.append(np.frombuffer(f.read(), np.uint8))
            width, height = jpeg_size(data[0].tobytes())
        else:
            _, width, height = self.sizes[s.path]
            idx = self._indices(s.num_frames)
            if self.kind == "frames":
                data = [decode_frames(s.path, idx)]
            else:
                data = [np.fromfile(s.path, np.uint8), idx]
        if self.num_classes is not None and not 0 <= label < self.num_classes:
            raise DataFormatError(f"{s.path} (list line {s.line}): label {label} is outside "
                                  f"[0, {self.num_classes}); check the list against the label file")
        if self.mode == "train" and self.crop == "multiscale":
            win = crops.multiscale_window(width, height, self._rng, self.target_size, self.short_size)
        elif self.mode == "train":
            win = crops.random_resized_window(width, height, self._rng)
        else:
            win = crops.center_window(width, height, self.target_size, self.short_size)
        flip = self.mode == "train" and self.flip and self._rng.random() < 0.5
        return (*data, win[:2], win[2:], np.array(flip, np.int32), np.array(label, np.int64))


def _build_pipeline(src: _ClipSource, kind, frames_per_sample, device, device_id, batch_size,
                    num_threads, prefetch, target_size, dtype):
    from nvidia.dali import fn, pipeline_def, types

    decode_device = "mixed" if device == "gpu" else "cpu"

    @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch, exec_dynamic=True)
    def graph():
        n_data = {"jpeg": frames_per_sample, "frames": 1, "video": 2}[kind]
        outs = fn.external_source(source=src, num_outputs=n_data + 4, batch=True, batch_info=True)
        data, (start, shape, flip, label) = outs[:n_data], outs[n_data:]
        if kind == "jpeg":
            images = [fn.decoders.image(d, device=decode_device, output_type=types.RGB) for d in data]
            frames = fn.stack(*images, axis_name="F")
        elif kind == "frames":
            frames = fn.reshape(data[0], layout="FHWC")
        else:
            frames = fn.decoders.video(data[0], frames=data[1], device=decode_device, pad_mode="edge")
        frames = fn.slice(frames, rel_start=start, rel_shape=shape, axis_names="WH",
                          out_of_bounds_policy="trim_to_shape")
        frames = fn.resize(frames, resize_x=target_size, resize_y=target_size, antialias=True)
        frames = fn.crop_mirror_normalize(
            frames, dtype=types.FLOAT16 if dtype == "float16" else types.FLOAT, output_layout="FCHW",
            mean=[m * 255 for m in MEAN], std=[s * 255 for s in STD], mirror=flip)
        return frames, label

    pipe = graph()
    pipe.build()
    return pipe


def _to_paddle(tensor_list):
    import paddle
    t = tensor_list.as_tensor()
    try:
        return paddle.utils.dlpack.from_dlpack(t)
    except (TypeError, AttributeError):  # Paddle 2.6 takes only a capsule
        return paddle.utils.dlpack.from_dlpack(t.__dlpack__())


class DALILoader:
    """Iterate whole epochs: ``for imgs, labels in loader`` yields [N, T, 3, H, W] and [N]."""

    def __init__(self, source: _ClipSource, pipe):
        self._source, self._pipe = source, pipe
        self.epoch, self._started = 0, False

    def __len__(self) -> int:
        return self._source.num_batches()

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch."""
        n = len(shard_indices(len(self._source.samples), self._source.rank, self._source.world_size,
                              self._source.mode))
        return len(self) * self._source.batch_size if self._source.drop_last else n

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order and augmentation the next iteration uses (for resume)."""
        self.epoch = epoch

    def __iter__(self):
        self._source.epoch = self.epoch
        self.epoch += 1
        if self._started:
            self._pipe.reset()
        self._started = True
        while True:
            try:
                imgs, labels = self._pipe.run()
            except StopIteration:
                return
            yield _to_paddle(imgs), _to_paddle(labels)


def build_loader(list_file, source="pkl", mode="train", batch_size=8, num_segments=3, target_size=224,
                 short_size=256, device="cpu", rank=0, world_size=1, seed=0, data_prefix=None, **options):
    """A DALI loader over ``list_file`` (DESIGN §4 formats). See README "The loader API"."""
    unknown = sorted(set(options) - set(DEFAULT_OPTIONS))
    if unknown:
        raise TypeError(f"build_loader: unknown option(s) {unknown}; known: {sorted(DEFAULT_OPTIONS)}")
    opt = {**DEFAULT_OPTIONS, **options}
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if device not in ("cpu", "gpu"):
        raise ValueError(f"device must be 'cpu' or 'gpu', got {device!r}")
    if opt["crop"] not in CROPS:
        raise ValueError(f"crop must be one of {CROPS}, got {opt['crop']!r}")
    if opt["dtype"] not in ("float32", "float16"):
        raise ValueError(f"dtype must be 'float32' or 'float16', got {opt['dtype']!r}")
    samples = opt["samples"] or read_list(list_file, source, data_prefix)
    sizes = {}
    if source == "videos":
        paths = sorted({s.path for s in samples})
        sizes = probe_cached(paths, f"{list_file}.probe.json" if list_file else None)
        samples = [s if s.num_frames else Sample(s.path, s.label, sizes[s.path][0], s.line) for s in samples]
    kind = "jpeg" if source != "videos" else ("video" if device == "gpu" else "frames")
    num_clips = opt["num_clips"] if mode == "test" else 1
    drop_last = (mode == "train") if opt["drop_last"] is None else bool(opt["drop_last"])
    src = _ClipSource(samples, source, kind, mode, batch_size, num_segments, num_clips, target_size,
                      short_size, opt["crop"], opt["flip"], rank, world_size, seed, drop_last,
                      opt["num_classes"], sizes)
    if src.num_batches() == 0:
        raise DataFormatError(f"{list_file}: {len(samples)} samples give no full batch of {batch_size} on "
                              f"each of {world_size} rank(s); lower the batch size")
    device_id = opt["device_id"]
    if device == "gpu" and device_id is None:
        device_id = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = _build_pipeline(src, kind, num_clips * num_segments, device,
                               device_id if device == "gpu" else None, batch_size, opt["num_threads"],
                               opt["prefetch"], target_size, opt["dtype"])
    return DALILoader(src, pipe)
