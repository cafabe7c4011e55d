"""The loader's host side: what each sample needs before DALI decodes it, computed off the training thread.

One sample is a pure function of its settings, its list entry and its place in the epoch
(``load_sample``): the sampled JPEGs of a pkl (read by offset through the frame index), the sampled
rawframe files, a video's bytes (GPU) or its sampled frames decoded with PyAV (CPU), plus the crop
window and flip. ``common.processes.ParallelMap`` runs such calls in worker processes.
docs/design.md "The host-side feed" says why this is not DALI's parallel external source."""

from __future__ import annotations

import functools
import os

import numpy as np

from clipdata.errors import DataFormatError
from clipdata.jpeg import check_jpeg, jpeg_size
from clipdata.lists import Sample
from clipdata.pkl import StaleIndexError, read_indexed_frames, read_pkl, read_pkl_index
from clipdata.video import VideoError, VideoFacts, decode_frames, probe, resolution_change_message, stream_info
from common.log import get_logger
from common.processes import ParallelMap

from . import crops
from .clipspec import ClipSpec
from .sampling import sample_indices

log = get_logger(__name__)  # a feed worker forks with its handlers; logging re-creates their locks in the child


class LabelError(DataFormatError):
    """A label outside the model's classes: the list and the config disagree, so the run stops."""


def load_sample(spec: ClipSpec, s: Sample, key: tuple, facts: VideoFacts | None = None):
    """One sample's DALI inputs: ``(row, new_facts)``. ``key`` seeds its randomness (the loader passes
    (seed, rank, epoch, position)); ``facts`` is what an earlier probe knows of a video, and
    ``new_facts`` what this call had to establish again (the video was new or had changed), else None.
    Raises DataFormatError / VideoError / OSError for an unreadable sample, LabelError for a bad label."""
    rng = np.random.default_rng(key)
    label, new_facts = s.label, None
    if spec.source == "pkl":
        label, data = _pkl_frames(s.path, spec, rng)
        width, height = _frame_size(data)
    elif spec.source == "rawframes":
        data = _rawframes(s, spec, rng)
        width, height = _frame_size(data)
    elif spec.decode == "frames":
        data, new_facts = _decoded_frames(s, spec, rng, facts)
        height, width = data[0].shape[1:3]
    else:
        data, new_facts, (width, height) = _video_bytes(s, spec, rng, facts)
    if not (width > 0 and height > 0):  # the crop windows divide by them
        raise DataFormatError(f"frames of {width}x{height} pixels")
    if spec.num_classes is not None and not 0 <= label < spec.num_classes:
        raise LabelError(
            f"{s.path} (list line {s.line}): label {label} is outside "
            f"[0, {spec.num_classes}); check the list against the label file"
        )
    if spec.decode == "jpeg":
        data = [np.frombuffer(d, np.uint8) for d in data]
    args = [a for win, flip in _views(spec, width, height, rng) for a in (win[:2], win[2:], np.array(flip, np.int32))]
    return (*data, *args, np.array(label, np.int64)), new_facts


def _views(spec: ClipSpec, width: int, height: int, rng) -> list:
    """[(crop window, flip)]: one random view in training, the fixed test views otherwise."""
    if spec.mode != "train":
        return crops.test_windows(width, height, spec.target_size, spec.short_size, spec.num_crops)
    if spec.crop == "multiscale":
        win = crops.multiscale_window(width, height, rng, spec.target_size, spec.short_size)
    else:
        win = crops.random_resized_window(width, height, rng)
    return [(win, spec.flip and rng.random() < 0.5)]


def _rawframes(s: Sample, spec: ClipSpec, rng) -> list[bytes]:
    """The sampled JPEG files of a rawframes folder (``img_00001.jpg`` is frame 0)."""
    data = []
    for i in _indices(spec, s.num_frames, rng):
        path = os.path.join(s.path, f"img_{i + 1:05d}.jpg")
        try:
            with open(path, "rb") as f:
                data.append(check_jpeg(f.read()))
        except FileNotFoundError:
            raise DataFormatError(f"the list says {s.num_frames} frames but {path} is missing") from None
    return data


def _decoded_frames(s: Sample, spec: ClipSpec, rng, facts: VideoFacts | None) -> tuple[list, VideoFacts | None]:
    """([the sampled frames decoded by PyAV, [T, H, W, 3]], new facts): the CPU path for videos."""
    num_frames, new_facts = s.num_frames, None
    if not num_frames:  # the count came from a probe: trust it only for the file it was taken of
        current = _current(s.path, facts, os.stat(s.path), spec, need_packets=False)
        new_facts, num_frames = (current if current is not facts else None), current.frames
    return [decode_frames(s.path, _indices(spec, num_frames, rng), num_frames, threads="NONE")], new_facts


def _video_bytes(s: Sample, spec: ClipSpec, rng, facts: VideoFacts | None) -> tuple[list, VideoFacts | None, tuple]:
    """(NVDEC's inputs: the file's bytes, the sampled indices, mirror and angle; new facts; (width,
    height)): the GPU path for videos."""
    with open(s.path, "rb") as f:
        st = os.fstat(f.fileno())
        raw = f.read()
    current = _current(s.path, facts, st, spec, need_packets=True, data=raw, listed=s.num_frames)
    num_frames = s.num_frames or current.frames
    if current.size_change:  # NVDEC is not known to rescale mid-stream: skipped rather than trusted
        raise VideoError(resolution_change_message(s.path, current))
    if current.packets < num_frames:  # NVDEC would pad silently: catch a wrong count here
        raise VideoError(f"{s.path}: has {current.packets} frames, fewer than the {num_frames} the list promised")
    # NVDEC ignores the display matrix: the graph turns the frames upright (loader._upright)
    data = [
        np.frombuffer(raw, np.uint8),
        _indices(spec, num_frames, rng),
        np.array(current.mirror, np.int32),
        np.array(90.0 * current.turns, np.float32),
    ]
    return data, (current if current is not facts else None), (current.width, current.height)


def _indices(spec: ClipSpec, num_frames: int, rng) -> np.ndarray:
    return sample_indices(
        num_frames, spec.num_segments, spec.mode, rng, spec.num_clips, spec.sampling, spec.dense_interval
    )


def _pkl_frames(path: str, spec: ClipSpec, rng) -> tuple[int, list[bytes]]:
    """(label, the sampled JPEGs): through the frame index when the file has one made of it as it is,
    else read whole (an index older than the file's last change describes bytes that may be gone)."""
    with open(path, "rb") as f:
        fd = f.fileno()
        st = os.fstat(fd)
        try:
            index = read_pkl_index(fd, st.st_size, st.st_mtime_ns)
        except StaleIndexError as e:
            index = None
            _note_stale_index(path, str(e))
        if index is not None:
            return index.label, read_indexed_frames(fd, index, _indices(spec, index.num_frames, rng))
    _, label, frames = read_pkl(path)
    if not frames:
        raise DataFormatError("the pkl holds no frames")
    return label, [check_jpeg(frames[i]) for i in _indices(spec, len(frames), rng)]


_stale_noted = []  # per process: the first pkl read whole for a stale index is named, the rest counted


def _note_stale_index(path: str, why: str) -> None:
    if not _stale_noted:
        log.warning(
            f"dali_pipelines: {path}: {why}; read whole instead (slower, never the old frames). Give changed or "
            "copied files a new index: python preprocessing/build_list.py pkl DIR LIST --index N"
        )
    _stale_noted.append(path)


def _frame_size(jpegs: list[bytes]) -> tuple[int, int]:
    """The frames' common size: one crop window serves them all, so they must agree."""
    sizes = {jpeg_size(j) for j in jpegs}
    if len(sizes) != 1:
        raise DataFormatError(f"the sampled frames differ in size ({sorted(sizes)}); regenerate the clip")
    return sizes.pop()


def _current(
    path: str,
    facts: VideoFacts | None,
    st: os.stat_result,
    spec: ClipSpec,
    need_packets: bool,
    data: bytes | None = None,
    listed: int = 0,
) -> VideoFacts:
    """``facts`` if they were taken of this very file (size and mtime) and hold what is needed, else
    what probing the file now establishes: a changed file is probed again, never trusted. Facts that
    found the file unreadable raise its VideoError."""
    if facts is not None and facts.describes(st) and (facts.packets is not None or facts.error or not need_packets):
        if facts.error:
            raise VideoError(facts.error)
        return facts
    if data is not None and listed:  # the list gives the count; the GPU path needs the packets only
        packets, layout = stream_info(data, path)
        return VideoFacts.of_file(st, frames=listed, packets=packets, layout=layout)
    return probe(path, spec.allow_partial_videos)


# what makes a sample unreadable (it is skipped and reported) and what stops the run
UNREADABLE = (DataFormatError, VideoError, OSError)


def sample_pool(spec: ClipSpec, num_workers: int, ahead: int, timeout: float) -> ParallelMap:
    """``load_sample(spec, ...)`` in ``num_workers`` processes: an unreadable sample is an ("error",
    message) result, a label outside the model's classes a ("fatal", message) one."""
    return ParallelMap(
        functools.partial(load_sample, spec),
        num_workers,
        ahead=ahead,
        timeout=timeout,
        skip=UNREADABLE,
        fatal=(LabelError,),
    )
