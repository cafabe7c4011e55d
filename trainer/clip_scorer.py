"""Scores of clips whose frames are already decoded (windows of a long video or of a live stream, files
decoded by the loader's workers), through the test mode's own DALI transform and a scorer."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace

import numpy as np

from dali_pipelines import crops
from dali_pipelines.clipspec import ClipSpec
from dali_pipelines.sampling import sample_indices


def clip_spec(cfg) -> ClipSpec:
    """The test mode's clip of videos (``ClipSpec.from_config``) with the frames decoded on the host
    before the graph (decode "frames") and no labels. Read strictly, as this path always has: a damaged
    video is skipped whatever DATASET.allow_partial_videos says."""
    spec = ClipSpec.from_config(cfg, "test", device="cpu", source="videos", labelled=False)
    return replace(spec, allow_partial_videos=False)


def window_indices(spec: ClipSpec, start: int, end: int) -> np.ndarray:
    """Frame indices (of the whole video) that the model samples from the window ``[start, end)``:
    the test sampling of a clip of ``end - start`` frames, shifted to ``start``."""
    return start + sample_indices(
        end - start, spec.num_segments, "test", None, spec.num_clips, spec.sampling, spec.dense_interval
    )


def clip_row(spec: ClipSpec, frames: np.ndarray, tag: int) -> tuple:
    """The DALI inputs of one clip of decoded frames [T, H, W, 3]: what ``feed.load_sample`` gives for
    the "frames" decode, with ``tag`` in the label's place (it names the clip in the output)."""
    height, width = frames.shape[1:3]
    views = crops.test_windows(width, height, spec.target_size, spec.short_size, spec.num_crops)
    args = [a for win, flip in views for a in (win[:2], win[2:], np.array(flip, np.int32))]
    return (np.ascontiguousarray(frames), *args, np.array(tag, np.int64))


class _Rows:
    """The graph's batched external source: up to ``batch_size`` rows from an iterator of clips; a
    ``FLUSH`` item ends a batch early (a live stream does not wait for a full batch)."""

    def __init__(self, spec: ClipSpec, batch_size: int, clips: Iterator):
        self.spec, self.batch_size, self._clips = spec, batch_size, clips
        self.meta: dict[int, object] = {}
        self._tag = 0

    def __call__(self, info):
        rows = []
        for item in self._clips:
            if item is FLUSH:
                if rows:
                    break
                continue
            meta, frames = item
            self.meta[self._tag] = meta
            rows.append(clip_row(self.spec, frames, self._tag))
            self._tag += 1
            if len(rows) == self.batch_size:
                break
        if not rows:
            raise StopIteration
        return tuple(list(col) for col in zip(*rows))


FLUSH = object()


def score_clips(
    spec: ClipSpec, scorer, clips: Iterable, *, batch_size: int, prefetch: int = 1, num_threads: int = 2
) -> Iterator[tuple[object, np.ndarray]]:
    """(meta, logits) of each ``(meta, frames [T, H, W, 3] uint8)`` of ``clips``, in order: the frames go
    through the test transform (crop, resize, normalise: the loader's DALI graph) and ``scorer``
    (``predict.dynamic_scorer`` or ``predict.exported_scorer``) in batches of up to ``batch_size``."""
    import paddle

    from dali_pipelines.loader import define_pipeline

    src = _Rows(spec, batch_size, iter(clips))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = define_pipeline(
            src, device="cpu", device_id=None, num_threads=num_threads, prefetch=prefetch, dtype="float32"
        )
        pipe.build()
    try:
        while True:
            try:
                imgs, tags = pipe.run()
            except StopIteration:
                return
            # a copy onto Paddle's current device (the graph runs on the host: the frames are there)
            logits = scorer(paddle.to_tensor(np.asarray(imgs.as_tensor())))
            for tag, row in zip(np.asarray(tags.as_tensor()).reshape(-1), logits):
                yield src.meta.pop(int(tag)), row
    finally:
        del pipe
