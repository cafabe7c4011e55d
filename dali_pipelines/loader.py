"""build_loader: list file -> DALI pipeline -> batches of Paddle tensors.

Python reads what each sample needs (the sampled JPEGs of a pkl, rawframe files, or a video's bytes)
and computes the sampling and crop window; DALI decodes (nvJPEG / NVDEC on GPU), crops, resizes,
flips and normalises. Outputs reach Paddle through DLPack without a copy.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, fields

import numpy as np

from clipdata.errors import DataFormatError
from clipdata.lists import Sample, read_list
from clipdata.video import VideoError, load_probe_cache, probe_cached, save_probe_cache
from common.log import get_logger
from common.processes import default_num_workers

from .clipspec import DEVICES, MEAN, STD, ClipSpec
from .feed import LabelError, sample_pool
from .sampling import shard_indices

log = get_logger(__name__)
DTYPES = ("float32", "float16")


@dataclass(frozen=True, kw_only=True)
class LoaderRun:
    """How and where a loader runs, whatever its clips (``ClipSpec``) are: ``build_loader``'s
    keywords of that name (its docstring says what each means), checked."""

    batch_size: int = 8
    device: str = "cpu"
    device_id: int | None = None
    rank: int = 0
    world_size: int = 1
    seed: int = 0
    data_prefix: str | None = None
    samples: list[Sample] | None = None
    drop_last: bool | None = None
    max_batches: int | None = None
    num_threads: int = 2
    prefetch: int = 2
    dtype: str = "float32"
    num_workers: int | None = None
    worker_timeout: float = 120.0

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ValueError(f"device must be 'cpu' or 'gpu', got {self.device!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'float32' or 'float16', got {self.dtype!r}")
        workers = self.num_workers
        if workers is not None and (not isinstance(workers, int) or workers < 0):
            raise ValueError(f"num_workers must be an integer >= 0 (0: read in the training process), got {workers!r}")


RUN_KEYWORDS = tuple(f.name for f in fields(LoaderRun))
# build_loader's keywords that make its ClipSpec: ClipSpec.create's, less source, mode and device
CLIP_KEYWORDS = tuple(k for k in inspect.signature(ClipSpec.create).parameters if k not in ("source", "mode", "device"))


class _ClipSource:
    """Batched external source: one call returns one batch.

    The samples' host-side work (``feed.load_sample``) runs in ``num_workers`` processes, far enough
    ahead of DALI that the training thread only gathers results. Candidate ``k`` of an epoch is a fixed
    sample (the rank's shard in order; in training then random samples of the shard), loaded with the
    randomness of (seed, rank, epoch, k): batches do not depend on the number of workers.

    Unreadable samples (corrupt or truncated files, a list that promises more frames than a video
    has) are skipped, reported once and counted. Training batches are topped up from the rest of the
    shard so that every rank keeps the same number of full steps; an evaluation batch is filled from
    the next samples of the shard, so evaluation visits every readable sample exactly once."""

    MAX_CONSECUTIVE_FAILURES = 64

    def __init__(
        self,
        samples,
        spec: ClipSpec,
        *,
        batch_size,
        rank,
        world_size,
        seed,
        drop_last,
        max_batches=None,
        num_workers=0,
        worker_timeout=120.0,
        facts=None,
        cache_file=None,
    ):
        self.samples, self.spec, self.batch_size = samples, spec, batch_size
        self.rank, self.world_size, self.seed, self.drop_last = rank, world_size, seed, drop_last
        self.facts, self.cache_file, self._new_facts = dict(facts or {}), cache_file, {}
        self.epoch, self.skipped, self._reported = 0, 0, set()
        self._order, self._rng, self._batches = None, None, 0
        # fixed for the loader's life; computed once (in training it costs a permutation of the list)
        self.shard_size = len(shard_indices(len(samples), rank, world_size, spec.mode))
        batches = self.shard_size // batch_size if drop_last else math.ceil(self.shard_size / batch_size)
        self.num_batches = min(batches, max_batches) if max_batches else batches
        self.feed = sample_pool(spec, num_workers, ahead=2 * batch_size, timeout=worker_timeout)

    def _start_epoch(self):
        self._order = shard_indices(
            len(self.samples), self.rank, self.world_size, self.spec.mode, self.epoch, self.seed
        )
        self._rng = np.random.default_rng([self.seed, self.rank, self.epoch])  # draws top-up samples
        self._batches, self._next = 0, 0
        # candidates an epoch uses when every sample reads: each failure allows one more
        self._budget = min(self.shard_size, self.num_batches * self.batch_size)
        self.feed.drop()
        self._save_facts()

    def _candidate(self, k: int) -> int:
        """The list index of candidate ``k``; past the shard (training only) a random shard sample."""
        return int(self._order[k] if k < len(self._order) else self._order[self._rng.integers(len(self._order))])

    def _fill(self):
        """Submit the epoch's next candidates, as many as the feed takes now (fewer only at the end of
        the budget, or when nothing is in flight and the next batch needs them)."""
        limit = self._budget if self.spec.mode == "train" else min(self._budget, len(self._order))
        want = min(self.feed.want(), limit - self._next)
        if want < self.feed.chunk and self.feed.in_flight and self._next + want < limit:
            return
        items = []
        for k in range(self._next, self._next + max(0, want)):
            s = self.samples[self._candidate(k)]
            items.append((s, (self.seed, self.rank, self.epoch, k), self.facts.get(s.path)))
        self._next += len(items)
        self.feed.submit(items)

    def __call__(self, info):
        if info.iteration == 0:
            self._start_epoch()
        if self._batches >= self.num_batches:
            self._save_facts()
            raise StopIteration
        rows, failures = [], 0
        while len(rows) < self.batch_size:
            self._fill()
            if not self.feed.in_flight:  # the epoch's candidates are used up
                break
            (s, _, _), (status, value) = self.feed.next()
            if status == "ok":
                row, facts = value
                if facts is not None:
                    self.facts[s.path] = self._new_facts[s.path] = facts
                rows.append(row)
                failures = 0
                continue
            if status == "fatal":
                raise LabelError(value)
            self._skip(s, value)
            failures += 1
            if failures >= self.MAX_CONSECUTIVE_FAILURES:
                raise DataFormatError(
                    f"{failures} samples in a row could not be read (see the messages "
                    "above); check the data and the list file"
                )
        if not rows:
            self._save_facts()
            raise StopIteration
        self._batches += 1
        return tuple(list(col) for col in zip(*rows))

    def _skip(self, s: Sample, why: str):
        self.skipped += 1
        self._budget += 1  # one more candidate takes its place (training; evaluation has no more)
        if s.path not in self._reported:
            self._reported.add(s.path)
            log.warning(f"dali_pipelines: skipping {s.path} (list line {s.line}): {why}")

    def _save_facts(self):
        """Keep what workers probed (videos new to the cache, or changed) for the next run."""
        if self._new_facts:
            save_probe_cache(self.cache_file, self._new_facts)
            self._new_facts = {}


def define_pipeline(
    src: _ClipSource, *, device: str, device_id: int | None, num_threads: int, prefetch: int, dtype: str
):
    """The DALI graph of a loader, defined but not built: what it decodes, the frames and views per
    sample, the batch size and the output size come from ``src`` (its ClipSpec); the rest is how and
    where it runs. With ``device_id=None`` a GPU graph can be defined and inspected without a GPU
    (tests/test_gpu_graphs.py checks every variant against DALI's schemas)."""
    from nvidia.dali import fn, pipeline_def, types

    spec, batch_size = src.spec, src.batch_size
    frames_per_view, num_views = spec.num_clips * spec.num_segments, spec.num_crops
    decode_device = "mixed" if device == "gpu" else "cpu"
    out_type = types.FLOAT16 if dtype == "float16" else types.FLOAT

    @pipeline_def(
        batch_size=batch_size,
        num_threads=num_threads,
        device_id=device_id,
        prefetch_queue_depth=prefetch,
        exec_dynamic=True,
    )
    def graph():
        n_data = {"jpeg": frames_per_view, "frames": 1, "video": 4}[spec.decode]
        outs = fn.external_source(source=src, num_outputs=n_data + 3 * num_views + 1, batch=True, batch_info=True)
        data, views, label = outs[:n_data], outs[n_data:-1], outs[-1]
        cropped = _cropped_views(spec.decode, data, views, num_views=num_views, device=decode_device)
        out = [
            _normalised(frames, size=spec.target_size, dtype=out_type, mirror=views[3 * v + 2])
            for v, frames in enumerate(cropped)
        ]
        frames = out[0] if num_views == 1 else fn.cat(*out, axis=0)
        return frames, (label.gpu() if device == "gpu" else label)  # the whole batch on one device

    return graph()


def _cropped_views(decode: str, data, views, *, num_views: int, device: str) -> list:
    """Each view's frames [F, H, W, C], decoded on ``device`` ("mixed" or "cpu") and cut to its window
    (``views`` holds start, shape and flip of each)."""
    from nvidia.dali import fn, types

    if decode == "jpeg" and num_views == 1:
        # decode only the crop window of each frame (one window for the whole clip)
        start, shape = views[0], views[1]
        slices = [fn.decoders.image_slice(d, start, shape, device=device, output_type=types.RGB) for d in data]
        return [fn.stack(*slices, axis_name="F")]
    if decode == "jpeg":
        frames = fn.stack(*[fn.decoders.image(d, device=device, output_type=types.RGB) for d in data], axis_name="F")
    elif decode == "frames":
        frames = fn.reshape(data[0], layout="FHWC")
    else:
        frames = fn.decoders.video(data[0], frames=data[1], device=device, pad_mode="edge")
        frames = _upright(frames, mirror=data[2], angle=data[3])
    return [
        fn.slice(
            frames,
            rel_start=views[3 * v],
            rel_shape=views[3 * v + 1],
            axis_names="WH",
            out_of_bounds_policy="trim_to_shape",
        )
        for v in range(num_views)
    ]


def _normalised(frames, *, size: int, dtype, mirror):
    """One view [F, C, size, size]: resized, flipped where ``mirror`` says, ImageNet-normalised."""
    from nvidia.dali import fn

    frames = fn.resize(frames, resize_x=size, resize_y=size, antialias=True)
    return fn.crop_mirror_normalize(
        frames,
        dtype=dtype,
        output_layout="FCHW",
        mean=[m * 255 for m in MEAN],
        std=[s * 255 for s in STD],
        mirror=mirror,
    )


def _upright(frames, *, mirror, angle):
    """Decoded frames [F, H, W, C] turned upright as their display matrix says (per sample: mirror
    left-right, then ``angle`` degrees counter-clockwise, a multiple of 90): what ffmpeg does for the
    pkl and rawframe paths and PyAV's frames get in clipdata.video, and NVDEC does not do.
    Nearest-neighbour at right angles moves pixels exactly."""
    from nvidia.dali import fn, types

    frames = fn.flip(frames, horizontal=mirror)
    return fn.rotate(frames, angle=angle, keep_size=False, interp_type=types.INTERP_NN)


def _to_paddle(tensor_list):
    import paddle

    # Paddle 3 takes the DALI tensor (its __dlpack__) and shares its memory: no copy on either device
    return paddle.utils.dlpack.from_dlpack(tensor_list.as_tensor())


class DALILoader:
    """Iterate whole epochs: ``for imgs, labels in loader`` yields [N, T, 3, H, W] and [N]."""

    def __init__(self, source: _ClipSource, pipe):
        self._source, self._pipe = source, pipe
        self.epoch, self._started = 0, False

    def __len__(self) -> int:
        return self._source.num_batches

    @property
    def num_samples(self) -> int:
        """Samples this rank visits per epoch."""
        src = self._source
        return src.num_batches * src.batch_size if src.drop_last else src.shard_size

    @property
    def num_workers(self) -> int:
        """Feed worker processes of this loader (0: it reads in the training process)."""
        return self._source.feed.num_workers

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        self._source.feed.close()

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped so far (each reported once on stderr)."""
        return self._source.skipped

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


def check_rawframe_counts(samples, list_file) -> None:
    """A rawframes line's count must name the last frame of its folder: img_{n}.jpg exists, img_{n+1}.jpg not."""
    wrong = []
    for s in samples:
        last = os.path.join(s.path, f"img_{s.num_frames:05d}.jpg")
        after = os.path.join(s.path, f"img_{s.num_frames + 1:05d}.jpg")
        if not os.path.exists(last) or os.path.exists(after):
            have = sum(1 for n in os.listdir(s.path) if n.startswith("img_")) if os.path.isdir(s.path) else 0
            wrong.append(f"{list_file}:{s.line}: {s.path} has {have} frames, the list says {s.num_frames}")
    if wrong:
        more = f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else ""
        raise DataFormatError(
            f"{len(wrong)} wrong frame count(s): "
            + "; ".join(wrong[:5])
            + more
            + ". Rebuild the list with preprocessing/build_list.py rawframes."
        )


NVDEC_LIBRARY = "libnvcuvid.so.1"


def nvdec_unavailable() -> str:
    """Why NVDEC cannot decode here ("" when it can). DALI's GPU video decoder dlopens the driver's
    libnvcuvid.so.1 (libdali_operators.so), which a container has only when the NVIDIA Container Toolkit
    mounts the driver's video libraries: NVIDIA_DRIVER_CAPABILITIES must include `video` (docs/gpu.md)."""
    import ctypes

    try:
        ctypes.CDLL(NVDEC_LIBRARY)
    except OSError:
        caps = os.environ.get("NVIDIA_DRIVER_CAPABILITIES")
        return (
            f"NVDEC needs {NVDEC_LIBRARY} from the NVIDIA driver and it cannot be loaded; in a container "
            f"NVIDIA_DRIVER_CAPABILITIES must include video (it is {'unset' if caps is None else repr(caps)}): "
            "run it with -e NVIDIA_DRIVER_CAPABILITIES=compute,utility,video"
        )
    return ""


def build_loader(
    list_file: str | None,
    source: str = "pkl",
    mode: str = "train",
    *,
    batch_size: int = 8,
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
    device: str = "cpu",
    device_id: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    data_prefix: str | None = None,
    samples: list[Sample] | None = None,
    drop_last: bool | None = None,
    max_batches: int | None = None,
    num_threads: int = 2,
    prefetch: int = 2,
    dtype: str = "float32",
    num_workers: int | None = None,
    worker_timeout: float = 120.0,
) -> DALILoader:
    """A DALI loader over ``list_file``: ``for imgs, labels in loader`` yields [N, T, 3, H, W]
    ImageNet-normalised RGB (T = crops x clips x segments) and [N] int64 labels, one epoch per loop.
    The trainer builds its clip from the config instead (``ClipSpec.from_config``, ``build_spec_loader``).

    Args:
        list_file: the list of samples (docs/design.md "Data formats"); None with ``samples``.
        source: the list's format: "pkl", "rawframes" or "videos".
        mode: "train" (random segments, crop and flip), "val" (centre frames, one centre view) or
            "test" (``num_clips`` clips x ``num_crops`` views).
        batch_size: samples per batch on this rank.
        num_segments: frames per clip (TSN segments, or TSM's dense window).
        target_size: the side of the square crops the model sees.
        short_size: the short side frames are scaled to before the crops.
        num_clips: test mode: clips per video, evenly spread.
        num_crops: test mode: views per clip: 1 (centre), 3 (along the long side) or 10 (five and
            their flips).
        crop: training crop: "multiscale" (TSN's scales and 13 fixed offsets) or "random_resized".
        flip: training: flip each clip left-right with probability 0.5.
        sampling: "segment" (TSN) or "dense" (TSM's frames ``dense_interval`` apart).
        dense_interval: dense sampling: frames between two sampled frames.
        num_classes: labels must lie in [0, num_classes) or the run stops naming the file; None: unchecked.
        allow_partial_videos: keep the decodable part of a video damaged before its end (default: the
            video is unreadable and skipped).
        device: "gpu" (nvJPEG / NVDEC) or "cpu" (libjpeg / PyAV).
        device_id: the GPU; None: the first of FLAGS_selected_gpus (else 0).
        rank: this rank; it reads its own shard of the list.
        world_size: the number of ranks sharing the list.
        seed: with (rank, epoch) it fixes the order, the sampling and the augmentation.
        data_prefix: the folder relative list paths resolve against (default: the list's folder).
        samples: pre-parsed samples (``clipdata.lists.Sample``) instead of reading ``list_file``.
        drop_last: drop a last partial batch (default: in training only).
        max_batches: stop each epoch after this many batches (None: the whole shard).
        num_threads: DALI's CPU threads.
        prefetch: batches DALI prepares ahead.
        dtype: the output's: "float32", or "float16" for AMP.
        num_workers: feed worker processes reading the samples; None: a share of the host's cores,
            0: in the training process.
        worker_timeout: seconds a feed worker may take before the run stops naming its files.
    """
    keywords = dict(locals())  # the arguments above, by name
    return build_spec_loader(list_file, *_spec_and_run(source, mode, keywords))


def _spec_and_run(source: str, mode: str, keywords: dict) -> tuple[ClipSpec, LoaderRun]:
    """``build_loader``'s keywords (any of them) as the clip they describe and the settings of the run."""
    run = LoaderRun(**{k: v for k, v in keywords.items() if k in RUN_KEYWORDS})
    clip = {k: v for k, v in keywords.items() if k in CLIP_KEYWORDS}
    return ClipSpec.create(source, mode, device=run.device, **clip), run


def build_spec_loader(list_file: str | None, spec: ClipSpec, run: LoaderRun | None = None) -> DALILoader:
    """``build_loader`` with its clip given whole (``ClipSpec.from_config``'s) and the rest in ``run``."""
    run = run or LoaderRun()
    if spec.decode == "video" and nvdec_unavailable():
        raise VideoError(nvdec_unavailable())  # before anything starts, not as DALI's error mid-build
    src, how = plan_spec(list_file, spec, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = define_pipeline(src, **how)
        pipe.build()
    return DALILoader(src, pipe)


def plan_loader(list_file: str | None, source: str = "pkl", mode: str = "train", **keywords):
    """``plan_spec`` of ``build_loader``'s arguments: what it would run, nothing built."""
    unknown = sorted(set(keywords) - set(CLIP_KEYWORDS) - set(RUN_KEYWORDS))
    if unknown:
        raise TypeError(f"plan_loader: unknown keyword(s) {unknown}; known: {sorted(CLIP_KEYWORDS + RUN_KEYWORDS)}")
    return plan_spec(list_file, *_spec_and_run(source, mode, keywords))


def plan_spec(list_file: str | None, spec: ClipSpec, run: LoaderRun):
    """(the loader's external source, ``define_pipeline``'s keyword arguments): the list read and its
    samples established, nothing built."""
    if (spec.decode == "video") != (run.device == "gpu" and spec.source == "videos"):
        raise ValueError(f"a {spec.decode!r} clip spec does not run on device {run.device!r}; make it for that device")
    samples, facts, cache_file = _samples(list_file, spec, run)
    src = _ClipSource(
        samples,
        spec,
        batch_size=run.batch_size,
        rank=run.rank,
        world_size=run.world_size,
        seed=run.seed,
        drop_last=(spec.mode == "train") if run.drop_last is None else bool(run.drop_last),
        max_batches=run.max_batches,
        num_workers=default_num_workers() if run.num_workers is None else run.num_workers,
        worker_timeout=run.worker_timeout,
        facts=facts,
        cache_file=cache_file,
    )
    if src.num_batches == 0:
        src.feed.close()
        raise DataFormatError(
            f"{list_file}: {len(samples)} samples give no full batch of {run.batch_size} on "
            f"each of {run.world_size} rank(s); lower the batch size"
        )
    device_id = run.device_id
    if run.device == "gpu" and device_id is None:
        device_id = int(os.environ.get("FLAGS_selected_gpus", "0").split(",")[0])
    return src, dict(
        device=run.device,
        device_id=device_id if run.device == "gpu" else None,
        num_threads=run.num_threads,
        prefetch=run.prefetch,
        dtype=run.dtype,
    )


def _samples(list_file: str | None, spec: ClipSpec, run: LoaderRun) -> tuple[list[Sample], dict, str | None]:
    """(the samples, what is known of their videos, the probe cache beside the list): the list read,
    videos without a frame count probed once (and cached), rawframe counts checked."""
    samples = run.samples or read_list(list_file, spec.source, run.data_prefix)
    cache_file = f"{list_file}.probe.json" if list_file and spec.source == "videos" else None
    facts = load_probe_cache(cache_file) if cache_file else {}
    if spec.source == "videos":
        unknown = sorted({s.path for s in samples if not s.num_frames})
        if unknown:  # decoded once and cached beside the list
            facts.update(probe_cached(unknown, cache_file, facts, spec.allow_partial_videos))
    elif spec.source == "rawframes":
        check_rawframe_counts(samples, list_file)
    return samples, facts, cache_file
