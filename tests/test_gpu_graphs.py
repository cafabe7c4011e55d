"""Every GPU graph the loader can make, defined without a GPU (device_id=None) and checked operator by
operator against DALI's own schemas: each operator exists on the device it is placed on, every
argument is one the operator has (and not deprecated), argument inputs come from the CPU, the decoders
are the GPU ones and everything after them runs on the GPU, and both outputs leave on the GPU.
DALI itself checks argument names, constant types and input devices while a graph is defined; these
tests make sure every GPU-only branch is defined in CI, and add what DALI leaves to build time."""

import os

import numpy as np
import pytest

from dali_pipelines.formats import write_pkl
from dali_pipelines.loader import define_pipeline, plan_loader

from .media import index_frames, jpeg, write_video

INTERNAL_ARGS = {"device", "preserve_name"}  # set by DALI's Python layer on every operator
DECODERS = {"jpeg-1": "decoders__ImageSlice", "jpeg-n": "decoders__Image", "video": "decoders__Video"}


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    """Tiny pkl, rawframes and videos lists (the graph depends on the settings, not on the data)."""
    root = tmp_path_factory.mktemp("graphs")
    frames = index_frames(12)
    write_pkl(str(root / "c.pkl"), "c", 0, [jpeg(f) for f in frames])
    (root / "pkl.list").write_text("c.pkl\n")
    os.makedirs(root / "raw")
    for i, f in enumerate(frames):
        (root / "raw" / f"img_{i + 1:05d}.jpg").write_bytes(jpeg(f))
    (root / "raw.list").write_text("raw 12 0\n")
    write_video(root / "v.mp4", frames)
    (root / "vid.list").write_text("v.mp4 12 0\n")
    return {"pkl": str(root / "pkl.list"), "rawframes": str(root / "raw.list"), "videos": str(root / "vid.list")}


def gpu_graph(lists, source, mode, **settings):
    """The loader's own plan for a GPU, defined with device_id=None (no GPU needed) and its graph built."""
    src, how = plan_loader(
        lists[source],
        source,
        mode,
        batch_size=1,
        target_size=32,
        short_size=32,
        device="gpu",
        num_workers=0,
        **settings,
    )
    assert how["device"] == "gpu" and how["device_id"] is not None  # what build_loader would run on
    pipe = define_pipeline(src, **{**how, "device_id": None})
    pipe._build_graph()
    return src, pipe


def operators(pipe):
    """[(schema name, device, {argument: value text}, [(input, device, is argument input)])] of a graph."""
    out = []
    for op in pipe._ops:
        spec = op.spec
        lines = str(spec).splitlines()
        name = lines[0].removeprefix("OpSpec for ").rstrip(":")
        args, section = {}, None
        for line in lines[1:]:
            if not line.startswith("    "):
                section = line.strip().rstrip(":")
            elif section == "Arguments":
                key, _, value = line.strip().partition(": ")
                args[key] = value
        inputs = [(spec.InputName(i), spec.InputDevice(i), i >= spec.NumRegularInput()) for i in range(spec.NumInput())]
        out.append((name, args.get("device"), args, inputs))
    return out


def schema_problems(pipe) -> list[str]:
    """What DALI's schemas say is wrong with a defined graph ([] when nothing)."""
    from nvidia.dali import backend

    registered = {
        "cpu": set(backend.RegisteredCPUOps()),
        "gpu": set(backend.RegisteredGPUOps()),
        "mixed": set(backend.RegisteredMixedOps()),
    }
    problems = []
    for name, device, args, inputs in operators(pipe):
        schema = backend.TryGetSchema(name)
        if schema is None:
            problems.append(f"{name}: no such operator")
            continue
        if name not in registered.get(device, ()):
            problems.append(f"{name}: has no {device} implementation")
        for arg in args:
            if arg.startswith("_") or arg in INTERNAL_ARGS:
                continue
            if not schema.HasArgument(arg):
                problems.append(f"{name}: no argument {arg!r}")
            elif schema.IsDeprecatedArg(arg):
                problems.append(f"{name}: argument {arg!r} is deprecated")
        for inp, inp_device, is_argument in inputs:
            if is_argument and inp_device != "cpu":
                problems.append(f"{name}: argument input {inp} is on the {inp_device}")
            if device == "mixed" and inp_device != "cpu":
                problems.append(f"{name}: a mixed operator's input {inp} is on the {inp_device}")
    return problems


def gpu_path_problems(src, pipe, dtype) -> list[str]:
    """What makes a graph not the GPU path: a CPU decoder, CPU work after decoding, CPU outputs."""
    from nvidia.dali import types

    ops = operators(pipe)
    spec = src.spec
    want = DECODERS["video" if spec.decode == "video" else ("jpeg-1" if spec.num_crops == 1 else "jpeg-n")]
    problems = []
    decoders = [(name, device) for name, device, _, _ in ops if name.startswith("decoders__")]
    if not decoders or any(d != (want, "mixed") for d in decoders):
        problems.append(f"decoders {decoders}, want {want} on mixed (nvJPEG / NVDEC)")
    problems += [
        f"{name} runs on the {device}"
        for name, device, _, _ in ops
        if name != "ExternalSource" and not name.startswith("decoders__") and device != "gpu"
    ]
    outputs = [o.device for o in pipe._graph_outputs]
    if outputs != ["gpu", "gpu"]:
        problems.append(f"outputs on {outputs}, want both on the GPU")
    cmn = [args for name, _, args, _ in ops if name == "CropMirrorNormalize"]
    want_type = types.FLOAT16 if dtype == "float16" else types.FLOAT
    got = [a.get("dtype") for a in cmn]
    if len(cmn) != spec.num_crops or any(t != str(int(want_type)) for t in got):  # the spec shows the enum's value
        problems.append(f"CropMirrorNormalize dtypes {got}, want {want_type} ({int(want_type)}) per view")
    return problems


VARIANTS = [
    pytest.param(source, mode, settings, id=f"{source}-{mode}-" + "-".join(f"{k}{v}" for k, v in settings.items()))
    for source in ("pkl", "rawframes", "videos")
    for mode, settings in [
        ("train", {}),
        ("train", {"dtype": "float16", "crop": "random_resized"}),
        ("val", {}),
        ("test", {"num_clips": 2, "num_crops": 1}),
        ("test", {"num_clips": 2, "num_crops": 3, "dtype": "float16"}),
        ("test", {"num_crops": 10}),
        ("train", {"sampling": "dense"}),
    ]
]


@pytest.mark.parametrize("source, mode, settings", VARIANTS)
def test_every_gpu_graph_variant_agrees_with_dalis_schemas(lists, source, mode, settings):
    src, pipe = gpu_graph(lists, source, mode, num_segments=3, **settings)
    assert schema_problems(pipe) == []
    assert gpu_path_problems(src, pipe, settings.get("dtype", "float32")) == []
    if source == "videos":  # NVDEC frames are turned upright in the graph (rotated videos)
        names = [name for name, *_ in operators(pipe)]
        assert names.index("decoders__Video") < names.index("Flip") < names.index("Rotate")


def test_the_check_finds_an_operator_on_a_device_it_does_not_exist_on(lists):
    """DALI defines fn.rotate(device="mixed") without complaint; only the build (on a GPU) would fail."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)], batch=True)
        return fn.rotate(x, angle=90, device="mixed")

    pipe = graph()
    pipe._build_graph()
    assert schema_problems(pipe) == ["Rotate: has no mixed implementation"]


def test_the_gpu_path_check_finds_cpu_work_and_cpu_outputs(lists):
    src, _ = gpu_graph(lists, "pkl", "val")
    cpu = define_pipeline(src, device="cpu", device_id=None, num_threads=1, prefetch=1, dtype="float32")
    cpu._build_graph()
    problems = gpu_path_problems(src, cpu, "float32")
    assert problems[0].startswith("decoders [('decoders__ImageSlice', 'cpu'), ")
    assert "Resize runs on the cpu" in problems and "outputs on ['cpu', 'cpu'], want both on the GPU" in problems
    assert gpu_path_problems(src, cpu, "float16")[-1].startswith(
        "CropMirrorNormalize dtypes ['9'], want DALIDataType.FLOAT16"
    )
