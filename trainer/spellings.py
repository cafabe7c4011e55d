"""PaddleVideo's command-line spellings (main.py, tools/export_model.py, tools/predict.py, paddle2onnx) on
this trainer's command line: those that map one to one are rewritten, the others are refused in one line that
says what to write instead (docs/deployment.md "PaddleVideo's spellings")."""

from __future__ import annotations

# PaddleVideo flag -> this trainer's arguments (a flag without a value)
FLAGS = {
    "--amp": ["-o", "amp=true"],
    "--validate": ["--validate"],  # evaluation during training: main.py checks DATASET.val_list
}
# PaddleVideo option taking a value -> a function of the value giving this trainer's arguments
OPTIONS = {
    "-w": lambda v: ["--weights", v],  # main.py -w / --weights
    "--pretrained_params": lambda v: ["--weights", v],  # tools/export_model.py -p
    "--input_file": lambda v: ["--input", v],  # tools/predict.py -i / --input_file
    "-i": lambda v: ["--input", v],
    "--output_path": lambda v: ["--output", v],  # tools/export_model.py -o / --output_path
    "--opset_version": lambda v: ["--opset", v],  # paddle2onnx --opset_version
    "--seed": lambda v: ["-o", f"seed={v}"],
    "--use_gpu": lambda v: ["-o", f"device={'gpu' if _true(v) else 'cpu'}"],  # tools/predict.py
    "--use_tensorrt": lambda v: ["--backend", "tensorrt"] if _true(v) else [],
    "--amp_level": lambda v: [] if v.upper() == "O1" else _refuse("--amp_level", AMP_LEVEL),
}
AMP_LEVEL = "AMP here is level O1 (paddle.amp.auto_cast); write --amp (or -o amp=true, -o amp_dtype=bfloat16)"
# PaddleVideo spellings with no one-to-one counterpart: what to write instead
INSTEAD = {
    "--test": "write the mode: bash run_dist.sh test MODEL CONFIG --weights W",
    "--gpus": "--gpus is run_dist.sh's: bash run_dist.sh MODE MODEL CONFIG --gpus 0,1,2,3",
    "--model_file": "write --exported DIR (the folder export wrote: inference.json, .pdiparams, preprocessing.json)",
    "--params_file": "write --exported DIR (the folder export wrote: inference.json, .pdiparams, preprocessing.json)",
    "--precision": "write --tensorrt fp16 (or fp32): TensorRT's precision, with --backend tensorrt",
    "--batch_size": "write -o DATASET.batch_size=N",
    "--enable_mkldnn": "leave it out: Paddle Inference on the CPU uses oneDNN already",
    "--cpu_threads": "set OMP_NUM_THREADS=N (Paddle Inference's CPU threads follow the cores)",
    "--train_dali": "write -o DATASET.source=videos|pkl|rawframes: every source is decoded by DALI here",
    "--fleet": "leave it out: run_dist.sh always trains with fleet (collective)",
}


class SpellingError(ValueError):
    """A PaddleVideo spelling with no counterpart here; the message says what to write instead."""


def _true(value: str) -> bool:
    if value.lower() in ("true", "t", "1", "yes"):
        return True
    if value.lower() in ("false", "f", "0", "no"):
        return False
    raise SpellingError(f"expected True or False, got {value!r}")


def _refuse(name: str, instead: str):
    raise SpellingError(f"{name}: {instead}")


def translate(argv: list[str]) -> list[str]:
    """``argv`` with PaddleVideo's spellings rewritten into this trainer's; SpellingError names the first
    one that has no counterpart, with what to write instead. Arguments after ``-o`` are left alone."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        i += 1
        if out and out[-1] in ("-o", "--override"):  # a value, never a flag
            out.append(arg)
            continue
        if name in FLAGS and not eq:
            out += FLAGS[name]
            continue
        if name not in OPTIONS:
            if name in INSTEAD:
                raise SpellingError(f"{name} (PaddleVideo's spelling): {INSTEAD[name]}")
            out.append(arg)
            continue
        if not eq:  # the value is the next argument
            if i >= len(argv):
                raise SpellingError(f"{name} needs a value")
            value = argv[i]
            i += 1
        try:
            out += OPTIONS[name](value)
        except SpellingError as e:
            raise SpellingError(str(e) if str(e).startswith(name) else f"{name}: {e}") from None
    return out


if __name__ == "__main__":  # run_dist.sh checks the command line once, before it starts any rank
    import sys

    from common import log as logs

    logs.setup()
    try:
        translate(sys.argv[1:])
    except SpellingError as e:
        logs.get_logger("trainer.spellings").error(f"run_dist.sh: {e}")
        sys.exit(2)
