"""Distillation, a training mode of any model (docs/training.md "Distillation").

DML (deep mutual learning, PaddleVideo's PP-TSMv2 recipe) trains the model (the student) and a peer
together: each learns the labels and the other's softened outputs. The teacher form trains the student on
the labels and on a frozen, trained teacher's softened outputs. Evaluation, precise-BN's statistics that
evaluation uses, ``best.pdparams`` and export are the student's; a DML checkpoint holds the peer beside it.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field

import numpy as np
import paddle
import paddle.nn.functional as F

from common.log import get_logger

from .config import ConfigError, load_config
from .losses import classification_loss, mixup
from .models import build_model
from .solver import param_groups
from .weights import load_pretrained, load_weights

log = get_logger(__name__)


def softened_kl(target_logits, logits, temperature: float = 1.0):
    """Mean over the batch of KL(softmax(target / T) || softmax(logits / T)), in float32."""
    t = F.log_softmax(target_logits.astype("float32") / temperature, axis=1)
    s = F.log_softmax(logits.astype("float32") / temperature, axis=1)
    return (t.exp() * (t - s)).sum(axis=1).mean()


def _label_loss(logits, labels, smoothing: float, mixed):
    """The cross-entropy of the plain loop: against smoothed labels, mixed by ``mixed`` = (partners, lam)."""
    loss = classification_loss(logits, labels, smoothing)
    if mixed is not None:
        partners, lam = mixed
        loss = lam * loss + (1 - lam) * classification_loss(logits, partners, smoothing)
    return loss


def dml_loss(student, peer, labels, *, smoothing=0.0, temperature=1.0, weight=1.0, mixed=None):
    """CE(student) + CE(peer) + weight * T^2 * (KL(peer || student) + KL(student || peer)) / 2; both networks
    get the gradient of the symmetric term, as PaddleVideo's DistillationDMLLoss (there T = 1, weight 1)."""
    kl = (softened_kl(peer, student, temperature) + softened_kl(student, peer, temperature)) / 2
    ce = _label_loss(student, labels, smoothing, mixed) + _label_loss(peer, labels, smoothing, mixed)
    return ce + weight * temperature**2 * kl


def teacher_loss(student, teacher, labels, *, smoothing=0.0, temperature=1.0, weight=1.0, mixed=None):
    """CE(student) + weight * T^2 * KL(teacher || student) (Hinton et al. 2015); the teacher is a constant."""
    kl = softened_kl(teacher.detach(), student, temperature)
    return _label_loss(student, labels, smoothing, mixed) + weight * temperature**2 * kl


class DMLPair(paddle.nn.Layer):
    """The student and its peer as one network, so that one data-parallel wrapper, one optimizer and
    precise-BN cover both: training returns (student logits, peer logits), evaluation the student's."""

    def __init__(self, student, peer):
        super().__init__()
        self.student, self.peer = student, peer

    def forward(self, x):
        logits = self.student(x)
        return (logits, self.peer(x)) if self.training else logits


@dataclass(kw_only=True)
class Distiller:
    """What a distillation run adds to the plain one: the partner network and the loss with it."""

    mode: str  # "dml" or "teacher"
    temperature: float
    weight: float
    student: paddle.nn.Layer
    partner: paddle.nn.Layer  # the peer (trained) or the teacher (frozen, eval mode, outside ``net``)
    partner_cfg: dict  # the partner's config (its MODEL section built it)
    source: str  # where it came from, for the checkpoint's "holds" and the log
    net: paddle.nn.Layer = field(init=False)  # what the loop trains, wraps for data parallelism, precise-BNs

    def __post_init__(self):
        self.net = DMLPair(self.student, self.partner) if self.mode == "dml" else self.student

    def train_loss(self, net, imgs, labels, smoothing: float, mixup_alpha: float, rng: np.random.Generator):
        """(loss, student logits) of one batch; the signature of ``engine.train_loss``. Mixup mixes the clips
        that both networks see and the labels of the cross-entropy terms; smoothing applies to those terms."""
        mixed = None
        if mixup_alpha > 0:
            imgs, partners, lam = mixup(imgs, labels, mixup_alpha, rng)
            mixed = (partners, lam)
        terms = dict(smoothing=smoothing, temperature=self.temperature, weight=self.weight, mixed=mixed)
        if self.mode == "dml":
            student, peer = net(imgs)
            return dml_loss(student, peer, labels, **terms), student
        student = net(imgs)
        with paddle.no_grad():
            teacher = self.partner(imgs)
        return teacher_loss(student, teacher, labels, **terms), student

    def param_groups(self, opt_cfg) -> list[dict]:
        """The optimizer's groups: the student's by this config's OPTIMIZER, a peer's by its own config's
        multipliers and weight decay (one optimizer, one LR schedule: the student config's)."""
        groups = param_groups(opt_cfg, self.student)
        if self.mode == "dml":
            groups += param_groups(self.partner_cfg.OPTIMIZER, self.partner, f"the peer ({self.source})")
        return groups

    def parts(self) -> dict:
        """The networks a checkpoint holds beside the student (its "model")."""
        return {"peer": self.partner} if self.mode == "dml" else {}

    def describe(self) -> str:
        partner = "peer" if self.mode == "dml" else "frozen teacher"
        return (
            f"distillation: {self.mode}, {partner} {self.partner_cfg.MODEL.name} from {self.source}, "
            f"T {self.temperature:g}, weight {self.weight:g}"
        )

    def holds(self, model_name: str) -> dict:
        """What the checkpoint's tensors are, for its metadata."""
        out = {"model": f"the student, {model_name}"}
        if self.mode == "dml":
            out["peer"] = f"the DML peer, {self.partner_cfg.MODEL.name} from {self.source}"
        else:
            out["teacher"] = f"not stored: frozen {self.partner_cfg.MODEL.name} read from {self.source}"
        return out


def build(cfg, student) -> Distiller | None:
    """The distiller of ``cfg.DISTILL`` for ``student``, or None without distillation. The partner's network
    is its config's MODEL section with this config's PIPELINE (both see the same clips)."""
    d = cfg.DISTILL
    if d.mode == "none":
        return None
    for key in ("config", "weights"):
        if d[key] and not os.path.isfile(d[key]):
            raise ConfigError(f"config error: DISTILL.{key} = {d[key]!r}: no such file")
    other = load_config(d.config)
    if other.MODEL.head.num_classes != cfg.MODEL.head.num_classes:
        raise ConfigError(
            f"config error: DISTILL.config = {d.config}: its MODEL.head.num_classes = "
            f"{other.MODEL.head.num_classes}, this config's is {cfg.MODEL.head.num_classes}; the two networks "
            "must score the same classes"
        )
    partner_cfg = copy.deepcopy(cfg)
    partner_cfg["MODEL"], partner_cfg["OPTIMIZER"] = other.MODEL, other.OPTIMIZER
    if d.weights:  # the given weights replace the ImageNet start of its config
        partner_cfg.MODEL.backbone["pretrained"] = ""
    partner = build_model(partner_cfg)
    if d.mode == "teacher":
        try:
            load_weights(partner, d.weights)
        except ValueError as e:  # another network's file, or not a weights file: one line naming the key
            raise ConfigError(f"config error: DISTILL.weights: {e} (the teacher is DISTILL.config's MODEL)") from None
        partner.eval()
        for p in partner.parameters():
            p.stop_gradient = True
        source = d.weights
    else:
        if d.weights:
            log.info(load_pretrained(partner, d.weights))
        source = d.weights or d.config
    return Distiller(
        mode=d.mode,
        temperature=d.temperature,
        weight=d.weight,
        student=student,
        partner=partner,
        partner_cfg=partner_cfg,
        source=source,
    )


def restore_parts(state: dict, parts: dict, path: str) -> None:
    """Load the networks a checkpoint holds beside the student (``parts``: {name: network}); a checkpoint
    with other parts than this run (a DML checkpoint resumed without DML, or the reverse) is a one-line
    ConfigError: its optimizer state is that of other parameters."""
    extra = sorted(set(state) - {"model", "optimizer", "meta", "scaler"} - set(parts))
    lacking = sorted(set(parts) - set(state))
    if extra or lacking:
        holds = state["meta"].get("holds") or {"model": "one network"}
        raise ConfigError(
            f"config error: resume: {path} holds {'; '.join(f'{k}: {v}' for k, v in holds.items())}, this run "
            f"trains {'a ' + ' and a '.join(lacking) + ' beside the model' if lacking else 'the model alone'} "
            "(DISTILL.mode differs); resume with the config it was trained with, or start a new output_dir"
        )
    for name, net in parts.items():
        own = net.state_dict()
        wrong = sorted(k for k in set(own) ^ set(state[name])) + sorted(
            k for k in set(own) & set(state[name]) if list(own[k].shape) != list(state[name][k].shape)
        )
        if wrong:
            raise ConfigError(
                f"config error: resume: the {name} in {path} is another network (tensors {wrong[:3]} differ); "
                "resume with the DISTILL.config it was trained with"
            )
        net.set_state_dict(state[name])
