"""Weights and checkpoint files are read as data: what paddle.save writes loads, a pickle that would run
code is refused at every entry point (predict --weights, MODEL.backbone.pretrained, resume)."""

import os
import pickle

import numpy as np
import paddle
import pytest

from trainer import weights
from trainer.models import build_model
from trainer.weights import UnsafeFileError, load_file

from .tiny import tiny_cfg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _LoDTensorLike:
    """Pickles the way Paddle pickles a LoDTensor: eval('data', {'data': array})."""

    def __init__(self, array):
        self.array = array

    def __reduce__(self):
        return (eval, ("data", {"data": self.array}))


@pytest.fixture()
def evil(tmp_path):
    """A .pdparams whose loading would run a shell command: a real state dict with one poisoned entry."""
    paddle.seed(0)
    state = {k: v.numpy() for k, v in paddle.nn.Linear(2, 3).state_dict().items()}
    state["weight"] = _Exploit(tmp_path / "ran")
    path = tmp_path / "evil.pdparams"
    path.write_bytes(pickle.dumps(state, protocol=4))
    return path


def test_what_paddle_save_writes_loads_as_arrays(tmp_path):
    paddle.seed(0)
    model = paddle.nn.Sequential(paddle.nn.Linear(2, 3), paddle.nn.BatchNorm1D(3))
    opt = paddle.optimizer.Momentum(learning_rate=paddle.optimizer.lr.StepDecay(0.1, 2), parameters=model.parameters())
    model(paddle.randn([4, 2])).mean().backward()
    opt.step()
    paddle.save(model.state_dict(), str(tmp_path / "m.pdparams"))
    paddle.save(
        {"model": model.state_dict(), "optimizer": opt.state_dict(), "meta": {"epoch": 1}}, str(tmp_path / "c.pdckpt")
    )
    for name in ("m.pdparams", "c.pdckpt"):
        ours, theirs = load_file(str(tmp_path / name)), paddle.load(str(tmp_path / name))
        if name == "c.pdckpt":
            assert (
                ours["meta"] == {"epoch": 1}
                and ours["optimizer"]["LR_Scheduler"] == theirs["optimizer"]["LR_Scheduler"]
            )
            for key, value in theirs["optimizer"].items():
                if key != "LR_Scheduler":
                    np.testing.assert_array_equal(ours["optimizer"][key], value.numpy())
            ours, theirs = ours["model"], theirs["model"]
        assert list(ours) == list(theirs)  # paddle.save's name table is dropped, as paddle.load does
        for key, value in theirs.items():
            np.testing.assert_array_equal(ours[key], value.numpy())


def test_legacy_pickles_load_protocol_2_arrays_and_lod_tensors(tmp_path):
    """Paddle 2.x static-graph and fluid files: protocol-2 pickles of arrays (their bytes spelled
    _codecs.encode(str, 'latin1')), and LoDTensors pickled as eval('data', {'data': array})."""
    arrays = {"conv1_weights": np.arange(24, dtype=np.float32).reshape(2, 3, 2, 2), "fc_offset": np.ones(3)}
    (tmp_path / "static.pdparams").write_bytes(pickle.dumps(arrays, protocol=2))
    (tmp_path / "lod.pdparams").write_bytes(pickle.dumps({k: _LoDTensorLike(v) for k, v in arrays.items()}))
    for name in ("static.pdparams", "lod.pdparams"):
        got = load_file(str(tmp_path / name))
        assert set(got) == set(arrays)
        for key, value in arrays.items():
            np.testing.assert_array_equal(got[key], value)


def test_an_eval_that_is_not_paddles_lod_tensor_is_refused(tmp_path):
    class Sneaky:
        def __reduce__(self):
            return (eval, (f"__import__('os').system('touch {tmp_path / 'ran'}')", {}))

    (tmp_path / "e.pdparams").write_bytes(pickle.dumps({"w": Sneaky()}))
    with pytest.raises(ValueError, match="e.pdparams"):
        load_file(str(tmp_path / "e.pdparams"))
    assert not (tmp_path / "ran").exists()


def test_predict_weights_refuse_a_file_that_would_run_code(tmp_path, evil):
    model = build_model(tiny_cfg(tmp_path))
    with pytest.raises(
        UnsafeFileError, match=r"evil.pdparams: refused to load: it asks for global '(posix|os).system'"
    ):
        weights.load_weights(model, str(evil))
    assert not (tmp_path / "ran").exists()


def test_pretrained_refuses_a_file_that_would_run_code(tmp_path, evil):
    with pytest.raises(UnsafeFileError, match=r"evil.pdparams: refused to load"):
        build_model(tiny_cfg(tmp_path, f"MODEL.backbone.pretrained={evil}"))
    assert not (tmp_path / "ran").exists()


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    from trainer.checkpoint import restore

    state = {"model": {}, "optimizer": {"LR_Scheduler": _Exploit(tmp_path / "ran")}, "meta": {"epoch": 1}}
    (tmp_path / "evil.pdckpt").write_bytes(pickle.dumps(state))
    model = build_model(tiny_cfg(tmp_path))
    with pytest.raises(UnsafeFileError, match=r"evil.pdckpt: refused to load"):
        restore(str(tmp_path / "evil.pdckpt"), model, None)
    assert not (tmp_path / "ran").exists()


def test_the_cli_stops_with_one_line_naming_the_file(tmp_path, evil, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"_base_: {ROOT}/configs/tsn_demo.yaml\nMODEL:\n  backbone: {{depth: 18, base_channels: 8, "
        f"pretrained: {evil}}}\nDATASET: {{train_list: x.list}}\n"
    )
    from trainer import main

    assert main.main(["train", "-c", str(cfg), "-o", f"output_dir={tmp_path / 'out'}"]) == 1
    assert "evil.pdparams: refused to load" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "ran").exists()


def test_pretrained_loads_backbone_and_skips_a_classifier_of_another_class_count(cfg, tmp_path):
    from trainer.weights import load_pretrained

    source = build_model(cfg)  # 5 classes
    paddle.save(source.state_dict(), str(tmp_path / "k400.pdparams"))
    paddle.save(source.backbone.state_dict(), str(tmp_path / "imagenet.pdparams"))
    cfg.MODEL.head["num_classes"] = 7
    for name in ("k400.pdparams", "imagenet.pdparams"):
        target = build_model(cfg)
        report = load_pretrained(target, str(tmp_path / name))
        np.testing.assert_array_equal(
            target.backbone.stem[0][0].weight.numpy(), source.backbone.stem[0][0].weight.numpy()
        )
        assert list(target.head.fc.weight.shape) == [64, 7]
        assert "head.fc.weight" in report
    assert "skipped (shape differs) ['head.fc.bias', 'head.fc.weight']" in load_pretrained(
        build_model(cfg), str(tmp_path / "k400.pdparams")
    )
    with pytest.raises(FileNotFoundError, match="MODEL.backbone.pretrained"):
        load_pretrained(build_model(cfg), str(tmp_path / "nope.pdparams"))
