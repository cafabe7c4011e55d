"""Every GPU graph the loader can make, defined without a GPU (device_id=None), serialised, and checked
operator by operator against DALI's own schemas: each operator exists on the device it is placed on,
every argument is one the operator has (and not deprecated), constants have the argument's type, argument
inputs come from the CPU, the decoders are the GPU ones and everything after them runs on the GPU, both
outputs leave on the GPU, and a batch of the loader's own feed fits the graph's inputs.
DALI itself checks argument names and input devices while a graph is defined; these tests make sure
every GPU-only branch is defined in CI, and add what DALI leaves to build or run time (see docs/design.md
"GPU graphs checked without a GPU")."""

import ast
import numbers
import os
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest

from clipdata.pkl import write_pkl
from dali_pipelines import loader
from dali_pipelines.loader import define_pipeline, plan_loader
from tools.media import index_frames, jpeg, write_video

INTERNAL_ARGS = {"device", "preserve_name"}  # set by DALI's Python layer on every operator
DECODERS = {"jpeg-1": "decoders__ImageSlice", "jpeg-n": "decoders__Image", "video": "decoders__Video"}
# what a decoder's regular inputs must be when they come from the feed; DALI converts nothing, and an
# integer anchor or shape would be read as pixels, not as fractions of the frame
DECODER_INPUTS = {
    "decoders__Image": [(np.uint8, 1)],
    "decoders__ImageSlice": [(np.uint8, 1), (np.float32, 1), (np.float32, 1)],
    "decoders__Video": [(np.uint8, 1)],
}
# fn calls of loader.py that no GPU graph makes: videos reach the CPU graph as frames PyAV decoded
CPU_ONLY_CALLS = {"reshape"}


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


@dataclass
class Graph:
    """A GPU graph defined without a GPU, and what its definition handed DALI before DALI converted it."""

    src: object  # the loader's external source (its ClipSpec is src.spec)
    pipe: object = None
    arguments: list = field(default_factory=list)  # (schema, argument, value as given) of each constant
    argument_inputs: list = field(default_factory=list)  # (schema, argument, name of the data node)
    feed_outputs: list = field(default_factory=list)  # names of the external source's outputs, row order


def _record(mp, graph):
    """Watch DALI 2.4's ops module while a graph is defined. Constants are converted there with int(),
    bool(), float() and str() (``antialias="False"`` becomes True), so their types are seen before."""
    from nvidia.dali import fn, ops

    add_args, add_arg_inputs, external_source = ops._add_spec_args, ops._process_argument_inputs, fn.external_source

    def args_seen(schema, spec, kwargs):
        graph.arguments += [(schema.Name(), k, v) for k, v in kwargs.items() if v is not None]
        return add_args(schema, spec, kwargs)

    def arg_inputs_seen(schema, spec, kwargs, operator_name):
        graph.argument_inputs += [(schema.Name(), k, v.name) for k, v in kwargs.items() if hasattr(v, "name")]
        return add_arg_inputs(schema, spec, kwargs, operator_name)

    def external_source_seen(*args, **kwargs):
        outs = external_source(*args, **kwargs)
        graph.feed_outputs += [o.name for o in (outs if isinstance(outs, (list, tuple)) else [outs])]
        return outs

    mp.setattr(ops, "_add_spec_args", args_seen)
    mp.setattr(ops, "_process_argument_inputs", arg_inputs_seen)
    mp.setattr(fn, "external_source", external_source_seen)


def gpu_graph(lists, source, mode, **settings) -> Graph:
    """The loader's own plan for a GPU, defined with device_id=None (no GPU needed), its graph built and
    handed to DALI's C++ pipeline by serialize()."""
    src, how = plan_loader(
        lists[source],
        source,
        mode,
        **{"num_segments": 3, **settings},
        batch_size=1,
        target_size=32,
        short_size=32,
        device="gpu",
        num_workers=0,
    )
    assert how["device"] == "gpu" and how["device_id"] is not None  # what build_loader would run on
    graph = Graph(src)
    with pytest.MonkeyPatch.context() as mp:
        _record(mp, graph)
        graph.pipe = define_pipeline(src, **{**how, "device_id": None})
        graph.pipe._build_graph()
    assert graph.pipe.serialize()
    return graph


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


def _fits(dtype, value) -> bool | None:
    """Whether a Python constant is one of DALI type ``dtype`` as given (None: a type this check does not
    know). A bool passes for an integer (DALI's flags), never for a float, a string or an enum."""
    from nvidia.dali import types

    t = types.DALIDataType
    if dtype in types._vector_types:  # a list, or one value DALI makes a list of
        values = list(value) if isinstance(value, (list, tuple, np.ndarray)) else [value]
        verdicts = [_fits(types._vector_types[dtype], v) for v in values]
        return None if None in verdicts else all(verdicts)
    ints = {t.INT8, t.INT16, t.INT32, t.INT64, t.UINT8, t.UINT16, t.UINT32, t.UINT64}
    if dtype == t.BOOL:
        return isinstance(value, (bool, np.bool_))
    if dtype in ints:
        return isinstance(value, (numbers.Integral, np.bool_))
    if isinstance(value, (bool, np.bool_)):
        return False
    if dtype in (t.FLOAT, t.FLOAT16, t.FLOAT64):
        return isinstance(value, numbers.Real)
    if dtype in (t.STRING, t.TENSOR_LAYOUT):
        return isinstance(value, str)
    enums = {t.DATA_TYPE: types.DALIDataType, t.INTERP_TYPE: types.DALIInterpType, t.IMAGE_TYPE: types.DALIImageType}
    return isinstance(value, enums[dtype]) if dtype in enums else None


def argument_type_problems(graph: Graph) -> list[str]:
    """Constants given with a type other than their argument's (DALI would convert them silently)."""
    from nvidia.dali import backend

    problems = []
    for name, arg, value in graph.arguments:
        if arg.startswith("_"):
            continue
        dtype = backend.GetSchema(name).GetArgumentType(arg)
        fits = _fits(dtype, value)
        if fits is None:
            problems.append(f"{name}: argument {arg!r} is a {dtype}, which this check does not know")
        elif not fits:
            problems.append(f"{name}: argument {arg!r} is a {dtype}, given {value!r}")
    return problems


def feed_batch(graph: Graph):
    """One batch of the loader's own external source, as DALI would get it (the feed needs no GPU)."""
    try:
        return graph.src(SimpleNamespace(iteration=0))
    finally:
        graph.src.feed.close()


def feed_problems(graph: Graph, columns) -> list[str]:
    """Where a feed batch does not fit the graph: a column count other than the external source's
    outputs, a column nothing takes, or a dtype or rank DALI refuses at run time (it converts nothing;
    a scalar argument takes a 0-d or 1-element array, a list argument a 1-d array)."""
    from nvidia.dali import backend, types

    index = {name: k for k, name in enumerate(graph.feed_outputs)}
    problems = []
    if len(columns) != len(index):
        problems.append(f"the feed gives {len(columns)} columns, the graph has {len(index)}")
    want = {}  # column -> (who takes it, dtype, rank)
    for name, arg, node in graph.argument_inputs:
        if node in index:
            dtype = backend.GetSchema(name).GetArgumentType(arg)
            element = types._vector_types.get(dtype, dtype)
            rank = 1 if dtype in types._vector_types else 0
            want[index[node]] = (f"{name} argument {arg!r}", np.dtype(types.to_numpy_type(element)), rank)
    for name, _, _, inputs in operators(graph.pipe):
        for i, (node, _, is_argument) in enumerate(inputs):
            if node in index and not is_argument:
                if name not in DECODER_INPUTS:
                    problems.append(f"{name} input {i} comes from the feed: this check has no rule for it")
                    continue
                dtype, rank = DECODER_INPUTS[name][i]
                want[index[node]] = (f"{name} input {i}", np.dtype(dtype), rank)
    outputs = {index[o.name] for o in graph.pipe._graph_outputs if o.name in index}  # the label
    idle = sorted(set(index.values()) - set(want) - outputs)
    problems += [f"feed column {k} ({graph.feed_outputs[k]}) is taken by nothing" for k in idle]
    for k, (who, dtype, rank) in sorted(want.items()):
        for a in columns[k] if k < len(columns) else []:
            a = np.asarray(a)
            if a.dtype != dtype or not (a.ndim == rank or (rank == 0 and a.shape == (1,))):
                problems.append(f"feed column {k} for {who}: {a.dtype} of shape {a.shape}, want {dtype} of rank {rank}")
                break
    return problems


def gpu_path_problems(graph: Graph, dtype) -> list[str]:
    """What makes a graph not the GPU path: a CPU decoder, CPU work after decoding, CPU outputs."""
    from nvidia.dali import types

    pipe, spec = graph.pipe, graph.src.spec
    ops = operators(pipe)
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


SETTINGS = [
    ("train", {}),
    ("train", {"dtype": "float16", "crop": "random_resized"}),
    ("train", {"num_segments": 1}),
    ("train", {"sampling": "dense"}),
    ("val", {"num_segments": 8}),
    ("test", {"num_clips": 2, "num_crops": 1}),
    ("test", {"num_clips": 2, "num_crops": 3, "dtype": "float16"}),
    ("test", {"num_crops": 10}),
    ("test", {"sampling": "dense", "num_clips": 2, "num_crops": 3}),
]
VARIANTS = [
    pytest.param(source, mode, settings, id=f"{source}-{mode}-" + "-".join(f"{k}{v}" for k, v in settings.items()))
    for source in ("pkl", "rawframes", "videos")
    for mode, settings in SETTINGS
]


@pytest.mark.parametrize("source, mode, settings", VARIANTS)
def test_every_gpu_graph_variant_agrees_with_dalis_schemas(lists, source, mode, settings):
    graph = gpu_graph(lists, source, mode, **settings)
    assert schema_problems(graph.pipe) == []
    assert argument_type_problems(graph) == []
    assert gpu_path_problems(graph, settings.get("dtype", "float32")) == []
    assert feed_problems(graph, feed_batch(graph)) == []
    if source == "videos":  # NVDEC frames are turned upright in the graph (rotated videos)
        names = [name for name, *_ in operators(graph.pipe)]
        assert names.index("decoders__Video") < names.index("Flip") < names.index("Rotate")


def _fn_calls(path) -> dict[int, str]:
    """{line: name} of every ``fn.…(…)`` call in a Python file."""
    calls = {}
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Call):
            parts, f = [], node.func
            while isinstance(f, ast.Attribute):
                parts, f = [f.attr, *parts], f.value
            if isinstance(f, ast.Name) and f.id == "fn":
                calls[node.lineno] = ".".join(parts)
    return calls


def _defined_at(args, path) -> int | None:
    """The line of ``path`` an operator was defined on (DALI records the definition's stack)."""
    files = args.get("_origin_stack_filename", "").strip("[]").split(", ")
    lines = args.get("_origin_stack_lineno", "").strip("[]").split(", ")
    here = [int(n) for f, n in zip(files, lines) if f and os.path.abspath(f) == path]
    return here[-1] if here else None


def test_every_operator_call_of_the_loader_is_in_some_gpu_graph(lists):
    """A new branch of the graph that no variant above reaches would escape every check: fail instead."""
    path = os.path.abspath(loader.__file__)
    reached = set()
    for param in VARIANTS:
        source, mode, settings = param.values
        graph = gpu_graph(lists, source, mode, **settings)
        reached |= {_defined_at(args, path) for _, _, args, _ in operators(graph.pipe)}
    assert None not in reached  # every operator of these graphs is made in loader.py, where DALI saw it
    calls = _fn_calls(path)
    assert CPU_ONLY_CALLS <= set(calls.values())
    missed = [f"line {n}: fn.{name}" for n, name in sorted(calls.items()) if n not in reached]
    assert [m for m in missed if m.split("fn.")[1] not in CPU_ONLY_CALLS] == []


def test_the_check_finds_an_operator_on_a_device_it_does_not_exist_on():
    """DALI defines fn.rotate(device="mixed") without complaint; only the build (on a GPU) would fail."""
    from nvidia.dali import fn, pipeline_def

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)], batch=True)
        return fn.rotate(x, angle=90, device="mixed")

    pipe = graph()
    pipe._build_graph()
    assert schema_problems(pipe) == ["Rotate: has no mixed implementation"]


def test_the_check_finds_constants_dali_would_convert_silently():
    """bool("False") is True, int(1.5) is 1, and float("32") is 32.0: DALI defines all of them."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def graph():
        x = fn.external_source(source=lambda: [np.zeros((4, 4, 3), np.uint8)], batch=True).gpu()
        x = fn.resize(x, resize_x="32", resize_y=32, antialias="False")
        x = fn.rotate(x, angle=90, keep_size=False, interp_type=1)
        return fn.crop_mirror_normalize(x, dtype=types.FLOAT16, mean=[0.5, 1], std=0.5, mirror=True)

    recorded = Graph(src=None)
    with pytest.MonkeyPatch.context() as mp:
        _record(mp, recorded)
        recorded.pipe = graph()
        recorded.pipe._build_graph()
    assert argument_type_problems(recorded) == [
        "Resize: argument 'resize_x' is a DALIDataType.FLOAT, given '32'",
        "Resize: argument 'antialias' is a DALIDataType.BOOL, given 'False'",
        "Rotate: argument 'interp_type' is a DALIDataType.INTERP_TYPE, given 1",
    ]


def test_the_feed_check_finds_columns_dali_would_refuse_on_the_gpu(lists):
    """The video columns only NVDEC and the upright turn take: wrong dtypes, and a missing column."""
    graph = gpu_graph(lists, "videos", "val")
    columns = list(feed_batch(graph))
    raw, indices, mirror, angle = (c[0] for c in columns[:4])
    columns[1:4] = [[indices.astype(np.int64)], [mirror.astype(bool)], [angle.astype(np.float64)]]
    assert feed_problems(graph, columns) == [
        "feed column 1 for decoders__Video argument 'frames': int64 of shape (3,), want int32 of rank 1",
        "feed column 2 for Flip argument 'horizontal': bool of shape (), want int32 of rank 0",
        "feed column 3 for Rotate argument 'angle': float64 of shape (), want float32 of rank 0",
    ]
    assert feed_problems(graph, columns[:-1])[0] == "the feed gives 7 columns, the graph has 8"


def test_the_gpu_path_check_finds_cpu_work_and_cpu_outputs(lists):
    graph = gpu_graph(lists, "pkl", "val")
    graph.pipe = define_pipeline(graph.src, device="cpu", device_id=None, num_threads=1, prefetch=1, dtype="float32")
    graph.pipe._build_graph()
    problems = gpu_path_problems(graph, "float32")
    assert problems[0].startswith("decoders [('decoders__ImageSlice', 'cpu'), ")
    assert "Resize runs on the cpu" in problems and "outputs on ['cpu', 'cpu'], want both on the GPU" in problems
    assert gpu_path_problems(graph, "float16")[-1].startswith(
        "CropMirrorNormalize dtypes ['9'], want DALIDataType.FLOAT16"
    )
