"""Train and evaluate the recognisers: one readable loop, the same on 1..N ranks, CPU or GPU."""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml

from common.log import get_logger
from dali_pipelines.clipspec import ClipSpec

from . import checkpoint, dist, distill
from .config import ConfigError, to_plain
from .losses import classification_loss, mixup
from .metrics import MetricsLog, topk_correct
from .models import build_model
from .precise_bn import precise_bn
from .solver import build_optimizer, build_scheduler

log = get_logger(__name__)


def make_loader(cfg, env: dist.Env, mode: str, list_file: str | None = None, spec: ClipSpec | None = None, **options):
    """The one place the trainer asks dali_pipelines for data: the clip is ``spec``, by default
    ``ClipSpec.from_config(cfg, mode)`` for this device, the rest the config's; ``options`` override the
    rest (``dali_pipelines.LoaderRun``'s fields, e.g. ``samples``, ``max_batches``)."""
    from dali_pipelines import LoaderRun, build_spec_loader

    d = cfg.DATASET
    list_file = list_file or {"train": d.train_list, "val": d.val_list, "test": d.test_list}[mode]
    if not list_file and not options.get("samples"):
        raise ConfigError(
            f"config error: DATASET.{mode}_list is empty; set it in the config or with -o DATASET.{mode}_list=PATH"
        )
    run = dict(
        batch_size=d.batch_size,
        device=env.device,
        device_id=env.device_id,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
        data_prefix=d.data_prefix or None,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
        num_workers=d.num_workers,
        worker_timeout=d.worker_timeout,
        dtype="float16" if _amp_dtype(cfg, env) == "float16" else "float32",
    )
    spec = spec or ClipSpec.from_config(cfg, mode, device=env.device)
    return build_spec_loader(list_file, spec, LoaderRun(**{**run, **options}))


def _amp_dtype(cfg, env) -> str | None:
    """The autocast dtype, or None: AMP runs on GPUs only."""
    return cfg.amp_dtype if cfg.amp and env.device == "gpu" else None


def train_loss(net, imgs, labels, smoothing: float, mixup_alpha: float, rng: np.random.Generator):
    """(loss, logits) of one training batch, exactly as the training loop computes them: with
    ``mixup_alpha`` > 0 the clips are mixed and the loss is ``lam * L(y) + (1 - lam) * L(y_partner)``,
    each ``L`` the cross-entropy against labels smoothed by ``smoothing``."""
    if mixup_alpha > 0:
        imgs, partners, lam = mixup(imgs, labels, mixup_alpha, rng)
    logits = net(imgs)
    loss = classification_loss(logits, labels, smoothing)
    if mixup_alpha > 0:
        loss = lam * loss + (1 - lam) * classification_loss(logits, partners, smoothing)
    return loss, logits


def evaluate(model, loader, env: dist.Env, num_classes: int | None = None) -> dict:
    """Top-1/top-5 (and, with ``num_classes``, the confusion matrix) over exactly the readable samples
    of the loader's list, summed over all ranks."""
    model.eval()
    counts = np.zeros(4)  # top1 hits, top5 hits, samples, loss sum
    confusion = np.zeros((num_classes or 0, num_classes or 0))
    skipped_before = loader.skipped
    with paddle.no_grad():
        for imgs, labels in loader:
            logits = model(imgs.astype("float32"))
            loss = F.cross_entropy(logits, labels, reduction="sum")
            scores, truth = logits.numpy(), labels.numpy()
            c1, c5 = topk_correct(scores, truth, (1, min(5, scores.shape[1])))
            counts += (c1, c5, truth.shape[0], float(loss))
            if num_classes:
                np.add.at(confusion, (truth, scores.argmax(axis=1)), 1)
    summed = dist.all_reduce_sum(np.concatenate([counts, [loader.skipped - skipped_before], confusion.ravel()]), env)
    top1, top5, n, loss, skipped = summed[:5]
    model.train()
    result = {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "samples": int(n), "skipped": int(skipped)}
    if num_classes:
        confusion = summed[5:].reshape(num_classes, num_classes).astype(np.int64)
        per_class = np.diag(confusion) / np.maximum(confusion.sum(axis=1), 1)
        present = confusion.sum(axis=1) > 0
        result.update(
            mean_class_accuracy=float(per_class[present].mean()), confusion=confusion, per_class_accuracy=per_class
        )
    return result


def weights_digest(model) -> str:
    """SHA-256 over all parameters and buffers, in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


_DIGEST_LINE = re.compile(r"rank (\d+): weights digest (\w+)")


def read_digests(text: str) -> dict[str, str]:
    """{rank: digest} of the 'rank R: weights digest D' lines ``train`` ends with on every rank (a rank's
    log, or several joined; a rank named twice gives its last)."""
    return dict(_DIGEST_LINE.findall(text))


class _Window:
    """Sums over the steps between two log lines; loss and hits stay on the device until logged."""

    def __init__(self):
        self.data = self.batch = 0.0
        self.steps, self.samples, self.loss, self.hits = 0, 0, 0.0, 0

    def add(self, data_s, batch_s, loss, logits, labels):
        n = labels.shape[0]
        self.steps += 1
        self.data += data_s
        self.batch += batch_s
        self.samples += n
        self.loss += loss.detach() * n
        self.hits += (logits.argmax(axis=1) == labels).astype("int64").sum()


@dataclass(kw_only=True)
class _Run:
    """What the epochs of one training run work with; ``step``, ``best``, ``last_eval`` and ``totals``
    change as it goes."""

    cfg: Any
    env: dist.Env
    model: paddle.nn.Layer  # the model as saved and evaluated (with distillation, the student)
    trained: paddle.nn.Layer  # what the optimizer trains (with DML, the student and its peer)
    net: paddle.nn.Layer  # ``trained`` as it runs (wrapped for data parallelism on several ranks)
    optimizer: Any
    scheduler: Any  # the LR schedule, stepped once per batch
    scaler: Any  # the AMP loss scaler; None without float16 AMP
    loader: Any
    val_loader: Any  # None: the run validates nothing
    bn_loader: Any  # precise-BN's batches; None without it
    log: MetricsLog
    checkpoints: checkpoint.Checkpoints
    distiller: distill.Distiller | None = None
    start_epoch: int = 0
    step: int = 0
    best: dict = field(default_factory=lambda: {"top1": -1.0})
    last_eval: dict = field(default_factory=dict)
    loss_fn: Any = None  # train_loss when None; a distillation run's (trainer.distill)
    totals: dict = field(default_factory=lambda: {"data": 0.0, "batch": 0.0, "samples": 0})


def train_step(
    net, optimizer, scaler, imgs, labels, amp: str | None, *, smoothing=0.0, alpha=0.0, rng=None, loss_fn=None
):
    """One optimiser step; returns (loss, logits). ``amp`` ("float16" | "bfloat16" | None) runs the
    forward pass under autocast; float16 needs ``scaler`` (a GradScaler), bfloat16 needs none.
    ``loss_fn`` (``train_loss``'s signature) replaces ``train_loss``: distillation's."""
    with paddle.amp.auto_cast(enable=amp is not None, dtype=amp or "float16"):
        loss, logits = (loss_fn or train_loss)(net, imgs, labels, smoothing, alpha, rng)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.clear_grad()
    return loss, logits


def _train_epoch(run: _Run, epoch: int) -> None:
    cfg, env, loader, optimizer = run.cfg, run.env, run.loader, run.optimizer
    amp = _amp_dtype(cfg, env)
    terms = dict(  # the loss's, as train_step takes them
        smoothing=cfg.MODEL.head.label_smoothing,
        alpha=cfg.PIPELINE.mixup_alpha,
        rng=np.random.default_rng([cfg.seed, env.rank, epoch, 7]),
        loss_fn=run.loss_fn,
    )
    run.net.train()
    win, steps, t_prev = _Window(), len(loader), time.time()
    for imgs, labels in loader:
        t_data = time.time()
        loss, logits = train_step(run.net, optimizer, run.scaler, imgs, labels, amp, **terms)
        run.scheduler.step()
        run.step += 1
        t_end = time.time()
        win.add(t_data - t_prev, t_end - t_prev, loss, logits, labels)
        t_prev = t_end
        if run.step % cfg.log_interval == 0 or run.step % steps == 0:
            per_batch = win.batch / win.steps
            rec = dict(
                mode="train",
                epoch=epoch + 1,
                step=run.step,
                lr=run.scheduler.get_lr(),
                loss=float(win.loss) / win.samples,
                top1=float(win.hits) / win.samples,
                samples_per_s=win.samples * env.world_size / win.batch,
                data_time=win.data / win.steps,
                batch_time=per_batch,
                skipped=loader.skipped,
            )
            run.log.write(**rec)
            if env.is_main:
                log.info(
                    f"epoch {epoch + 1}/{cfg.epochs} step {run.step} loss {rec['loss']:.4f} top1 {rec['top1']:.3f} "
                    f"lr {rec['lr']:.4g} {rec['samples_per_s']:.1f} clips/s data {rec['data_time'] * 1000:.0f}ms "
                    f"batch {rec['batch_time'] * 1000:.0f}ms"
                )
            run.totals["data"] += win.data
            run.totals["batch"] += win.batch
            run.totals["samples"] += win.samples
            win = _Window()


def train(cfg, env: dist.Env) -> dict:
    """Train ``cfg``'s model for ``cfg.epochs`` epochs, from the checkpoint ``cfg.resume`` names (or a
    restarted job's own) when there is one: validating, checkpointing and logging as configured; returns
    the run's summary."""
    run = _start(cfg, env)
    t_start = time.time()
    for epoch in range(run.start_epoch, cfg.epochs):
        # everything random in an epoch derives from (seed, rank, epoch): a resumed run repeats it
        paddle.seed(cfg.seed + 1000 * (env.rank + 1) + epoch)
        run.loader.set_epoch(epoch)
        _train_epoch(run, epoch)
        dist.average_bn_buffers(run.trained, env)  # every rank: it is a collective
        last = epoch + 1 == cfg.epochs
        if run.val_loader is not None and ((epoch + 1) % cfg.val_interval == 0 or last):
            _validate(run, epoch)
        _save_epoch(run, epoch, as_best=run.val_loader is None and last)
    return _finish(run, time.time() - t_start)


def _start(cfg, env: dist.Env) -> _Run:
    """Everything a run needs before its first step: model, loaders, optimizer, the checkpoint it
    resumes (if any), data parallelism and the AMP scaler; rank 0 records the config and says what runs."""
    checkpoints = checkpoint.Checkpoints(
        cfg.output_dir, save_interval=cfg.save_interval, is_main=env.is_main, keep_epochs=cfg.keep_checkpoints or None
    )
    metrics = MetricsLog(cfg.output_dir, env.is_main)  # not `log`: that is the module logger
    checkpoints.find_resume(cfg.resume)
    paddle.seed(cfg.seed)  # identical initial weights on every rank (DataParallel also broadcasts)
    model = build_model(cfg)
    distiller = distill.build(cfg, model)  # None without DISTILL
    trained = distiller.net if distiller else model  # with DML, the student and its peer
    train_loader, val_loader, bn_loader = _loaders(cfg, env)
    global_batch = cfg.DATASET.batch_size * env.world_size
    scheduler = build_scheduler(cfg.OPTIMIZER, len(train_loader), cfg.epochs, global_batch)
    optimizer = build_optimizer(cfg.OPTIMIZER, scheduler, distiller.param_groups(cfg.OPTIMIZER) if distiller else model)
    run = _Run(
        cfg=cfg,
        env=env,
        model=model,
        trained=trained,
        net=trained,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=None,
        loader=train_loader,
        val_loader=val_loader,
        bn_loader=bn_loader,
        log=metrics,
        checkpoints=checkpoints,
        distiller=distiller,
        loss_fn=distiller.train_loss if distiller else None,
    )
    checkpoints.clean()
    scaler_state = _resume(run)
    if env.is_main:
        with open(os.path.join(cfg.output_dir, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_plain(cfg), f, sort_keys=False)
    if env.world_size > 1:
        from paddle.distributed import fleet

        run.net, run.optimizer = fleet.distributed_model(trained), fleet.distributed_optimizer(optimizer)
    run.scaler = paddle.amp.GradScaler() if _amp_dtype(cfg, env) == "float16" else None  # bf16 needs no scaling
    if run.scaler is not None and checkpoints.resume_path and scaler_state:
        run.scaler.load_state_dict(scaler_state)
    if env.is_main:
        _announce(run, global_batch)
    return run


def _loaders(cfg, env: dist.Env) -> tuple:
    """(training, validation, precise-BN) loaders; the last two None when the run has no use for them."""
    train_loader = make_loader(cfg, env, "train")
    val_loader = make_loader(cfg, env, "val") if cfg.DATASET.val_list else None
    bn_loader = (
        make_loader(cfg, env, "train", max_batches=cfg.PRECISE_BN.num_iters)
        if val_loader is not None and cfg.PRECISE_BN.enabled
        else None
    )
    return train_loader, val_loader, bn_loader


def _resume(run: _Run) -> dict | None:
    """Bring back the checkpoint the run resumes from, if any: weights, optimizer, the schedule's place,
    epoch and best result; returns the AMP scaler's saved state. A fresh run starts new curves."""
    cfg, env, resume = run.cfg, run.env, run.checkpoints.resume_path
    if not resume:
        if env.is_main:
            run.log.start_new()  # a fresh run does not append to an earlier run's curves
        return None
    parts = run.distiller.parts() if run.distiller else {}
    meta, scaler_state = run.checkpoints.resume(run.model, run.optimizer, cfg.MODEL, parts)
    if meta.get("seed") != cfg.seed or meta.get("world_size") != env.world_size:
        log.info(  # on stdout, where it always was: the run goes on as asked
            f"train: warning: {resume} was written with seed {meta.get('seed')} on "
            f"{meta.get('world_size')} rank(s); the resumed run will not repeat the original exactly"
        )
    run.start_epoch, run.best = meta["epoch"], meta["best"]
    run.step = checkpoint.continue_schedule(run.scheduler, meta, len(run.loader))
    return scaler_state


def _announce(run: _Run, global_batch: int) -> None:
    cfg, env, loader, amp = run.cfg, run.env, run.loader, _amp_dtype(run.cfg, run.env)
    resume = run.checkpoints.resume_path
    log.info(
        f"train: {env.world_size} rank(s) on {env.device}, {loader.num_samples} clips/rank/epoch "
        f"read by {loader.num_workers} feed worker(s)/rank, "
        f"{len(loader)} steps/epoch x {cfg.epochs} epochs, global batch {global_batch}, "
        f"lr {run.scheduler.get_lr():.4g}"
        + (f"; resumed from {resume} at epoch {run.start_epoch}" if resume else "")
        + (f"; AMP {amp}" + (" with GradScaler" if run.scaler else "") if amp else "")
        + (f"; {run.distiller.describe()}" if run.distiller else "")
    )


def _validate(run: _Run, epoch: int) -> None:
    """Precise-BN (when on), then the validation set; a new best top-1 becomes best.pdparams."""
    env = run.env
    if run.bn_loader is not None:
        run.bn_loader.set_epoch(epoch)
        precise_bn(run.net, run.bn_loader, env)
    result = run.last_eval = evaluate(run.net, run.val_loader, env)
    run.log.write(mode="val", epoch=epoch + 1, step=run.step, **result)
    if env.is_main:
        log.info(
            f"epoch {epoch + 1} val top1 {result['top1']:.4f} top5 {result['top5']:.4f} "
            f"loss {result['loss']:.4f} ({result['samples']} clips)"
        )
    if result["top1"] > run.best["top1"]:
        run.best = {**result, "epoch": epoch + 1}
        run.checkpoints.save_best(run.model, **run.best)


def _save_epoch(run: _Run, epoch: int, as_best: bool) -> None:
    """The checkpoints of the epoch just trained (rank 0 writes them)."""
    cfg, env = run.cfg, run.env
    if not env.is_main:
        return
    meta = dict(
        step=run.step,
        best=run.best,
        seed=cfg.seed,
        world_size=env.world_size,
        steps_per_epoch=len(run.loader),
        config=to_plain(cfg),
    )
    parts = {}
    if run.distiller:  # the checkpoint says what it holds: the student as "model", a DML peer beside it
        parts, meta["holds"] = run.distiller.parts(), run.distiller.holds(cfg.MODEL.name)
    run.checkpoints.save_epoch(epoch + 1, run.model, run.optimizer, run.scaler, parts=parts, as_best=as_best, **meta)


def _finish(run: _Run, wall: float) -> dict:
    """Every rank's weights digest, the run's summary (logged and returned) and rank 0's curves."""
    env, out = run.env, run.cfg.output_dir
    # every rank logs a digest of its weights: equal digests prove the ranks stayed in sync
    log.info(f"rank {env.rank}: weights digest {weights_digest(run.trained)}")
    best, totals = run.best, run.totals
    summary = {
        "val_top1": run.last_eval.get("top1"),
        "best_val_top1": best["top1"] if best["top1"] >= 0 else None,
        "best_epoch": best.get("epoch"),
        "wall_s": wall,
        "train_samples_per_s": totals["samples"] * env.world_size / max(totals["batch"], 1e-9),
        "data_wait_share": totals["data"] / max(totals["batch"], 1e-9),
    }
    run.log.write(mode="summary", **summary)
    run.log.close()
    if env.is_main:
        from .plots import plot_curves

        plot_curves(run.log.path, os.path.join(out, "curves.png"))
    return summary
