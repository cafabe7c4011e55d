"""Distillation (trainer/distill.py): the DML and teacher losses against a direct NumPy computation, what
each form trains, the errors a user can cause, and a 2-rank DML run that resumes bit for bit and exports
the student alone."""

import os
import re
import subprocess
import sys

import numpy as np
import paddle
import pytest

from trainer import checkpoint, distill
from trainer.config import ConfigError

from .tiny import tiny_cfg, tiny_config, weight_digests

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, K = 6, 5


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _kl(target, logits, t):
    """Mean over the batch of KL(softmax(target / t) || softmax(logits / t))."""
    lp, lq = _log_softmax(target / t), _log_softmax(logits / t)
    return (np.exp(lp) * (lp - lq)).sum(axis=1).mean()


def _ce(logits, labels, smoothing, partners=None, lam=1.0):
    soft = np.eye(K)[labels] * (1 - smoothing) + smoothing / K
    if partners is not None:
        soft = lam * soft + (1 - lam) * (np.eye(K)[partners] * (1 - smoothing) + smoothing / K)
    return -(soft * _log_softmax(logits)).sum(axis=1).mean()


def _logits(seed):
    return np.random.default_rng(seed).standard_normal((N, K)) * 3


LABELS, PARTNERS = np.array([0, 3, 4, 1, 2, 3]), np.array([2, 2, 0, 4, 1, 3])


@pytest.mark.parametrize("smoothing, t, weight, lam", [(0.0, 1.0, 1.0, None), (0.1, 4.0, 0.5, 0.3)])
def test_dml_loss_is_both_cross_entropies_plus_the_symmetric_softened_kl(smoothing, t, weight, lam):
    s, p = _logits(1), _logits(2)
    mixed = None if lam is None else (paddle.to_tensor(PARTNERS), lam)
    got = distill.dml_loss(
        paddle.to_tensor(s.astype(np.float32)),
        paddle.to_tensor(p.astype(np.float32)),
        paddle.to_tensor(LABELS),
        smoothing=smoothing,
        temperature=t,
        weight=weight,
        mixed=mixed,
    )
    part = (None, 1.0) if lam is None else (PARTNERS, lam)
    ce = _ce(s, LABELS, smoothing, *part) + _ce(p, LABELS, smoothing, *part)
    expected = ce + weight * t**2 * (_kl(p, s, t) + _kl(s, p, t)) / 2
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_dml_loss_at_t1_is_paddlevideos_distillation_dml_loss():
    """PaddleVideo's DistillationDMLLoss: mean over N x C of C * (t log(t/x) + x log(x/t)) / 2 on softmaxes,
    added to DistillationCELoss of the student and of the peer."""
    s, p = _logits(3), _logits(4)
    x, y = np.exp(_log_softmax(s)), np.exp(_log_softmax(p))
    eps = 1e-12
    pv = np.mean((y * np.log((y + eps) / (x + eps)) * K + x * np.log((x + eps) / (y + eps)) * K) / 2)
    expected = _ce(s, LABELS, 0.0) + _ce(p, LABELS, 0.0) + pv
    got = distill.dml_loss(
        paddle.to_tensor(s.astype(np.float32)), paddle.to_tensor(p.astype(np.float32)), paddle.to_tensor(LABELS)
    )
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("smoothing, t, weight, lam", [(0.0, 1.0, 1.0, None), (0.1, 3.0, 2.0, 0.6)])
def test_teacher_loss_is_cross_entropy_plus_t2_kl_from_the_teacher_and_leaves_the_teacher_alone(
    smoothing, t, weight, lam
):
    s, te = _logits(5), _logits(6)
    student = paddle.to_tensor(s.astype(np.float32), stop_gradient=False)
    teacher = paddle.to_tensor(te.astype(np.float32), stop_gradient=False)
    mixed = None if lam is None else (paddle.to_tensor(PARTNERS), lam)
    got = distill.teacher_loss(
        student, teacher, paddle.to_tensor(LABELS), smoothing=smoothing, temperature=t, weight=weight, mixed=mixed
    )
    part = (None, 1.0) if lam is None else (PARTNERS, lam)
    expected = _ce(s, LABELS, smoothing, *part) + weight * t**2 * _kl(te, s, t)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    got.backward()
    assert student.grad is not None and teacher.grad is None


def _write(path, text):
    path.write_text(text)
    return str(path)


def _partner_config(tmp_path, name="TSM", num_classes=K):
    return _write(
        tmp_path / f"{name}.yaml",
        f"MODEL: {{name: {name}, backbone: {{depth: 18, base_channels: 8}}, head: {{num_classes: {num_classes}}}}}\n"
        "OPTIMIZER: {lr_mult: {head.fc.bias: 10}}\n",
    )


def _step(dist_, imgs, labels):
    from trainer.engine import train_step
    from trainer.solver import build_optimizer

    net = dist_.net
    net.train()
    opt = build_optimizer(dist_.partner_cfg.OPTIMIZER, 0.1, dist_.param_groups(dist_.partner_cfg.OPTIMIZER))
    return train_step(net, opt, None, imgs, labels, None, loss_fn=dist_.train_loss)


def _snapshot(layer):
    return {k: v.numpy().copy() for k, v in layer.state_dict().items()}


def _batch():
    rng = np.random.default_rng(0)
    return paddle.to_tensor(rng.standard_normal((2, 3, 3, 32, 32)).astype(np.float32)), paddle.to_tensor([1, 4])


def test_dml_trains_student_and_peer_with_the_peers_own_multipliers(tmp_path):
    from trainer.models import build_model

    cfg = tiny_cfg(tmp_path, "DISTILL.mode=dml", f"DISTILL.config={_partner_config(tmp_path)}")
    student = build_model(cfg)
    d = distill.build(cfg, student)
    assert d.mode == "dml" and d.partner_cfg.MODEL.name == "TSM" and d.parts() == {"peer": d.partner}
    rates = {g.get("learning_rate", 1.0) for g in d.param_groups(cfg.OPTIMIZER)}
    assert rates == {1.0, 10.0}  # the peer's config's head.fc.bias x10
    before_s, before_p = _snapshot(student), _snapshot(d.partner)
    loss, logits = _step(d, *_batch())
    assert logits.shape == [2, K] and float(loss) > 0
    assert any(not np.array_equal(before_s[k], v.numpy()) for k, v in student.state_dict().items())
    assert any(not np.array_equal(before_p[k], v.numpy()) for k, v in d.partner.state_dict().items())
    d.net.eval()  # evaluation and export see the student's logits alone
    x, _ = _batch()
    np.testing.assert_array_equal(d.net(x).numpy(), student(x).numpy())


def test_the_teacher_form_trains_the_student_only_and_keeps_the_teacher_frozen_in_eval_mode(tmp_path):
    from trainer.models import build_model

    teacher_cfg = tiny_cfg(tmp_path, name="t.yaml")
    paddle.seed(7)
    teacher = build_model(teacher_cfg)
    checkpoint.save_weights(teacher, str(tmp_path / "teacher.pdparams"))
    cfg = tiny_cfg(
        tmp_path,
        "DISTILL.mode=teacher",
        f"DISTILL.config={_partner_config(tmp_path, 'TSN')}",
        f"DISTILL.weights={tmp_path / 'teacher.pdparams'}",
        "DISTILL.temperature=4",
    )
    student = build_model(cfg)
    d = distill.build(cfg, student)
    assert d.net is student and d.parts() == {} and "teacher" in d.holds("TSN")
    before_t = _snapshot(d.partner)
    np.testing.assert_array_equal(before_t["head.fc.weight"], teacher.head.fc.weight.numpy())
    _step(d, *_batch())
    assert not d.partner.training
    for k, v in d.partner.state_dict().items():  # neither weights nor BatchNorm statistics move
        np.testing.assert_array_equal(before_t[k], v.numpy(), err_msg=k)


def test_distillation_errors_are_one_line_config_errors(tmp_path):
    from trainer.models import build_model

    with pytest.raises(ConfigError, match=r"DISTILL.config is empty .*DISTILL.mode = dml needs the config file"):
        tiny_cfg(tmp_path, "DISTILL.mode=dml")
    with pytest.raises(ConfigError, match=r"DISTILL.weights is empty .*teacher's trained weights"):
        tiny_cfg(tmp_path, "DISTILL.mode=teacher", "DISTILL.config=x.yaml")
    with pytest.raises(ConfigError, match=r"DISTILL.temperature = 0.0 .*must be > 0"):
        tiny_cfg(tmp_path, "DISTILL.temperature=0")
    cfg = tiny_cfg(tmp_path, "DISTILL.mode=dml", f"DISTILL.config={tmp_path / 'nope.yaml'}")
    with pytest.raises(ConfigError, match=r"DISTILL.config = '.*nope.yaml': no such file"):
        distill.build(cfg, build_model(cfg))
    cfg = tiny_cfg(tmp_path, "DISTILL.mode=dml", f"DISTILL.config={_partner_config(tmp_path, num_classes=7)}")
    with pytest.raises(ConfigError, match=r"MODEL.head.num_classes = 7, this config's is 5"):
        distill.build(cfg, build_model(cfg))
    paddle.seed(0)
    three = build_model(tiny_cfg(tmp_path, num_classes=3, name="t3.yaml"))
    checkpoint.save_weights(three, str(tmp_path / "t3.pdparams"))
    cfg = tiny_cfg(
        tmp_path,
        "DISTILL.mode=teacher",
        f"DISTILL.config={_partner_config(tmp_path, 'TSN')}",
        f"DISTILL.weights={tmp_path / 't3.pdparams'}",
    )
    with pytest.raises(
        ConfigError, match=r"^config error: DISTILL.weights: .*t3.pdparams (does not fit|was trained for 3 classes)"
    ):
        distill.build(cfg, build_model(cfg))


def test_a_dml_checkpoint_does_not_resume_a_run_without_its_peer_or_the_reverse(tmp_path):
    from trainer.checkpoint import restore
    from trainer.models import build_model
    from trainer.solver import build_optimizer

    cfg = tiny_cfg(tmp_path, "DISTILL.mode=dml", f"DISTILL.config={_partner_config(tmp_path)}")
    student = build_model(cfg)
    d = distill.build(cfg, student)
    opt = build_optimizer(cfg.OPTIMIZER, 0.1, d.param_groups(cfg.OPTIMIZER))
    meta = dict(epoch=1, step=1, holds=d.holds("TSN"))
    checkpoint.save_state(str(tmp_path / "dml.pdckpt"), student, opt, parts=d.parts(), **meta)
    checkpoint.save_state(str(tmp_path / "plain.pdckpt"), student, opt, epoch=1, step=1)
    with pytest.raises(ConfigError, match=r"holds model: the student, TSN; peer: the DML peer, TSM .* alone"):
        restore(str(tmp_path / "dml.pdckpt"), student, opt)
    with pytest.raises(ConfigError, match=r"holds model: one network, this run trains a peer beside the model"):
        restore(str(tmp_path / "plain.pdckpt"), student, opt, parts=d.parts())
    restore(str(tmp_path / "dml.pdckpt"), student, opt, parts=d.parts())


def _run(args, cwd, log_dir):
    env = {**os.environ, "PYTHON": sys.executable, "LOG_DIR": str(log_dir), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        ["bash", os.path.join(ROOT, "run_dist.sh"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {r: (log_dir / f"workerlog.{r}").read_text() for r in (0, 1)}


@pytest.mark.slow
def test_two_rank_dml_resumes_bit_for_bit_and_exports_the_student_alone(demo_dataset, tmp_path):
    """2 ranks, 2 epochs of a TSN student with a TSM peer; a second run resumed from the first one's epoch-1
    checkpoint ends with the same weights (student and peer) on both ranks; best.pdparams and the export
    are the student's."""
    from trainer import weights
    from trainer.config import load_config
    from trainer.models import build_model

    peer = _write(
        tmp_path / "peer.yaml",
        "MODEL: {name: TSM, backbone: {depth: 18, base_channels: 8}, head: {num_classes: 6}}\n",
    )
    cfg = tiny_config(tmp_path / "s.yaml", demo_dataset, tmp_path / "a", batch_size=3)
    with open(cfg, "a") as f:
        f.write(f"save_interval: 1\nDISTILL: {{mode: dml, config: {peer}, temperature: 2.0}}\n")
    straight = _run(["train", "TSN", cfg, "--nproc", "2"], tmp_path, tmp_path / "log_a")
    digests = weight_digests(straight[0] + straight[1])
    assert digests["0"] == digests["1"] and "distillation: dml, peer TSM" in straight[0]
    resumed = _run(
        [
            "train",
            "TSN",
            cfg,
            "--nproc",
            "2",
            "-o",
            f"resume={tmp_path / 'a' / 'epoch_1.pdckpt'}",
            "-o",
            f"output_dir={tmp_path / 'b'}",
        ],
        tmp_path,
        tmp_path / "log_b",
    )
    assert weight_digests(resumed[0] + resumed[1]) == digests

    state = weights.load_checkpoint(str(tmp_path / "a" / "latest.pdckpt"))
    assert set(state) >= {"model", "optimizer", "meta", "peer"}
    assert state["meta"]["holds"]["peer"].startswith("the DML peer, TSM")
    student = build_model(load_config(cfg))
    weights.load_weights(student, str(tmp_path / "a" / "best.pdparams"))  # every tensor, the student's only
    assert not any(k.startswith("peer.") for k in weights.load_file(str(tmp_path / "a" / "best.pdparams")))
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "trainer", "main.py"), "export", "-c", cfg],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"export", out.stdout + out.stderr)


def test_the_motion_distillation_config_names_a_teacher_and_multipliers_the_student_has():
    from trainer.config import load_config
    from trainer.models import build_model
    from trainer.solver import lr_multipliers

    cfg = load_config(os.path.join(ROOT, "configs", "pptsmv2_motion_distill.yaml"))
    assert (cfg.MODEL.name, cfg.DISTILL.mode, cfg.DISTILL.temperature) == ("PP-TSMv2", "teacher", 4.0)
    assert os.path.isfile(os.path.join(ROOT, cfg.DISTILL.config))
    assert load_config(os.path.join(ROOT, cfg.DISTILL.config)).MODEL.name == "TSM"
    mults = lr_multipliers(cfg.OPTIMIZER, build_model(cfg))
    assert mults == {"backbone.temporal_attention.fc.weight": 5.0, "backbone.temporal_attention.fc.bias": 10.0}
    dml = load_config(os.path.join(ROOT, "configs", "pptsmv2_dml.yaml"))
    assert (dml.MODEL.name, dml.PIPELINE.num_segments, dml.DISTILL.mode, dml.DISTILL.config) == (
        "PP-TSMv2",
        16,
        "dml",
        "configs/pptsm.yaml",
    )
