"""Train and evaluate the recognisers: one readable loop, the same on 1..N ranks, CPU or GPU."""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml

from common.runlock import RUN_ID_ENV

from . import checkpoint, dist, distill, weights
from .config import ConfigError, segments_in_test, to_plain
from .losses import classification_loss, mixup
from .metrics import MetricsLog, topk_correct
from .models import build_model
from .precise_bn import precise_bn
from .solver import build_optimizer, build_scheduler


def make_loader(cfg, env: dist.Env, mode: str, list_file: str | None = None, source: str | None = None, **options):
    """The one place the trainer asks dali_pipelines for data; ``options`` override the config's."""
    from dali_pipelines import build_loader

    d, p = cfg.DATASET, cfg.PIPELINE
    list_file = list_file or {"train": d.train_list, "val": d.val_list, "test": d.test_list}[mode]
    if not list_file and not options.get("samples"):
        raise ConfigError(
            f"config error: DATASET.{mode}_list is empty; set it in the config or with -o DATASET.{mode}_list=PATH"
        )
    settings = dict(
        num_clips=p.test_num_clips,
        num_crops=p.test_num_crops,
        crop=p.crop,
        flip=p.flip,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
        device_id=env.device_id,
        num_workers=d.num_workers,
        worker_timeout=d.worker_timeout,
        allow_partial_videos=d.allow_partial_videos,
        num_classes=cfg.MODEL.head.num_classes,
        sampling=p.sampling,
        dense_interval=p.dense_interval,
        dtype="float16" if _amp_dtype(cfg, env) == "float16" else "float32",
    )
    settings.update(options)
    segments = segments_in_test(cfg) if mode == "test" else p.num_segments
    return build_loader(
        list_file,
        source=source or d.source,
        mode=mode,
        batch_size=d.batch_size,
        num_segments=segments,
        target_size=p.target_size,
        short_size=p.short_size,
        device=env.device,
        rank=env.rank,
        world_size=env.world_size,
        seed=cfg.seed,
        data_prefix=d.data_prefix or None,
        **settings,
    )


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


def restore(path: str, model, optimizer, model_cfg=None, parts=None, state=None) -> tuple[dict, dict | None]:
    """Load a training checkpoint into ``model`` and ``optimizer`` (its state holds the LR schedule's position)
    and into the networks of ``parts`` (a DML peer, trainer.distill); returns the checkpoint's metadata and
    the AMP loss scaler's state (None without AMP). A checkpoint of another model is a one-line ConfigError
    naming what differs (the MODEL keys, when the checkpoint records its config and ``model_cfg`` is given;
    else the tensors). ``state``: the checkpoint already loaded from ``path`` (resume=auto reads it once)."""
    state = weights.load_checkpoint(path) if state is None else state
    distill.restore_parts(state, parts or {}, path)
    saved = state["model"]
    differ = sum(weights.mismatch(model, saved), [])
    if differ:
        keys = _differing_keys(state["meta"].get("config", {}).get("MODEL"), to_plain(model_cfg or {}), "MODEL")
        what = "; ".join(keys) if keys else f"tensors {differ[:3]}{' ...' if len(differ) > 3 else ''} differ"
        raise ConfigError(
            f"config error: resume: {path} holds another model ({what}); resume with the config "
            "it was trained with, or start a new output_dir"
        )
    model.set_state_dict(saved)
    optimizer.set_state_dict(state["optimizer"])
    return state["meta"], state.get("scaler")


def _differing_keys(saved, current, prefix: str) -> list[str]:
    if not isinstance(saved, dict) or not current:
        return []
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differing_keys(a, b, f"{prefix}.{key}")
        elif a != b and key != "pretrained":
            out.append(f"{prefix}.{key}: {a!r} in the checkpoint, {b!r} here")
    return out


def continue_schedule(scheduler, meta: dict, steps_per_epoch: int) -> int:
    """The global step to resume at. The LR schedule counts steps; when a resumed run has another number
    of steps per epoch (another batch size or world size) it goes on from the same epoch of the new
    schedule, not from the old step count, which would put it at the wrong place (or never decay)."""
    epoch, step = meta["epoch"], meta["step"]
    saved_steps = meta.get("steps_per_epoch") or (step // epoch if epoch else steps_per_epoch)
    if saved_steps == steps_per_epoch:
        return step
    step = epoch * steps_per_epoch
    scheduler.step(step)
    print(
        f"train: resuming with {steps_per_epoch} steps/epoch where the checkpoint had {saved_steps}: the LR "
        f"schedule goes on from epoch {epoch} (step {step} of the new schedule, lr {scheduler.get_lr():.4g})",
        flush=True,
    )
    return step


def _resume(cfg) -> tuple[str | None, dict | None]:
    """(the checkpoint to resume from, its state when finding it meant loading it, else None)."""
    if not cfg.resume:
        return _own_attempt(cfg)
    if cfg.resume == "auto":
        return _newest_loading_checkpoint(cfg.output_dir)
    if not os.path.isfile(cfg.resume):
        raise FileNotFoundError(
            f"resume: checkpoint {cfg.resume} does not exist (use -o resume=auto to "
            "continue from OUTPUT_DIR/latest.pdckpt when there is one)"
        )
    return cfg.resume, None


def _newest_loading_checkpoint(folder: str) -> tuple[str | None, dict | None]:
    """(path, loaded state) of the newest checkpoint in ``folder`` that loads: latest.pdckpt, else the
    epoch_N.pdckpt of the highest N; (None, None) when there is none. Those that do not load (empty, cut
    short by a full disk or a copy) are named once; when none loads the run stops naming them all."""
    epochs = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            n = name[len("epoch_") : -len(".pdckpt")]
            if name.startswith("epoch_") and name.endswith(".pdckpt") and n.isdigit():
                epochs.append((int(n), os.path.join(folder, name)))
    latest = os.path.join(folder, "latest.pdckpt")
    paths = ([latest] if os.path.isfile(latest) else []) + [p for _, p in sorted(epochs, reverse=True)]
    skipped = []
    for path in paths:
        try:
            state = weights.load_checkpoint(path)
        except (weights.WeightsError, OSError) as e:
            skipped.append(str(e))
            continue
        if skipped:
            print(f"train: resume=auto: skipped {'; '.join(skipped)}; resuming from {path}", flush=True)
        return path, state
    if skipped:
        raise weights.WeightsError(
            f"resume=auto: no checkpoint in {folder} loads ({'; '.join(skipped)}); move them away to start "
            "anew, or give one with -o resume=PATH"
        )
    return None, None


def _own_attempt(cfg) -> tuple[str | None, dict | None]:
    """OUTPUT_DIR/latest.pdckpt when an earlier attempt of this very job wrote it: run_dist.sh restarted the
    job after a rank died (run_dist.sh --max-restarts), and it goes on from the last complete epoch."""
    run_id = os.environ.get(RUN_ID_ENV)
    if not run_id:
        return None, None
    path, state = _newest_loading_checkpoint(cfg.output_dir)
    if path is None or state["meta"].get("run_id") != run_id:
        return None, None
    print(f"train: restarted: resuming this job ({run_id}) from {path}, epoch {state['meta']['epoch']}", flush=True)
    return path, state


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
    """What the epochs of one training run work with; ``step`` and ``totals`` grow as it goes."""

    cfg: Any
    env: dist.Env
    net: paddle.nn.Layer  # the model as trained (wrapped for data parallelism on several ranks)
    optimizer: Any
    scheduler: Any  # the LR schedule, stepped once per batch
    scaler: Any  # the AMP loss scaler; None without float16 AMP
    loader: Any
    log: MetricsLog
    step: int = 0
    loss_fn: Any = None  # train_loss when None; a distillation run's (trainer.distill)
    totals: dict = field(default_factory=lambda: {"data": 0.0, "batch": 0.0, "samples": 0})


def train_step(net, optimizer, scaler, imgs, labels, amp: str | None, smoothing=0.0, alpha=0.0, rng=None, loss_fn=None):
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
    smoothing, alpha = cfg.MODEL.head.label_smoothing, cfg.PIPELINE.mixup_alpha
    mix_rng = np.random.default_rng([cfg.seed, env.rank, epoch, 7])
    run.net.train()
    win, steps, t_prev = _Window(), len(loader), time.time()
    for imgs, labels in loader:
        t_data = time.time()
        loss, logits = train_step(
            run.net, optimizer, run.scaler, imgs, labels, amp, smoothing, alpha, mix_rng, loss_fn=run.loss_fn
        )
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
                print(
                    f"epoch {epoch + 1}/{cfg.epochs} step {run.step} loss {rec['loss']:.4f} top1 {rec['top1']:.3f} "
                    f"lr {rec['lr']:.4g} {rec['samples_per_s']:.1f} clips/s data {rec['data_time'] * 1000:.0f}ms "
                    f"batch {rec['batch_time'] * 1000:.0f}ms",
                    flush=True,
                )
            run.totals["data"] += win.data
            run.totals["batch"] += win.batch
            run.totals["samples"] += win.samples
            win = _Window()


def train(cfg, env: dist.Env) -> dict:
    out = cfg.output_dir
    log = MetricsLog(out, env.is_main)
    resume, resume_state = _resume(cfg)
    paddle.seed(cfg.seed)  # identical initial weights on every rank (DataParallel also broadcasts)
    model = build_model(cfg)
    distiller = distill.build(cfg, model)  # None without DISTILL
    trained = distiller.net if distiller else model  # with DML, the student and its peer
    train_loader = make_loader(cfg, env, "train")
    val_loader = make_loader(cfg, env, "val") if cfg.DATASET.val_list else None
    bn_loader = (
        make_loader(cfg, env, "train", max_batches=cfg.PRECISE_BN.num_iters)
        if val_loader is not None and cfg.PRECISE_BN.enabled
        else None
    )
    steps = len(train_loader)
    global_batch = cfg.DATASET.batch_size * env.world_size
    scheduler = build_scheduler(cfg.OPTIMIZER, steps, cfg.epochs, global_batch)
    optimizer = build_optimizer(cfg.OPTIMIZER, scheduler, distiller.param_groups(cfg.OPTIMIZER) if distiller else model)
    start_epoch, step, best, scaler_state = 0, 0, {"top1": -1.0}, None
    if env.is_main:
        checkpoint.remove_stale_temporaries(out)
    if resume:
        parts = distiller.parts() if distiller else {}
        meta, scaler_state = restore(resume, model, optimizer, cfg.MODEL, parts, state=resume_state)
        del resume_state  # the weights now live in the model and the optimizer
        if meta.get("seed") != cfg.seed or meta.get("world_size") != env.world_size:
            print(
                f"train: warning: {resume} was written with seed {meta.get('seed')} on "
                f"{meta.get('world_size')} rank(s); the resumed run will not repeat the original exactly"
            )
        start_epoch, step, best = meta["epoch"], continue_schedule(scheduler, meta, steps), meta["best"]
    elif env.is_main:
        log.start_new()  # a fresh run does not append to an earlier run's curves
    if env.is_main:
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_plain(cfg), f, sort_keys=False)
    net = trained
    if env.world_size > 1:
        from paddle.distributed import fleet

        net, optimizer = fleet.distributed_model(trained), fleet.distributed_optimizer(optimizer)
    scaler = paddle.amp.GradScaler() if _amp_dtype(cfg, env) == "float16" else None  # bf16 needs no scaling
    if scaler is not None and resume and scaler_state:
        scaler.load_state_dict(scaler_state)
    if env.is_main:
        print(
            f"train: {env.world_size} rank(s) on {env.device}, {train_loader.num_samples} clips/rank/epoch "
            f"read by {train_loader.num_workers} feed worker(s)/rank, "
            f"{steps} steps/epoch x {cfg.epochs} epochs, global batch {global_batch}, lr {scheduler.get_lr():.4g}"
            + (f"; resumed from {resume} at epoch {start_epoch}" if resume else "")
            + (f"; AMP {_amp_dtype(cfg, env)}" + (" with GradScaler" if scaler else "") if _amp_dtype(cfg, env) else "")
            + (f"; {distiller.describe()}" if distiller else ""),
            flush=True,
        )

    run = _Run(
        cfg=cfg,
        env=env,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader=train_loader,
        log=log,
        step=step,
        loss_fn=distiller.train_loss if distiller else None,
    )
    t_start, last_eval = time.time(), {}
    for epoch in range(start_epoch, cfg.epochs):
        # everything random in an epoch derives from (seed, rank, epoch): a resumed run repeats it
        paddle.seed(cfg.seed + 1000 * (env.rank + 1) + epoch)
        train_loader.set_epoch(epoch)
        _train_epoch(run, epoch)
        dist.average_bn_buffers(trained, env)  # every rank: it is a collective
        last = epoch + 1 == cfg.epochs
        if val_loader is not None and ((epoch + 1) % cfg.val_interval == 0 or last):
            if bn_loader is not None:
                bn_loader.set_epoch(epoch)
                precise_bn(net, bn_loader, env)
            last_eval = evaluate(net, val_loader, env)
            log.write(mode="val", epoch=epoch + 1, step=run.step, **last_eval)
            if env.is_main:
                print(
                    f"epoch {epoch + 1} val top1 {last_eval['top1']:.4f} top5 {last_eval['top5']:.4f} "
                    f"loss {last_eval['loss']:.4f} ({last_eval['samples']} clips)",
                    flush=True,
                )
            if last_eval["top1"] > best["top1"]:
                best = {**last_eval, "epoch": epoch + 1}
                if env.is_main:
                    checkpoint.save_weights(model, os.path.join(out, "best.pdparams"), **best)
        if env.is_main:
            meta = dict(
                run_id=os.environ.get(RUN_ID_ENV, ""),
                epoch=epoch + 1,
                step=run.step,
                best=best,
                seed=cfg.seed,
                world_size=env.world_size,
                steps_per_epoch=steps,
                config=to_plain(cfg),
            )
            parts = {}
            if distiller:  # the checkpoint says what it holds: the student as "model", a DML peer beside it
                parts, meta["holds"] = distiller.parts(), distiller.holds(cfg.MODEL.name)
            for name in ["latest"] + ([f"epoch_{epoch + 1}"] if (epoch + 1) % cfg.save_interval == 0 else []):
                checkpoint.save_state(
                    os.path.join(out, f"{name}.pdckpt"), model, optimizer, scaler, parts=parts, **meta
                )
            if val_loader is None and last:
                checkpoint.save_weights(model, os.path.join(out, "best.pdparams"), epoch=epoch + 1)
    wall = time.time() - t_start
    # every rank logs a digest of its weights: equal digests prove the ranks stayed in sync
    print(f"rank {env.rank}: weights digest {weights_digest(trained)}", flush=True)
    summary = {
        "val_top1": last_eval.get("top1"),
        "best_val_top1": best["top1"] if best["top1"] >= 0 else None,
        "best_epoch": best.get("epoch"),
        "wall_s": wall,
        "train_samples_per_s": run.totals["samples"] * env.world_size / max(run.totals["batch"], 1e-9),
        "data_wait_share": run.totals["data"] / max(run.totals["batch"], 1e-9),
    }
    log.write(mode="summary", **summary)
    log.close()
    if env.is_main:
        from .plots import plot_curves

        plot_curves(log.path, os.path.join(out, "curves.png"))
    return summary
