"""ClipSpec: one clip spec from the config (``ClipSpec.from_config``), the one the loader, export's
preprocessing.json, predict and the clip scorer take; build_loader's documented keywords."""

import inspect
import subprocess
import sys

import numpy as np
import pytest

from dali_pipelines.clipspec import ClipSpec
from tools.media import index_frames, write_video
from trainer import dist, engine, predict
from trainer.clip_scorer import clip_spec
from trainer.config import SCHEMA
from trainer.export import config_for_exported, preprocessing_settings

from .tiny import ROOT, tiny_cfg

VIEWS = ["PIPELINE.test_num_clips=2", "PIPELINE.test_num_crops=3", "PIPELINE.test_num_segments=5"]
SIZES = ["PIPELINE.target_size=16", "PIPELINE.short_size=20", "PIPELINE.num_segments=3"]


def _video_cfg(tmp_path, *overrides):
    write_video(str(tmp_path / "c.mp4"), index_frames(12))
    (tmp_path / "l.txt").write_text("c.mp4 1\n")
    (tmp_path / "labels.txt").write_text("0 a\n1 b\n2 c\n")
    return tiny_cfg(
        tmp_path,
        "DATASET.source=videos",
        f"DATASET.test_list={tmp_path / 'l.txt'}",
        f"DATASET.train_list={tmp_path / 'l.txt'}",
        f"DATASET.label_file={tmp_path / 'labels.txt'}",
        "DATASET.batch_size=1",
        "DATASET.num_workers=0",
        *overrides,
        num_classes=3,
    )


def test_the_trainers_loaders_read_the_clip_from_config(tmp_path):
    cfg = _video_cfg(tmp_path, *VIEWS, *SIZES)
    env = dist.Env(0, 1, "cpu", None)
    for mode in ("train", "test"):
        loader = engine.make_loader(cfg, env, mode)
        try:
            assert loader._source.spec == ClipSpec.from_config(cfg, mode, device="cpu")
        finally:
            loader.close()
    test = ClipSpec.from_config(cfg, "test")
    assert (test.num_segments, test.num_clips, test.num_crops, test.views) == (5, 2, 3, 30)
    train = ClipSpec.from_config(cfg, "train")
    assert (train.num_segments, train.num_clips, train.num_crops, train.views) == (3, 1, 1, 3)
    assert (test.decode, ClipSpec.from_config(cfg, "test", device="gpu").decode) == ("frames", "video")


def test_preprocessing_json_states_the_test_clip_from_config(tmp_path):
    cfg = _video_cfg(tmp_path, *VIEWS, *SIZES, "PIPELINE.sampling=dense", "PIPELINE.dense_interval=2")
    spec = ClipSpec.from_config(cfg, "test")
    settings = preprocessing_settings(cfg, ["a", "b", "c"])
    for key in ("num_segments", "num_clips", "num_crops", "target_size", "short_size", "sampling", "dense_interval"):
        assert settings[key] == getattr(spec, key), key
    assert settings["input_shape"] == [None, spec.views, 3, spec.target_size, spec.target_size]
    # and predict --exported reads the same clip back from the file
    assert ClipSpec.from_config(config_for_exported(cfg, settings, str(tmp_path)), "test") == spec


def test_predict_and_the_clip_scorer_take_the_test_clip_from_config(tmp_path, monkeypatch):
    cfg = _video_cfg(tmp_path, *VIEWS, *SIZES)
    seen = []

    def make_loader(*args, **kwargs):
        seen.append(engine.make_loader(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(predict, "make_loader", make_loader)
    scorer = lambda imgs: np.zeros((imgs.shape[0], 3), np.float32)  # noqa: E731
    predict.predict(cfg, dist.Env(0, 1, "cpu", None), scorer, str(tmp_path / "c.mp4"))
    unlabelled = ClipSpec.from_config(cfg, "test", source="videos", labelled=False)
    assert seen[0]._source.spec == unlabelled and unlabelled.num_classes is None
    assert clip_spec(cfg) == unlabelled  # the folder, timeline and stream paths' clip


def test_the_configs_clip_defaults_are_the_loaders():
    create = inspect.signature(ClipSpec.create).parameters
    p = SCHEMA["PIPELINE"]
    for key in ("num_segments", "target_size", "short_size", "crop", "flip", "sampling", "dense_interval"):
        assert p[key].default == create[key].default, key
    assert (p["test_num_clips"].default, p["test_num_crops"].default) == (1, 1)


def test_build_loaders_clip_keywords_have_the_specs_defaults():
    """build_loader spells the clip's keywords out for its readers; they must not drift from ClipSpec.create's."""
    from dali_pipelines.loader import build_loader

    create = inspect.signature(ClipSpec.create).parameters
    loader = inspect.signature(build_loader).parameters
    for name, param in create.items():
        if name != "cls":
            assert loader[name].default == param.default, name


def test_views_beyond_one_count_in_test_mode_only_and_bad_settings_are_named():
    assert ClipSpec.create("pkl", "val", num_clips=4, num_crops=10).views == 3
    assert ClipSpec.create("pkl", "test", num_clips=4, num_crops=10).views == 120
    for bad, message in (
        (dict(source="mp4"), "source must be one of"),
        (dict(mode="eval"), "mode must be one of"),
        (dict(device="tpu"), "device must be 'cpu' or 'gpu'"),
        (dict(crop="centre"), "crop must be one of"),
        (dict(num_crops=5), "num_crops must be 1, 3 or 10"),
    ):
        with pytest.raises(ValueError, match=message):
            ClipSpec.create(**bad)


def test_a_spec_runs_only_on_the_device_it_was_made_for():
    from dali_pipelines.loader import LoaderRun, plan_spec

    gpu_videos = ClipSpec.create("videos", "val", device="gpu")  # NVDEC's decode
    with pytest.raises(ValueError, match="'video' clip spec does not run on device 'cpu'"):
        plan_spec(None, gpu_videos, LoaderRun(device="cpu"))
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float16'"):
        LoaderRun(dtype="float64")


def test_build_loader_has_typed_keywords_each_documented():
    import dali_pipelines
    from dali_pipelines.loader import CLIP_KEYWORDS, RUN_KEYWORDS

    params = inspect.signature(dali_pipelines.build_loader).parameters
    keywords = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY]
    assert list(params)[:3] == ["list_file", "source", "mode"]
    assert sorted(keywords) == sorted(CLIP_KEYWORDS + RUN_KEYWORDS)
    assert all(p.annotation is not p.empty for p in params.values())
    doc = inspect.getdoc(dali_pipelines.build_loader)
    args = doc.split("Args:\n", 1)[1]
    assert [n for n in params if f"\n    {n}: " not in "\n" + args] == []


@pytest.mark.slow  # starts a Python process: the only way to see what a fresh import loads
def test_importing_the_package_loads_neither_dali_nor_paddle():
    code = (
        "import sys, dali_pipelines; dali_pipelines.build_loader; "
        "assert not {'nvidia.dali', 'paddle'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=60)
