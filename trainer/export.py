"""Export: a Paddle Inference model (paddle.jit.save) with its preprocessing settings beside it, checked
against the dynamic model; ONNX through paddle2onnx where installed, checked with onnxruntime. The check
(one table: each backend's max |logit difference| and top-1 agreement with the dynamic model, on random
inputs or on real clips) is written to export_check.json; docs/deployment.md is the manual."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import sys

import numpy as np
import paddle

from clipdata.errors import DataFormatError
from dali_pipelines.clipspec import MEAN, STD, ClipSpec
from dali_pipelines.sampling import SAMPLINGS

from .config import SHIFT_MODELS, ConfigError
from .metrics import softmax

# exported scores must match the dynamic model's: probabilities within TOLERANCE, and logits within
# TOLERANCE of the largest logit once that exceeds 1 (float32 sums of a large logit carry its scale)
TOLERANCE = 1e-4
DEFAULT_OPSET = 13  # ONNX opset of export --onnx; 11 (PaddleVideo's paddle2onnx line) works too
MIN_OPSET = 7  # paddle2onnx's lowest
BACKENDS = ("paddle", "onnx", "tensorrt")  # predict --exported DIR --backend ...
CHECK_FILE = "export_check.json"


class ExportError(RuntimeError):
    """Export or an exported model cannot run as asked (a missing package, an opset too low for an
    operator, a disagreement with the dynamic model): one line for the user, no traceback."""


def score_difference(got: np.ndarray, expected: np.ndarray) -> float:
    """The larger of the probability difference and the logit difference relative to the logit scale."""
    logits = np.abs(got - expected).max() / max(1.0, float(np.abs(expected).max()))
    return float(max(np.abs(softmax(got) - softmax(expected)).max(), logits))


def input_shape(cfg) -> list:
    """The exported model's input: [batch, crops x clips x segments, 3, target_size, target_size]."""
    spec = ClipSpec.from_config(cfg, "test")
    return [None, spec.views, 3, spec.target_size, spec.target_size]


def preprocessing_settings(cfg, class_names: list[str]) -> dict:
    """What a deployment must do to a video before the model sees it: the test loader's clip
    (``ClipSpec.from_config(cfg, "test")``) and normalisation."""
    spec = ClipSpec.from_config(cfg, "test")
    return {
        "model": cfg.MODEL.name,
        "input": "clips",
        "input_shape": input_shape(cfg),
        "layout": "[batch, crops x clips x segments, RGB, height, width]",
        "num_segments": spec.num_segments,
        "num_clips": spec.num_clips,
        "num_crops": spec.num_crops,
        "target_size": spec.target_size,
        "short_size": spec.short_size,
        "mean": list(MEAN),
        "std": list(STD),
        "sampling": spec.sampling,
        "dense_interval": spec.dense_interval,
        "output": "logits (softmax for probabilities)",
        "class_names": class_names,
    }


def config_for_exported(cfg, settings: dict, folder: str):
    """``cfg`` with the test-time preprocessing an exported model was written with (its
    preprocessing.json), so that predict feeds it exactly what the test pipeline fed it at export."""
    if settings.get("model", cfg.MODEL.name) != cfg.MODEL.name:
        raise ConfigError(
            f"config error: {folder} holds a {settings['model']} model but the config sets "
            f"MODEL.name = {cfg.MODEL.name}"
        )
    missing = [k for k in ("num_segments", "num_clips", "num_crops", "target_size", "short_size") if k not in settings]
    if missing:
        raise FileNotFoundError(
            f"{folder}/preprocessing.json lacks {missing}; re-export with: bash run_dist.sh export MODEL CONFIG"
        )
    cfg = copy.deepcopy(cfg)
    cfg.PIPELINE.update(
        test_num_segments=settings["num_segments"],
        test_num_clips=settings["num_clips"],
        test_num_crops=settings["num_crops"],
        target_size=settings["target_size"],
        short_size=settings["short_size"],
        sampling=settings.get("sampling", "segment"),
        dense_interval=settings.get("dense_interval", 8),
    )
    if cfg.MODEL.name in SHIFT_MODELS:
        cfg.PIPELINE["num_segments"] = settings["num_segments"]
    return cfg


def read_preprocessing(folder: str) -> dict:
    path = os.path.join(folder, "preprocessing.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; re-export with: bash run_dist.sh export MODEL CONFIG")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataFormatError(f"{path}: not valid JSON ({e}); {_REEXPORT}") from None
    if not isinstance(settings, dict):
        raise DataFormatError(f"{path}: holds a {type(settings).__name__}, not the export's settings; {_REEXPORT}")
    _check_preprocessing(settings, path)
    return settings


_REEXPORT = "re-export to change the test views: bash run_dist.sh export MODEL CONFIG"


def _check_preprocessing(settings: dict, path: str) -> None:
    """An edited preprocessing.json is named here, in one line, rather than failing inside the loader
    or the predictor: each value in its range, and the views it asks for the ones the graph takes."""

    def bad(key, expected):
        raise DataFormatError(f"{path}: {key} = {json.dumps(settings[key])}: expected {expected}; {_REEXPORT}")

    for key in ("num_segments", "num_clips", "target_size", "short_size", "dense_interval"):
        value = settings.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            bad(key, "an integer >= 1")
    if settings.get("num_crops", 1) not in (1, 3, 10) or isinstance(settings.get("num_crops"), bool):
        bad("num_crops", "1, 3 or 10")
    if settings.get("sampling", "segment") not in SAMPLINGS:
        bad("sampling", f"one of {list(SAMPLINGS)}")
    if settings.get("target_size", 0) > settings.get("short_size", 1 << 30):
        bad("target_size", f"at most short_size ({settings['short_size']})")
    shape = settings.get("input_shape")
    if isinstance(shape, list) and len(shape) == 5 and all(k in settings for k in ("num_segments", "num_clips")):
        views = settings["num_segments"] * settings["num_clips"] * settings.get("num_crops", 1)
        if shape[1] is not None and shape[1] != views:
            raise DataFormatError(
                f"{path}: num_segments x num_clips x num_crops = {views} views, but the exported graph takes "
                f"{shape[1]} (input_shape); {_REEXPORT}"
            )
        if shape[3] is not None and settings.get("target_size", shape[3]) != shape[3]:
            bad("target_size", f"{shape[3]}, the size the exported graph takes (input_shape)")


def model_files(folder: str) -> tuple[str, str]:
    """(graph file, weights file) of an exported model: Paddle 3 writes inference.json, 2.x .pdmodel."""
    prefix = os.path.join(folder, "inference")
    for ext in (".json", ".pdmodel"):
        if os.path.isfile(prefix + ext) and os.path.isfile(prefix + ".pdiparams"):
            return prefix + ext, prefix + ".pdiparams"
    raise FileNotFoundError(
        f"{folder} holds no exported model (inference.json or .pdmodel with "
        "inference.pdiparams); write one with: bash run_dist.sh export MODEL CONFIG"
    )


class InferenceModel:
    """An exported model run by Paddle Inference: ``scores(clips)`` maps [N, V, 3, H, W] float32 to
    logits. On a GPU host ``device="gpu"`` runs it on the GPU and ``tensorrt`` ("fp32" or "fp16") hands
    the graph to TensorRT (a Paddle built with TensorRT) for batches of 1 to ``max_batch`` clips."""

    def __init__(
        self,
        model_file: str,
        params_file: str,
        *,
        device: str = "cpu",
        device_id: int = 0,
        tensorrt: str | None = None,
        threads: int | None = None,
        input_shape: list | None = None,
        max_batch: int = 1,
    ):
        from paddle import inference

        if tensorrt and device != "gpu":
            raise ConfigError(
                "config error: TensorRT runs on GPUs only; set -o device=gpu on a GPU host or leave --tensorrt out"
            )
        if device == "gpu" and not paddle.is_compiled_with_cuda():
            raise ConfigError(
                "config error: device = gpu but this Paddle has no CUDA; install the GPU build "
                '(make setup GPU=cu126, docs/gpu.md "Install") or use device=cpu'
            )
        if tensorrt and model_file.endswith(".json"):
            # Paddle 3's graphs (.json, PIR) go through TensorRT by conversion, not by Config
            model_file, params_file = tensorrt_model(
                model_file, params_file, tensorrt, input_shape, max_batch, device_id
            )
            tensorrt = None
        config = inference.Config(model_file, params_file)
        configure(config, device, device_id, tensorrt, input_shape, max_batch, threads)
        if device != "gpu" and _uses_leaky_relu(model_file):
            # Paddle 3.3 stores leaky_relu's slope as a double and its oneDNN conv + activation fusion reads a
            # float: SIGSEGV in FusedConv2dOp::Build on PP-TSM's conv + LeakyReLU. Leave that pass out.
            config.delete_pass("conv_activation_onednn_fuse_pass")
        self.predictor = inference.create_predictor(config)
        self._input = self.predictor.get_input_handle(self.predictor.get_input_names()[0])
        self._output = self.predictor.get_output_handle(self.predictor.get_output_names()[0])

    @classmethod
    def from_folder(cls, folder: str, **options) -> "InferenceModel":
        """The model exported to ``folder``; its input shape comes from preprocessing.json."""
        options.setdefault("input_shape", read_preprocessing(folder).get("input_shape"))
        return cls(*model_files(folder), **options)

    def scores(self, clips: np.ndarray) -> np.ndarray:
        clips = np.ascontiguousarray(clips, np.float32)
        self._input.reshape(list(clips.shape))
        self._input.copy_from_cpu(clips)
        self.predictor.run()
        return self._output.copy_to_cpu()


def _uses_leaky_relu(model_file: str) -> bool:
    with open(model_file, "rb") as f:
        return b"leaky_relu" in f.read()


def trt_shapes(input_shape: list | None, max_batch: int) -> tuple[list, list, list]:
    """(min, optimal, max) input shapes for TensorRT: the batch varies from 1 to ``max_batch`` (predict
    batches up to DATASET.batch_size clips), every other dimension is the exported one."""
    if not input_shape or any(d is None or d < 1 for d in input_shape[1:]):
        raise ConfigError(
            f"config error: TensorRT needs the exported input shape, got {input_shape}; re-export the model"
        )
    rest = [int(d) for d in input_shape[1:]]
    return [1, *rest], [max_batch, *rest], [max_batch, *rest]


def configure(config, device, device_id, tensorrt, input_shape, max_batch, threads) -> None:
    """The Paddle Inference ``Config`` calls of a predictor (tests check them against Paddle's own
    signatures, so a GPU branch cannot call a method or argument that does not exist)."""
    from paddle import inference

    if device == "gpu":
        config.enable_use_gpu(512, device_id)
        if tensorrt:  # a .pdmodel graph (Paddle 2.x export): TensorRT subgraphs with a dynamic batch
            precision = inference.PrecisionType.Half if tensorrt == "fp16" else inference.PrecisionType.Float32
            config.enable_tensorrt_engine(
                workspace_size=1 << 30,
                max_batch_size=max_batch,
                min_subgraph_size=3,
                precision_mode=precision,
                use_static=False,
                use_calib_mode=False,
            )
            low, opt, high = trt_shapes(input_shape, max_batch)
            name = "clips"
            config.set_trt_dynamic_shape_info({name: low}, {name: high}, {name: opt})
    else:
        config.disable_gpu()
        config.set_cpu_math_library_num_threads(threads or os.cpu_count() or 1)
    config.disable_glog_info()


def tensorrt_unavailable() -> str:
    """Why TensorRT cannot be used here ("" when it can). Paddle's GPU wheels are built against TensorRT
    but do not bring it, and paddle.tensorrt imports the ``tensorrt`` package at import time: the runtime
    must be installed, at the version Paddle was built with (docs/gpu.md "TensorRT")."""
    built = tuple(paddle.inference.get_trt_compile_version())
    if built == (0, 0, 0):
        return f"this Paddle {paddle.__version__} is built without TensorRT"
    want = ".".join(map(str, built))
    install = f"pip install tensorrt-cu12=={want} (make setup GPU=... EXTRAS=gpu,trt,dev,onnx,vdl)"
    try:
        import tensorrt
    except ImportError as e:
        return f"TensorRT's Python runtime is not installed ({e}); Paddle was built with TensorRT {want}: {install}"
    have = str(getattr(tensorrt, "__version__", "?"))
    if tuple(have.split(".")[:3]) != tuple(str(v) for v in built):
        return f"TensorRT {have} is installed but this Paddle was built with TensorRT {want}: {install}"
    return ""


def tensorrt_model(model_file, params_file, precision, input_shape, max_batch, device_id=0) -> tuple[str, str]:
    """The exported graph converted for TensorRT (Paddle 3, paddle.tensorrt) at ``precision`` for
    batches of 1 to ``max_batch`` on GPU ``device_id``; written once beside the model
    (tensorrt_fp16_b8/inference.json...)."""
    why = tensorrt_unavailable()
    if why:
        raise ConfigError(f"config error: --tensorrt: {why}; or leave --tensorrt out")
    low, opt, high = trt_shapes(input_shape, max_batch)
    out = os.path.join(os.path.dirname(model_file), f"tensorrt_{precision}_b{max_batch}", "inference")
    if not (os.path.isfile(out + ".json") and os.path.getmtime(out + ".json") >= os.path.getmtime(params_file)):
        os.makedirs(os.path.dirname(out), exist_ok=True)
        job = {"model": os.path.splitext(model_file)[0], "out": out, "precision": precision, "shapes": [low, opt, high]}
        if device_id == 0:
            _convert_for_tensorrt(**job)
        else:  # paddle.tensorrt's convert() runs on CUDAPlace(0): give it this GPU as its device 0
            _convert_for_tensorrt_on(device_id, job)
    return out + ".json", out + ".pdiparams"


def _convert_for_tensorrt(model, out, precision, shapes) -> None:
    from paddle.tensorrt.export import Input, PrecisionMode, TensorRTConfig, convert

    low, opt, high = shapes
    trt = TensorRTConfig(
        inputs=[Input(min_input_shape=low, optim_input_shape=opt, max_input_shape=high, name="clips")],
        precision_mode=PrecisionMode.FP16 if precision == "fp16" else PrecisionMode.FP32,
        save_model_dir=out,
    )
    convert(model, trt)


def visible_device(device_id: int, cuda_visible_devices: str | None) -> str:
    """The CUDA_VISIBLE_DEVICES entry that names CUDA ordinal ``device_id`` of a process started with
    ``cuda_visible_devices`` (None: unset, ordinals are the host's)."""
    entries = [e.strip() for e in cuda_visible_devices.split(",")] if cuda_visible_devices else []
    return entries[device_id] if device_id < len(entries) else str(device_id)


def _convert_for_tensorrt_on(device_id: int, job: dict) -> None:
    """Convert in a child process that sees only GPU ``device_id`` (CUDA cannot change its devices once
    it has started here), so that a rank's conversion uses its own GPU's memory and architecture."""
    import subprocess

    code = "import json, sys; from trainer import export; export._convert_for_tensorrt(**json.loads(sys.argv[1]))"
    gpu = visible_device(device_id, os.environ.get("CUDA_VISIBLE_DEVICES"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(job)],
        cwd=root,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu},
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise RuntimeError(f"TensorRT conversion on GPU {device_id} (CUDA_VISIBLE_DEVICES={gpu}) failed:\n{tail}")


def inference_form(model):
    """The model as exported: a re-parameterisable backbone (PP-TSMv2's) folded to one convolution per
    block, on a copy so that the caller's model keeps its training form; other models as they are."""
    if not hasattr(model.backbone, "reparameterize"):
        return model
    folded = copy.deepcopy(model)
    folded.eval()
    folded.backbone.reparameterize()
    return folded


def export(
    cfg,
    model,
    out_dir: str,
    class_names: list[str],
    sample: np.ndarray | None = None,
    onnx: bool = False,
    *,
    opset: int = DEFAULT_OPSET,
    sample_source: str = "",
    device: str = "cpu",
    device_id: int = 0,
    tensorrt: str = "fp16",
) -> dict:
    """Write OUT_DIR/inference.{json|pdmodel,pdiparams}, preprocessing.json (and model.onnx at ``opset``),
    then check every exported form against the dynamic model on ``sample`` (clips [N, V, 3, H, W]; default
    two random inputs), ``sample_source`` saying where they came from (without a sample: why there is
    none; main.py's export takes the config's val list's clips when it can): the check goes to export_check.json
    and into the returned report (``check``, and ``*_max_diff`` per backend). TensorRT at ``tensorrt``
    precision joins the check on a GPU host (``device="gpu"``). Raises ExportError when Paddle Inference
    or onnxruntime differ from the dynamic model by more than TOLERANCE."""
    from paddle.static import InputSpec

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    spec = InputSpec(input_shape(cfg), "float32", "clips")
    prefix = os.path.join(out_dir, "inference")
    # the dynamic model's logits (below) stay those of the training form: the check covers the folding too
    paddle.jit.save(paddle.jit.to_static(inference_form(model), input_spec=[spec], full_graph=True), prefix)
    model_file, params_file = model_files(out_dir)
    with open(os.path.join(out_dir, "preprocessing.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessing_settings(cfg, class_names), f, indent=2)
    if sample is None:
        sample = np.random.default_rng(0).standard_normal([2, *spec.shape[1:]]).astype(np.float32)
        sample_source = "2 random inputs" + (f": {sample_source}" if sample_source else "")
    sample_source = sample_source or f"{len(sample)} given clips"
    expected = reference_logits(model, sample)
    report = {"model": model_file, "params": params_file, "preprocessing": os.path.join(out_dir, "preprocessing.json")}
    backends: dict = {"paddle_inference": InferenceModel(model_file, params_file)}
    if onnx:
        report["onnx"] = write_onnx(model_file, params_file, os.path.join(out_dir, "model.onnx"), opset)
        try:
            backends["onnxruntime"] = OnnxModel(report["onnx"])
        except ExportError as e:
            backends["onnxruntime"] = str(e)
    backends["tensorrt"] = _tensorrt_for_check(model_file, params_file, spec.shape, device, device_id, tensorrt)
    check = check_backends(backends, sample, expected)
    check.update(inputs=sample_source, clips=len(sample), tolerance=TOLERANCE, opset=opset if onnx else None)
    report["check"] = check
    report["check_file"] = os.path.join(out_dir, CHECK_FILE)
    for row in check["backends"]:
        if "score_diff" in row:
            report[f"{row['key'].replace('onnxruntime', 'onnx')}_max_diff"] = row["score_diff"]
    with open(report["check_file"], "w", encoding="utf-8") as f:
        json.dump(check, f, indent=2)
    bad = [r for r in check["backends"] if r.get("enforced") and r["score_diff"] > TOLERANCE]
    if bad:
        raise ExportError(
            "the exported model disagrees with the dynamic model: "
            + ", ".join(f"{r['backend']} score difference {r['score_diff']:.1e}" for r in bad)
            + f" > {TOLERANCE} (table: {report['check_file']})"
        )
    return report


def _tensorrt_for_check(model_file, params_file, input_shape, device, device_id, precision):
    """The TensorRT predictor of the export check, or why there is none on this host."""
    if device != "gpu":
        return "no GPU on this host (TensorRT runs on GPUs)"
    try:
        model = InferenceModel(
            model_file,
            params_file,
            device="gpu",
            device_id=device_id,
            tensorrt=precision,
            input_shape=list(input_shape),
            max_batch=CHECK_BATCH,
        )
    except ConfigError as e:
        return str(e).removeprefix("config error: ")
    model.precision = precision
    return model


CHECK_BATCH = 4  # clips per call in the export check (TensorRT is converted for batches of 1 to this)
BACKEND_NAMES = {"paddle_inference": "Paddle Inference", "onnxruntime": "onnxruntime", "tensorrt": "TensorRT"}


def check_backends(backends: dict, sample: np.ndarray, expected: np.ndarray) -> dict:
    """Each backend's agreement with the dynamic model's ``expected`` logits on ``sample``: max |logit
    difference|, the score difference export enforces (score_difference) and how many clips get the same
    top-1 class. ``backends`` maps a key to a model with ``scores(clips)`` or to the reason it was not run;
    TensorRT is reported, not enforced (fp16 is not meant to agree within TOLERANCE)."""
    rows = []
    top1 = expected.argmax(axis=1)
    for key, backend in backends.items():
        name = BACKEND_NAMES[key] + (f" {backend.precision}" if getattr(backend, "precision", None) else "")
        if isinstance(backend, str):
            rows.append({"key": key, "backend": name, "skipped": backend})
            continue
        got = np.concatenate([backend.scores(sample[i : i + CHECK_BATCH]) for i in range(0, len(sample), CHECK_BATCH)])
        rows.append(
            {
                "key": key,
                "backend": name,
                "max_abs_logit_diff": float(np.abs(got - expected).max()),
                "score_diff": score_difference(got, expected),
                "top1_agree": int((got.argmax(axis=1) == top1).sum()),
                "clips": len(sample),
                "enforced": key != "tensorrt",
            }
        )
    return {"reference": "dynamic model, float32 on the CPU", "backends": rows}


def check_table(check: dict) -> list[str]:
    """The export check as the lines export prints: one row per backend."""
    lines = [
        f"export check against the {check['reference']}, on {check['inputs']} "
        f"(fails beyond a score difference of {check['tolerance']:g}):",
        f"  {'backend':<22s} {'max |dlogit|':>12s} {'score diff':>10s}  top-1 agreement",
    ]
    for r in check["backends"]:
        if "skipped" in r:
            lines.append(f"  {r['backend']:<22s} not run: {r['skipped']}")
        else:
            agree = f"{r['top1_agree']}/{r['clips']} ({100 * r['top1_agree'] / r['clips']:.0f}%)"
            lines.append(f"  {r['backend']:<22s} {r['max_abs_logit_diff']:12.2e} {r['score_diff']:10.2e}  {agree}")
    return lines


def reference_logits(model, sample: np.ndarray) -> np.ndarray:
    """The dynamic model's float32 logits for ``sample`` computed on the CPU, whichever device the model is
    on, so that export's TOLERANCE check means the same on every host: on a GPU, Paddle lets cuDNN and
    cuBLAS use TF32 (10-bit mantissa, phi::AllowTF32Cudnn / AllowTF32Cublas), which alone can move the
    logits by more than 1e-4 against the CPU predictor."""
    on_cpu = all(p.place.is_cpu_place() for p in model.parameters())
    cpu_model = model if on_cpu else copy.deepcopy(model).to(device="cpu")
    cpu_model.eval()
    with paddle.no_grad():
        return cpu_model(paddle.to_tensor(np.asarray(sample, np.float32), place=paddle.CPUPlace())).numpy()


MAX_OPSET = 21  # paddle2onnx 2.x: "The Opset Version must be between 7 and 21" (it aborts the process beyond)


def write_onnx(model_file: str, params_file: str, onnx_file: str, opset: int = DEFAULT_OPSET) -> str:
    """``onnx_file`` converted by paddle2onnx at exactly ``opset``. paddle2onnx raises the opset silently when
    an operator needs more, and aborts the process on some errors: it runs in a child process (its output
    goes to paddle2onnx.log beside the model), and an opset it had to raise is a one-line ExportError naming
    the operator and the opset it needs."""
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"--opset {opset}: paddle2onnx writes opsets {MIN_OPSET} to {MAX_OPSET}")
    try:
        import paddle2onnx  # noqa: F401  (a missing or refusing paddle2onnx is named before the child runs)
    except ImportError:
        raise ExportError("export --onnx needs paddle2onnx (pip install paddle2onnx onnxruntime)") from None
    except ValueError as e:  # paddle2onnx 2.x refuses Paddle < 3 at import
        raise ExportError(f"export --onnx: paddle2onnx cannot run with Paddle {paddle.__version__}: {e}") from None
    log_file = os.path.join(os.path.dirname(onnx_file), "paddle2onnx.log")
    with contextlib.suppress(FileNotFoundError):
        os.remove(onnx_file)
    graph = _graph_for_paddle2onnx(model_file, onnx_file)
    try:
        code, text = _run_paddle2onnx(graph, params_file, onnx_file, opset, log_file)
    finally:
        if graph != model_file:
            os.remove(graph)
    if code != 0 or not os.path.isfile(onnx_file):
        errors = [line.strip() for line in text.splitlines() if "ERROR" in line or "Error:" in line]
        raise ExportError(
            f"export --onnx: paddle2onnx failed (exit {code}): {errors[0] if errors else 'no message'}; "
            f"its output: {log_file}"
        )
    written = onnx_opset(onnx_file)
    if written != opset:
        # only paddle2onnx's verbose output names the operator that raised the opset: ask it again
        graph = _graph_for_paddle2onnx(model_file, onnx_file)
        try:
            _, text = _run_paddle2onnx(graph, params_file, onnx_file, opset, log_file, verbose=True)
        finally:
            if graph != model_file:
                os.remove(graph)
        os.remove(onnx_file)
        needs = sorted(set(re.findall(r"operator: (\S+) requires opset_version >= (\d+)", text)))
        what = "; ".join(f"operator {op} needs opset >= {n}" for op, n in needs) or f"paddle2onnx wrote opset {written}"
        raise ExportError(
            f"export --onnx --opset {opset}: {what}; use --opset {max([written] + [int(n) for _, n in needs])} "
            f"or higher (the default is {DEFAULT_OPSET})"
        )
    return onnx_file


# Paddle 3.3 writes leaky_relu's negative_slope as a double; paddle2onnx 2.1 reads a float there and gets 0
# (LeakyRelu alpha=0: PP-TSM's logits off by orders of magnitude). Paddle itself only loads the double.
_F64_SLOPE = re.compile(r'\{"#":"0\.a_f64","D":([^{}]*)\},"N":"negative_slope"')


def _graph_for_paddle2onnx(model_file: str, onnx_file: str) -> str:
    """``model_file``, or a copy beside ``onnx_file`` with leaky_relu's slope written as paddle2onnx reads it."""
    if not model_file.endswith(".json"):
        return model_file
    with open(model_file, encoding="utf-8") as f:
        text = f.read()
    fixed = _F64_SLOPE.sub(r'{"#":"0.a_f32","D":\1},"N":"negative_slope"', text)
    if fixed == text:
        return model_file
    copy_file = os.path.splitext(onnx_file)[0] + ".paddle2onnx_input.json"
    with open(copy_file, "w", encoding="utf-8") as f:
        f.write(fixed)
    return copy_file


def _run_paddle2onnx(model_file, params_file, onnx_file, opset, log_file, verbose=False) -> tuple[int, str]:
    """(exit status, output) of paddle2onnx.export in a child process, its output kept in ``log_file``."""
    import subprocess

    code = (
        "import sys, paddle2onnx; paddle2onnx.export(sys.argv[1], sys.argv[2], sys.argv[3], "
        f"opset_version=int(sys.argv[4]), auto_upgrade_opset=True, verbose={verbose})"
    )
    with open(log_file, "w", encoding="utf-8") as log:
        proc = subprocess.run(
            [sys.executable, "-c", code, model_file, params_file, onnx_file, str(opset)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    with open(log_file, encoding="utf-8", errors="replace") as f:
        return proc.returncode, f.read()


def onnx_opset(onnx_file: str) -> int:
    """The default-domain opset an ONNX file was written for."""
    import onnx

    model = onnx.load(onnx_file, load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


class OnnxModel:
    """An exported model.onnx run by onnxruntime: ``scores(clips)`` maps [N, V, 3, H, W] float32 to logits,
    on the CPU (or CUDA where onnxruntime-gpu is installed and ``device="gpu"``)."""

    precision = None

    def __init__(self, onnx_file: str, device: str = "cpu", threads: int | None = None):
        try:
            import onnxruntime
        except ImportError:
            raise ExportError("onnxruntime is not installed (pip install onnxruntime)") from None
        providers = ["CPUExecutionProvider"]
        if device == "gpu" and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = onnxruntime.InferenceSession(onnx_file, options, providers=providers)
        self.providers = self.session.get_providers()
        self._input = self.session.get_inputs()[0].name

    def scores(self, clips: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self._input: np.ascontiguousarray(clips, np.float32)})[0]


def exported_model(folder: str, backend: str = "paddle", **options):
    """The model exported to ``folder``, run by ``backend`` (one of BACKENDS): Paddle Inference, onnxruntime
    (folder/model.onnx, written by export --onnx) or TensorRT through Paddle Inference (GPU hosts;
    ``tensorrt`` = "fp32" or "fp16"). ``options`` are InferenceModel's (device, device_id, max_batch...)."""
    if backend not in BACKENDS:
        raise ConfigError(f"config error: --backend {backend}: expected one of {', '.join(BACKENDS)}")
    if backend == "onnx":
        path = os.path.join(folder, "model.onnx")
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} does not exist; write it with: bash run_dist.sh export MODEL CONFIG --onnx --output {folder}"
            )
        return OnnxModel(path, device=options.get("device", "cpu"))
    if backend == "tensorrt":
        options["tensorrt"] = options.get("tensorrt") or "fp32"
        if options.get("device", "cpu") != "gpu":
            raise ConfigError(
                "config error: --backend tensorrt runs on GPUs only and this run is on the CPU; on a GPU host "
                "use -o device=gpu (or device=auto), or use --backend paddle or onnx here"
            )
    else:
        options["tensorrt"] = None
    model = InferenceModel.from_folder(folder, **options)
    model.precision = options["tensorrt"]
    return model
