"""The GPU host self-test (tools/selftest.py) under pytest, and the Paddle side of every GPU branch
that a CPU can run: the AMP training step, the inference Config calls checked against Paddle's own
signatures, TensorRT's shapes. Checks marked `gpu` skip with the reason on a machine without one."""

import re

import numpy as np
import paddle
import pytest

from tools import selftest
from trainer import export
from trainer.engine import train_step

from .tiny import tiny_model

GPU_CHECKS = [c for c in selftest.CHECKS if not c.bench]  # the benchmarks only print figures


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    return selftest.find_host(str(tmp_path_factory.mktemp("selftest")))


@pytest.mark.gpu
@pytest.mark.parametrize("check", GPU_CHECKS, ids=[c.name for c in GPU_CHECKS])
def test_selftest_check(check, host):
    status, detail = selftest.run_check(check, host)
    if status == selftest.SKIP:
        pytest.skip(detail)
    assert status == selftest.PASS, detail


def test_selftest_on_this_machine_fails_nothing_and_names_what_it_skipped(capsys, tmp_path):
    report = tmp_path / "report.txt"
    assert selftest.main(["--no-bench", "--report", str(report)]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    assert len(lines) == len(GPU_CHECKS)
    assert all(re.match(r"(PASS|SKIP) [\w-]+ \(\d+s\): \S", ln) for ln in lines), lines
    assert "PASS dlpack-cpu" in out and re.search(r"selftest: \d+ passed, 0 failed, \d+ skipped", out)
    text = report.read_text()
    assert f"Paddle: {paddle.__version__}" in text and "DALI: " in text and "GPUs Paddle sees: " in text
    assert all(ln in text for ln in (re.sub(r" \(\d+s\)", "", x).split(":")[0] for x in lines))


def test_a_failing_check_is_a_fail_line_a_nonzero_exit_and_its_traceback_in_the_report(monkeypatch, capsys, tmp_path):
    def broken(host):
        raise AssertionError("frame 3 decoded as frame 4")

    monkeypatch.setattr(selftest, "CHECKS", (selftest.Check("broken", broken),))
    report = tmp_path / "report.txt"
    assert selftest.main(["--report", str(report)]) == 1
    out = capsys.readouterr().out
    assert "FAIL broken" in out and f"send {report}" in out
    text = report.read_text()
    assert "FAIL broken (0s): frame 3 decoded as frame 4" in text and "Traceback" in text and "in broken" in text


@pytest.mark.parametrize(
    "text, version",
    [
        ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n", "550.54.14"),
        ("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  570.86.15  Release Build  (dvs)\n", "570.86.15"),
        ("no driver here\n", None),
    ],
)
def test_the_driver_version_is_read_from_what_the_kernel_module_reports(text, version):
    assert selftest.parse_driver_version(text) == version


@pytest.mark.parametrize(
    "driver, cuda, refused",
    [
        ("550.54.14", "12.6", ""),
        ("560.35.03", "12.6", ""),
        ("535.183.01", "12.6", "NVIDIA driver 535.183.01 is below 550.54.14, the lowest for this Paddle's CUDA 12.6"),
        ("560.35.03", "12.9", "NVIDIA driver 560.35.03 is below 575.51.03, the lowest for this Paddle's CUDA 12.9"),
        ("575.51.03", "12.9", ""),
        (None, "12.6", ""),  # no driver found: the gpu check says so instead
        ("470.82.01", "11.8", ""),  # a line without a known floor
    ],
)
def test_a_driver_below_the_floor_of_paddle_s_cuda_line_is_refused_in_one_line(driver, cuda, refused):
    got = selftest.driver_refusal(driver, cuda)
    assert got.startswith(refused) and ("\n" not in got) and bool(got) == bool(refused)
    if driver == "560.35.03" and cuda == "12.9":
        assert "or install GPU=cu126" in got  # the line this driver can run


def test_a_refused_driver_stops_the_selftest_after_its_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(selftest, "driver_version", lambda: "535.183.01")
    monkeypatch.setattr(paddle, "is_compiled_with_cuda", lambda: True)
    monkeypatch.setattr(paddle.version, "cuda", lambda: "12.6")
    assert selftest.main(["--no-bench", "--report", str(tmp_path / "r.txt")]) == 1
    out = capsys.readouterr().out
    assert [ln for ln in out.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))] == [
        "FAIL gpu (0s): NVIDIA driver 535.183.01 is below 550.54.14, the lowest for this Paddle's CUDA 12.6 build: "
        'upgrade the driver to 550.54.14 or later (docs/gpu.md "Driver")'
    ]


def test_the_frame_check_catches_a_decoder_that_returns_the_wrong_frames():
    from dali_pipelines.sampling import segment_indices

    want = segment_indices(selftest.CLIP_FRAMES[0], 3, "test", num_clips=2)
    levels = np.stack([np.full((3, 4, 4), 20 + 4 * i, np.float32) for i in want])[None]
    selftest._check_indices(levels, [0], "exact")
    with pytest.raises(AssertionError, match="gave frames"):
        selftest._check_indices(levels + 4, [0], "one frame late")  # every frame its successor


# ---------------------------------------------------------------- AMP: the trainer's own step


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", None])
def test_the_amp_training_step_runs_with_its_scaler_and_updates_the_weights(tmp_path, dtype):
    """The GPU branch's code (autocast, GradScaler for float16) on the CPU, where Paddle keeps the
    arithmetic in float32: the calls, the scaler's flow and the update are the trainer's own."""
    _, model = tiny_model(tmp_path)
    optimizer = paddle.optimizer.Momentum(0.05, parameters=model.parameters())
    scaler = paddle.amp.GradScaler() if dtype == "float16" else None
    before = {k: v.numpy().copy() for k, v in model.state_dict().items()}
    paddle.seed(1)
    imgs, labels = paddle.randn([2, 3, 3, 32, 32]), paddle.to_tensor([0, 4])
    loss, logits = train_step(model, optimizer, scaler, imgs, labels, dtype, rng=np.random.default_rng(0))
    assert np.isfinite(float(loss)) and list(logits.shape) == [2, 5]
    changed = [k for k, v in model.state_dict().items() if not np.array_equal(v.numpy(), before[k])]
    assert any("conv" in k or "weight" in k for k in changed)
    assert all(p.grad is None or not np.any(p.grad.numpy()) for p in model.parameters())  # cleared


# ---------------------------------------------------------------- Paddle Inference on a GPU


def _signature(method) -> list[tuple[str, bool]]:
    """(name, has default) of each parameter after self, from the pybind signature in the docstring."""
    first = method.__doc__.strip().splitlines()[0]
    params = first[first.index("(") + 1 : first.rindex(") ->")]
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(params + ","):  # split at the commas outside brackets (dict[str, list[int]])
        depth += {"[": 1, "]": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(params[start:i])
            start = i + 1
    return [(p.partition(":")[0].strip(), "=" in p.partition(":")[2]) for p in parts[1:]]


class SignatureCheckedConfig:
    """Stands in for paddle.inference.Config only where a CPU build cannot go (the GPU methods refuse to
    run without CUDA): every call is checked against the real Config method's signature and recorded."""

    def __init__(self):
        from paddle import inference

        self._real, self.calls = inference.Config, []

    def __getattr__(self, name):
        method = getattr(self._real, name)  # AttributeError: a method this Paddle does not have
        params = _signature(method)

        def call(*args, **kwargs):
            names = [n for n, _ in params]
            assert len(args) <= len(names), f"{name}: {len(args)} positional arguments, takes {names}"
            unknown = set(kwargs) - set(names)
            assert not unknown, f"{name}: no argument(s) {sorted(unknown)}; it takes {names}"
            given = set(names[: len(args)]) | set(kwargs)
            missing = [n for n, has_default in params if not has_default and n not in given]
            assert not missing, f"{name}: missing {missing}"
            self.calls.append((name, args, kwargs))

        return call


@pytest.mark.parametrize("device, tensorrt", [("gpu", None), ("gpu", "fp16"), ("gpu", "fp32"), ("cpu", None)])
def test_predictor_config_calls_exist_in_this_paddle_with_these_arguments(device, tensorrt):
    config = SignatureCheckedConfig()
    export.configure(config, device, 0, tensorrt, [None, 9, 3, 224, 224], 8, 2)
    names = [c[0] for c in config.calls]
    if device == "cpu":
        assert names == ["disable_gpu", "set_cpu_math_library_num_threads", "disable_glog_info"]
    elif tensorrt:
        assert names == ["enable_use_gpu", "enable_tensorrt_engine", "set_trt_dynamic_shape_info", "disable_glog_info"]
        shapes = config.calls[2][1]  # (min, max, optimal): batches of 1 to max_batch
        assert shapes == (
            {"clips": [1, 9, 3, 224, 224]},
            {"clips": [8, 9, 3, 224, 224]},
            {"clips": [8, 9, 3, 224, 224]},
        )
        assert config.calls[1][2]["max_batch_size"] == 8
    else:
        assert names == ["enable_use_gpu", "disable_glog_info"]


def test_the_signature_check_refuses_what_paddle_does_not_take():
    config = SignatureCheckedConfig()
    with pytest.raises(AssertionError, match="no argument"):
        config.enable_tensorrt_engine(max_batch=8)
    with pytest.raises(AttributeError):
        config.enable_tensorrt()
    with pytest.raises(AssertionError, match="missing"):
        config.enable_use_gpu(device_id=0)


def test_tensorrt_shapes_need_the_exported_input_shape():
    assert export.trt_shapes([None, 3, 3, 32, 32], 4) == ([1, 3, 3, 32, 32], [4, 3, 3, 32, 32], [4, 3, 3, 32, 32])
    with pytest.raises(export.ConfigError, match="re-export"):
        export.trt_shapes(None, 4)


def test_tensorrt_on_a_paddle_without_it_is_one_clear_error(tmp_path):
    if tuple(paddle.inference.get_trt_compile_version()) != (0, 0, 0):
        pytest.skip("this Paddle has TensorRT")
    (tmp_path / "inference.json").write_text("{}")
    (tmp_path / "inference.pdiparams").write_bytes(b"")
    with pytest.raises(export.ConfigError, match="built without TensorRT"):
        export.tensorrt_model(str(tmp_path / "inference.json"), str(tmp_path / "inference.pdiparams"), "fp16", None, 4)


# ---------------------------------------------------------------- TensorRT's runtime, export's reference


@pytest.mark.parametrize(
    "runtime, why",
    [
        (None, "TensorRT's Python runtime is not installed"),
        ("10.16.1.11", "TensorRT 10.16.1.11 is installed but this Paddle was built with TensorRT 10.5.0"),
        ("10.5.0.18", ""),
    ],
)
def test_tensorrt_is_usable_only_with_the_runtime_paddle_was_built_with(monkeypatch, runtime, why):
    """A GPU wheel built with TensorRT 10.5 (what get_trt_compile_version reports there), with no runtime,
    another one, or the same one installed (the `tensorrt` module stands in for the pip package)."""
    import sys
    import types

    monkeypatch.setattr(paddle.inference, "get_trt_compile_version", lambda: [10, 5, 0])
    monkeypatch.setitem(sys.modules, "tensorrt", runtime and types.SimpleNamespace(__version__=runtime))
    got = export.tensorrt_unavailable()
    assert got.startswith(why) if why else got == ""
    if why:
        assert "pip install tensorrt-cu12==10.5.0" in got and "EXTRAS=gpu,trt" in got


def test_tensorrt_without_its_runtime_is_one_config_error_before_paddle_tensorrt_is_imported(monkeypatch, tmp_path):
    import sys

    monkeypatch.setattr(paddle.inference, "get_trt_compile_version", lambda: [10, 5, 0])
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt raises ImportError
    (tmp_path / "inference.json").write_text("{}")
    (tmp_path / "inference.pdiparams").write_bytes(b"")
    with pytest.raises(export.ConfigError) as e:
        export.tensorrt_model(str(tmp_path / "inference.json"), str(tmp_path / "inference.pdiparams"), "fp16", None, 4)
    assert "\n" not in str(e.value) and "tensorrt-cu12==10.5.0" in str(e.value)


def test_export_reference_is_computed_on_the_cpu_and_equals_the_model(tmp_path):
    _, model = tiny_model(tmp_path)
    model.eval()
    places = []
    hook = model.register_forward_post_hook(lambda layer, inputs, out: places.append(str(out.place)))
    sample = np.random.default_rng(0).standard_normal([2, 3, 3, 32, 32]).astype(np.float32)
    got = export.reference_logits(model, sample)
    hook.remove()
    with paddle.no_grad():
        want = model(paddle.to_tensor(sample)).numpy()
    np.testing.assert_array_equal(got, want)
    assert places and all(p.startswith("Place(cpu") for p in places), places


@pytest.mark.parametrize(
    "device_id, visible, entry",
    [(1, None, "1"), (1, "2,3", "3"), (0, "GPU-aa,GPU-bb", "GPU-aa"), (1, "GPU-aa, GPU-bb", "GPU-bb")],
)
def test_tensorrt_conversion_on_a_rank_s_gpu_sees_that_gpu_as_its_device_0(device_id, visible, entry):
    """paddle.tensorrt.convert() works on CUDAPlace(0); the child that converts for GPU ``device_id`` is
    started with CUDA_VISIBLE_DEVICES naming that GPU alone."""
    assert export.visible_device(device_id, visible) == entry
