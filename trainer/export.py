"""Export: a Paddle Inference model (paddle.jit.save) with its preprocessing settings beside it, checked
against the dynamic model; ONNX through paddle2onnx where installed, checked with onnxruntime. The check
(one table: each backend's max |logit difference| and top-1 agreement with the dynamic model, on random
inputs or on real clips) is written to export_check.json; docs/deployment.md is the manual."""

from __future__ import annotations

import copy
import json
import os
import sys

import numpy as np
import paddle

from dali_pipelines.formats import DataFormatError
from dali_pipelines.sampling import SAMPLINGS

from .config import SHIFT_MODELS, ConfigError, segments_in_test
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


def views_per_clip(cfg) -> int:
    p = cfg.PIPELINE
    return segments_in_test(cfg) * p.test_num_clips * p.test_num_crops


def preprocessing_settings(cfg, class_names: list[str]) -> dict:
    """What a deployment must do to a video before the model sees it (the test pipeline's settings)."""
    from dali_pipelines.loader import MEAN, STD

    p = cfg.PIPELINE
    return {
        "model": cfg.MODEL.name,
        "input": "clips",
        "input_shape": [None, views_per_clip(cfg), 3, p.target_size, p.target_size],
        "layout": "[batch, crops x clips x segments, RGB, height, width]",
        "num_segments": segments_in_test(cfg),
        "num_clips": p.test_num_clips,
        "num_crops": p.test_num_crops,
        "target_size": p.target_size,
        "short_size": p.short_size,
        "mean": list(MEAN),
        "std": list(STD),
        "sampling": p.sampling,
        "dense_interval": p.dense_interval,
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
                '(make setup GPU=cu126, README "GPU hosts") or use device=cpu'
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
            # Paddle 3.3's oneDNN conv + activation fusion crashes (SIGSEGV in FusedConv2dOp::Build, the
            # leaky ReLU's slope attribute is missing) on PP-TSM's conv + LeakyReLU: leave that pass out
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
    cfg, model, out_dir: str, class_names: list[str], sample: np.ndarray | None = None, onnx: bool = False
) -> dict:
    """Write OUT_DIR/inference.{json|pdmodel,pdiparams} and preprocessing.json; returns what was written
    and the largest score difference of each exported form against the dynamic model."""
    from paddle.static import InputSpec

    os.makedirs(out_dir, exist_ok=True)
    model.eval()
    p = cfg.PIPELINE
    spec = InputSpec([None, views_per_clip(cfg), 3, p.target_size, p.target_size], "float32", "clips")
    prefix = os.path.join(out_dir, "inference")
    # the dynamic model's logits (below) stay those of the training form: the check covers the folding too
    paddle.jit.save(paddle.jit.to_static(inference_form(model), input_spec=[spec], full_graph=True), prefix)
    model_file, params_file = model_files(out_dir)
    with open(os.path.join(out_dir, "preprocessing.json"), "w", encoding="utf-8") as f:
        json.dump(preprocessing_settings(cfg, class_names), f, indent=2)
    if sample is None:
        sample = np.random.default_rng(0).standard_normal([2, *spec.shape[1:]]).astype(np.float32)
    expected = reference_logits(model, sample)
    report = {"model": model_file, "params": params_file, "preprocessing": os.path.join(out_dir, "preprocessing.json")}
    report["paddle_inference_max_diff"] = score_difference(
        InferenceModel(model_file, params_file).scores(sample), expected
    )
    if onnx:
        report.update(_export_onnx(model_file, params_file, os.path.join(out_dir, "model.onnx"), sample, expected))
    bad = {k: v for k, v in report.items() if k.endswith("_max_diff") and v > TOLERANCE}
    if bad:
        raise RuntimeError(f"export: exported model disagrees with the dynamic model: {bad} > {TOLERANCE}")
    return report


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


def _export_onnx(model_file, params_file, onnx_file, sample, expected) -> dict:
    try:
        import paddle2onnx
    except ImportError:
        raise RuntimeError("export --onnx needs paddle2onnx (pip install paddle2onnx onnxruntime)") from None
    except ValueError as e:  # paddle2onnx 2.x refuses Paddle < 3 at import
        raise RuntimeError(f"export --onnx: paddle2onnx cannot run with Paddle {paddle.__version__}: {e}") from None
    paddle2onnx.export(model_file, params_file, onnx_file, opset_version=13)
    out = {"onnx": onnx_file}
    try:
        import onnxruntime
    except ImportError:
        print("export: onnxruntime is not installed; the ONNX file is not checked")
        return out
    session = onnxruntime.InferenceSession(onnx_file, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: sample})[0]
    out["onnx_max_diff"] = score_difference(got, expected)
    return out
