"""Command line of the trainer; run_dist.sh starts one of these per rank.

python trainer/main.py train   -c CONFIG [-o SECTION.key=value ...]
python trainer/main.py eval    -c CONFIG [--weights W]      top-1/top-5 on DATASET.val_list
python trainer/main.py test    -c CONFIG [--weights W]      multi-clip test on DATASET.test_list
python trainer/main.py predict -c CONFIG --input CLIP.mp4   top-5 classes of one video (or a .txt list)
                               [--output predictions.csv] [--exported DIR [--backend paddle|onnx|tensorrt]]
python trainer/main.py export  -c CONFIG [--weights W] [--onnx [--opset 11]] [--check-list LIST]
                                                            Paddle Inference (+ ONNX) model, checked
                                                            on LIST's clips, else DATASET.val_list's
python trainer/main.py summary -c CONFIG                    the run's summary from metrics.jsonl
python trainer/main.py predict -c CONFIG --input LONG.mp4 --window 10s [--stride 5s]   a timeline
                               (--input also takes a folder, a live source: -, a FIFO, udp://, rtsp://...)
python trainer/main.py compare OUTPUT_DIR...                one table of several training runs
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import warnings

# the one shim: Paddle's launcher and the seeds' `python trainer/main.py` run this file by path, with its
# folder on sys.path instead of the repo (an interpreter without `pip install -e .` included)
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import log as logs  # noqa: E402 - after the path set-up above

log = logs.get_logger("trainer.main")  # by name: run by path, __name__ is "__main__"

warnings.filterwarnings("ignore", message="No ccache found")
warnings.filterwarnings("ignore", message="When training, we now always track global mean and variance")
warnings.filterwarnings("ignore", message="Current global rank .* is not in group")

# the one list of run modes (run_dist.sh and launch/mpi_train.py read it from here); the last
# three run as one process
MODES = ("train", "eval", "test", "predict", "export", "summary")
SINGLE_PROCESS_MODES = ("predict", "export", "summary")


def _positive_int(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """The trainer's options, each with its help (run_dist.sh --help lists them too: tests/test_cli.py)."""
    description, _, usage = __doc__.partition("\n\n")
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=usage
    )
    p.add_argument(
        "mode",
        choices=MODES,
        help="train; eval (DATASET.val_list) or test (DATASET.test_list, multi-view) a checkpoint; predict "
        "videos; export the inference model; summary of a finished run (and `compare OUTPUT_DIR...`)",
    )
    p.add_argument("-c", "--config", required=True, help="the YAML config (configs/*.yaml; _base_ inherits one)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="SECTION.key=value",
        help="set one config key, e.g. -o epochs=5 -o DATASET.batch_size=8 (repeatable; unknown keys are errors)",
    )
    p.add_argument("--model", help="model name; must match MODEL.name of the config (run_dist.sh passes it)")
    p.add_argument("--weights", help="weights for eval/test/predict (default: OUTPUT_DIR/best.pdparams)")
    p.add_argument("--input", help="predict: a video file, or a text file listing one video a line")
    p.add_argument("--top-k", type=_positive_int, default=5, help="predict: classes shown per video (default 5)")
    p.add_argument(
        "--output",
        help="predict: also write the predictions to this CSV file; export: the folder (default OUTPUT_DIR/inference)",
    )
    p.add_argument("--onnx", action="store_true", help="export: also write model.onnx (needs paddle2onnx)")
    p.add_argument("--opset", type=_opset, help="export --onnx: the ONNX opset (default 13; 11 works too)")
    p.add_argument("--check-list", metavar="LIST", help="export: check the exported model on clips of this list")
    p.add_argument(
        "--check-clips",
        type=_positive_int,
        default=8,
        help="export: clips checked, of --check-list or else DATASET.val_list (default 8)",
    )
    p.add_argument(
        "--exported",
        metavar="DIR",
        help="predict with the model exported to DIR (its preprocessing.json sets the test views) instead of "
        "the dynamic model, through --backend",
    )
    p.add_argument(
        "--backend",
        choices=("paddle", "onnx", "tensorrt"),
        help="predict --exported: Paddle Inference (default), onnxruntime (DIR/model.onnx) or TensorRT (GPU hosts)",
    )
    p.add_argument(
        "--tensorrt",
        choices=("fp32", "fp16"),
        help="TensorRT's precision (default fp32): predict --exported --backend tensorrt on a GPU host; export: "
        "the precision of the TensorRT row of the check (default fp16)",
    )
    p.add_argument(
        "--validate", action="store_true", help="train: PaddleVideo's flag; evaluation needs DATASET.val_list"
    )
    from trainer.infer import add_arguments

    add_arguments(p)  # timelines, live streams, folders (docs/inference.md)
    return p


def parse_args(argv=None):
    from trainer.spellings import SpellingError, translate

    p = build_parser()
    try:  # PaddleVideo's spellings: --amp, --validate, -w, --input_file... (docs/deployment.md)
        argv = translate(sys.argv[1:] if argv is None else list(argv))
    except SpellingError as e:
        log.error(f"main.py: {e}")
        sys.exit(2)
    args = p.parse_args(argv)
    if args.backend and not args.exported:
        p.exit(2, f"main.py: --backend {args.backend} runs an exported model: add --exported DIR (export writes it)\n")
    return args


def _opset(text: str) -> int:
    from trainer.export import MAX_OPSET, MIN_OPSET

    if not (text.isascii() and text.isdigit()) or not MIN_OPSET <= int(text) <= MAX_OPSET:
        raise argparse.ArgumentTypeError(f"expected an ONNX opset from {MIN_OPSET} to {MAX_OPSET}, got {text!r}")
    return int(text)


def _summary_line(summary: dict) -> str:
    def pct(v):
        return "n/a" if v is None else f"{100 * v:.1f}%"

    def acc(v):
        return "n/a" if v is None else f"{v:.4f}"

    return (
        f"SUMMARY val_top1={acc(summary.get('val_top1'))} "
        f"best_val_top1={acc(summary.get('best_val_top1'))} wall_time={summary['wall_s']:.1f}s "
        f"train_samples_per_s={summary['train_samples_per_s']:.1f} "
        f"data_wait_share={pct(summary['data_wait_share'])}"
    )


def _print_summary(cfg) -> int:
    path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        log.error(f"summary: {path} does not exist; train first")
        return 1
    records = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    last = {r["mode"]: r for r in records}
    if "summary" not in last:
        log.error(f"summary: no finished training run in {path}")
        return 1
    log.info(_summary_line(last["summary"]))
    if "eval" in last:
        e = last["eval"]
        log.info(f"EVAL top1={e['top1']:.4f} top5={e['top5']:.4f} on {e['samples']} clips ({e['weights']})")
    return 0


def run(args) -> int:
    from trainer.config import ConfigError, load_config

    cfg = load_config(args.config, args.override)
    if args.model and args.model != cfg.MODEL.name:
        raise ConfigError(
            f"config error: model {args.model} was asked for but {args.config} sets MODEL.name = {cfg.MODEL.name}"
        )
    if args.validate and args.mode == "train" and not cfg.DATASET.val_list:
        raise ConfigError(
            "config error: --validate evaluates DATASET.val_list every val_interval epochs but it is empty; "
            "set -o DATASET.val_list=PATH (with it set, training evaluates with or without --validate)"
        )
    if args.mode == "summary":
        return _print_summary(cfg)

    from trainer import dist

    env = dist.init(cfg.device)
    if env.world_size > 1:  # each rank's own log says who it is, for operators (and kill tests)
        import socket

        log.info(f"rank {env.rank}/{env.world_size}: pid {os.getpid()} on {socket.gethostname()} ({env.device})")
    lock = None
    if env.is_main and args.mode in ("train", "eval", "test"):  # they write into output_dir
        from common.runlock import RunLock

        lock = RunLock(cfg.output_dir, args.mode).acquire()
    try:
        return _run_mode(args, cfg, env)
    except (Stopped, KeyboardInterrupt) as e:
        name = signal.Signals(e.signum).name if isinstance(e, Stopped) else "SIGINT"
        latest = os.path.join(cfg.output_dir, "latest.pdckpt")
        hint = (
            f"; {latest} holds the last complete epoch: run the same command with -o resume=auto to continue"
            if args.mode == "train" and os.path.isfile(latest)
            else ""
        )
        log.warning(f"{args.mode}: stopped by {name} (rank {env.rank}){hint}")
        return 128 + (e.signum if isinstance(e, Stopped) else signal.SIGINT)
    finally:
        if lock is not None:
            lock.release()


class Stopped(BaseException):
    """SIGTERM (a scheduler's stop, scancel, run_dist.sh passing on a signal) ends the run like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop(signum, frame):
    raise Stopped(signum)


def _run_mode(args, cfg, env) -> int:
    from trainer import engine

    if args.mode == "train":
        summary = engine.train(cfg, env)
        if env.is_main:
            log.info(_summary_line(summary))
        return 0

    if args.mode == "predict" and args.exported:
        return _predict_exported(cfg, env, args)
    from trainer.models import build_model
    from trainer.weights import load_weights

    weights = args.weights or os.path.join(cfg.output_dir, "best.pdparams")
    model = build_model(cfg)
    load_weights(model, weights)
    if args.mode in ("eval", "test"):
        return _evaluate(cfg, env, model, args.mode, weights)
    if args.mode == "export":
        return _export(cfg, env, model, args)
    return _predict(cfg, env, model, args)


def _class_names(cfg) -> list[str]:
    from clipdata.lists import read_label_file
    from trainer.config import ConfigError

    n = cfg.MODEL.head.num_classes
    if not cfg.DATASET.label_file:
        return [str(i) for i in range(n)]
    names = read_label_file(cfg.DATASET.label_file)
    if len(names) != n:
        raise ConfigError(
            f"config error: {cfg.DATASET.label_file} names {len(names)} classes but MODEL.head.num_classes = {n}"
        )
    return names


def _evaluate(cfg, env, model, mode: str, weights: str) -> int:
    from trainer import engine
    from trainer.config import segments_in_test
    from trainer.metrics import MetricsLog, write_test_report

    names = _class_names(cfg)  # a label file that disagrees stops the run before the work, not after
    if env.is_main:
        os.makedirs(cfg.output_dir, exist_ok=True)  # the report's folder, before a long evaluation
    loader = engine.make_loader(cfg, env, "val" if mode == "eval" else "test")
    result = engine.evaluate(model, loader, env, cfg.MODEL.head.num_classes)
    if env.is_main:
        p = cfg.PIPELINE
        views = (
            f"{segments_in_test(cfg)} segment(s) x {p.test_num_clips} clip(s) x {p.test_num_crops} crop(s), "
            if mode == "test"
            else ""
        )
        # the numbers first: nothing that fails writing the report can lose them
        log.info(
            f"{mode}: top1 {result['top1']:.4f} top5 {result['top5']:.4f} mean class accuracy "
            f"{result['mean_class_accuracy']:.4f} loss {result['loss']:.4f} on {result['samples']} clips "
            f"({views}{weights})"
        )
        paths = write_test_report(cfg.output_dir, mode, result, names)
        metrics = MetricsLog(cfg.output_dir)
        metrics.write(
            mode=mode,
            weights=weights,
            **{k: v for k, v in result.items() if k not in ("confusion", "per_class_accuracy")},
        )
        metrics.close()
        log.info(f"{mode}: per-class accuracy and confusion matrix: {', '.join(paths)}")
    return 0


def _export(cfg, env, model, args) -> int:
    from common.files import check_writable
    from trainer.export import DEFAULT_OPSET, check_table, export

    out_dir = args.output or os.path.join(cfg.output_dir, "inference")
    check_writable(out_dir, "the export folder")
    if args.opset and not args.onnx:
        log.error(f"export: --opset {args.opset} is the ONNX opset: add --onnx")
        return 2
    names = _class_names(cfg)
    if args.check_list:
        sample, source = _check_clips(cfg, env, args.check_list, args.check_clips)
    else:
        sample, source = _default_check_clips(cfg, env, args.check_clips)
    report = export(
        cfg,
        model,
        out_dir,
        names,
        sample=sample,
        onnx=args.onnx,
        opset=args.opset or DEFAULT_OPSET,
        sample_source=source,
        device=env.device,
        device_id=env.device_id or 0,
        tensorrt=args.tensorrt or "fp16",
    )
    log.info(
        f"export: {report['model']}, {report['params']}, {report['preprocessing']}"
        + (f", {report['onnx']} (opset {args.opset or DEFAULT_OPSET})" if "onnx" in report else "")
    )
    log.info("\n".join(check_table(report["check"])))
    log.info(f"export: the check is in {report['check_file']}")
    return 0


def _default_check_clips(cfg, env, count: int):
    """Export's check inputs without --check-list: the first ``count`` clips of DATASET.val_list, else of
    DATASET.test_list, as ``_check_clips`` reads them; (None, why) when neither file exists or gives a
    readable clip, and export checks on random inputs instead, saying why in its table. Noise is a poor
    check of a trained model: it drives activations far past real clips' (~1e3 on a small trained
    PP-TSMv2), where float32 rounding alone exceeds export's 1e-4 (docs/deployment.md)."""
    from clipdata.errors import DataFormatError
    from clipdata.video import VideoError
    from common.processes import WorkerError
    from trainer.config import ConfigError

    why, tried = [], set()
    for key in ("val_list", "test_list"):
        path = cfg.DATASET[key]
        if not path or path in tried:
            continue
        tried.add(path)
        try:
            sample, source = _check_clips(cfg, env, path, count, f"DATASET.{key}")
        except (ConfigError, DataFormatError, VideoError, FileNotFoundError, WorkerError) as e:
            message = str(e).removeprefix("config error: ")
            why.append(message if f"DATASET.{key}" in message else f"DATASET.{key}: {message}")
            continue
        return sample, f"{source} (DATASET.{key})"
    if why:  # a list that exists but cannot be read: said here too, not only in the table
        log.warning(f"export: checking on random inputs: {'; '.join(why)} (--check-list LIST picks clips)")
    return None, "; ".join(why) or "no DATASET.val_list or DATASET.test_list"


def _check_clips(cfg, env, list_file: str, count: int, what: str = "--check-list"):
    """The first ``count`` clips of ``list_file`` (DATASET.source's format) through the test pipeline, as
    the exported model sees them: ([N, views, 3, H, W] float32, where they came from); ``what`` names the
    list in errors."""
    import numpy as np

    from trainer import dist, engine

    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"{what} {list_file} does not exist")
    loader = engine.make_loader(cfg, dist.Env(0, 1, env.device, env.device_id), "test", list_file=list_file)
    clips = []
    try:
        for imgs, _ in loader:
            clips.append(imgs.astype("float32").numpy())
            if sum(map(len, clips)) >= count:
                break
    finally:
        loader.close()  # its feed workers, when it stops before the end
    if not clips:
        raise FileNotFoundError(f"{what} {list_file}: no readable clip")
    sample = np.concatenate(clips)[:count]
    return sample, f"{len(sample)} clips of {list_file}"


def _predict(cfg, env, model, args) -> int:
    from trainer.predict import dynamic_scorer

    return _report_predictions(cfg, env, dynamic_scorer(model), args)


def _predict_exported(cfg, env, args) -> int:
    from trainer.config import ConfigError
    from trainer.export import config_for_exported, exported_model, model_files, read_preprocessing
    from trainer.predict import exported_scorer

    backend = args.backend or ("tensorrt" if args.tensorrt else "paddle")
    if args.tensorrt and backend != "tensorrt":
        raise ConfigError(f"config error: --tensorrt {args.tensorrt} is TensorRT's precision: use --backend tensorrt")
    model_files(args.exported)  # a folder without a model is named before its settings are read
    settings = read_preprocessing(args.exported)
    cfg = config_for_exported(cfg, settings, args.exported)
    model = exported_model(
        args.exported,
        backend,
        device=env.device,
        device_id=env.device_id or 0,
        tensorrt=args.tensorrt,
        input_shape=settings.get("input_shape"),
        max_batch=cfg.DATASET.batch_size,  # predict's batches hold 1 to batch_size clips
    )
    engine = {
        "paddle": "Paddle Inference",
        "onnx": f"onnxruntime, {os.path.join(args.exported, 'model.onnx')}",
        "tensorrt": f"TensorRT {getattr(model, 'precision', None)} through Paddle Inference",
    }[backend]
    log.info(f"predict: exported model {args.exported} on {env.device} ({engine})")
    return _report_predictions(cfg, env, exported_scorer(model), args)


def _report_predictions(cfg, env, scorer, args) -> int:
    from trainer.predict import predict, print_predictions, write_predictions_csv

    if not args.input:
        raise FileNotFoundError("predict needs --input VIDEO (or a .txt file listing videos)")
    from trainer.infer import dispatch

    handled = dispatch(cfg, env, scorer, _class_names(cfg), args)  # timelines, streams, folders, lists
    if handled is not None:
        return handled
    results = predict(cfg, env, scorer, args.input, args.top_k)
    print_predictions(results)
    if args.output:
        write_predictions_csv(results, args.output)
        log.info(f"predict: {len(results)} video(s) -> {args.output}")
    return 0


def main(argv=None) -> int:
    logs.setup()  # this rank's messages: console, and its events beside its exit record (common/log.py)
    try:
        from trainer.infer import is_compare

        if is_compare(argv):  # compare OUTPUT_DIR...: no config of its own (trainer/reports.py)
            from trainer.reports import compare_main

            return compare_main((sys.argv[1:] if argv is None else argv)[1:])
        args = parse_args(argv)
    except SystemExit as e:
        if e.code == 2:  # argparse said why on stderr
            _exit_record("usage", "the command line was refused (its log says why)", 2)
        raise
    except Exception as e:  # an install that cannot import: recorded like any crash
        _exit_record("crash", f"{type(e).__name__}: {e}", 1)
        raise
    from clipdata.errors import DataFormatError
    from clipdata.video import VideoError
    from common.files import NO_SPACE, OutputError
    from common.processes import WorkerError, WorkerTimeout
    from common.runlock import BusyError
    from trainer.config import ConfigError
    from trainer.export import ExportError
    from trainer.weights import WeightsError

    previous = signal.signal(signal.SIGTERM, _stop)  # a stop ends like Ctrl-C, with its resume line
    try:
        code = run(args)
        if code > 128:
            _exit_record("stopped", f"stopped by {signal.Signals(code - 128).name}", code)
        return code
    except ConfigError as e:
        log.error(str(e))
        return _exit_record("config", str(e), 2)
    except (DataFormatError, VideoError, FileNotFoundError, WeightsError, BusyError, OutputError) as e:
        log.error(f"{args.mode}: error: {e}")
        return _exit_record("output" if isinstance(e, (BusyError, OutputError)) else "data", str(e), 1)
    except ExportError as e:  # a missing package, an opset too low, an exported model that disagrees
        log.error(f"{args.mode}: error: {e}")
        return _exit_record("config", str(e), 1)
    except WorkerError as e:  # a loader worker died (a crash: out of memory?) or hung on a file (data)
        log.error(f"{args.mode}: error: {e}")
        return _exit_record("data" if isinstance(e, WorkerTimeout) else "crash", str(e), 1)
    except OSError as e:
        if e.errno not in (*NO_SPACE, errno.EROFS):
            _exit_record("crash", f"{type(e).__name__}: {e}", 1)
            raise
        _exit_record("output", f"{e.strerror} writing {e.filename or 'the output'}", 1)
        resume = " -o resume=auto" if args.mode == "train" else ""
        log.error(
            f"{args.mode}: error: {e.strerror} writing {e.filename or 'the output'}; what was written before is "
            f"whole (files are written under a temporary name, then renamed): free space and run the same "
            f"command{resume} again"
        )
        return 1
    except Exception as e:  # ours to fix, or a peer that went away (common/exits.py tells which)
        _exit_record("crash", f"{type(e).__name__}: {e}", 1)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exit_record(kind: str, message: str, code: int) -> int:
    """How this rank ended, for run_dist.sh to name the cause and decide on a restart (common/exits.py)."""
    from common.exits import write_record

    write_record(kind, message, code)
    return code


if __name__ == "__main__":
    sys.exit(main())
