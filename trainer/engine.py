"""Train and evaluate TSN: one readable loop, the same on 1..N ranks, CPU or GPU."""
from __future__ import annotations

import hashlib
import os
import time

import numpy as np
import paddle
import paddle.nn.functional as F
import yaml

from . import checkpoint, dist
from .config import to_plain
from .metrics import MetricsLog, topk_correct
from .models import build_model
from .solver import build_lr, build_optimizer


def make_loader(cfg, env: dist.Env, mode: str, list_file: str | None = None, source: str | None = None,
                **options):
    """The one place the trainer asks dali_pipelines for data; ``options`` override the config's."""
    from dali_pipelines import build_loader
    d, p = cfg.DATASET, cfg.PIPELINE
    list_file = list_file or {"train": d.train_list, "val": d.val_list, "test": d.test_list}[mode]
    if not list_file and not options.get("samples"):
        raise ValueError(f"DATASET.{mode}_list is empty; set it in the config or with -o DATASET.{mode}_list=PATH")
    opts = dict(num_clips=p.test_num_clips, crop=p.crop, flip=p.flip, num_threads=d.num_threads,
                prefetch=d.prefetch, device_id=env.device_id, num_classes=cfg.MODEL.head.num_classes,
                dtype="float16" if cfg.amp and env.device == "gpu" else "float32")
    opts.update(options)
    return build_loader(
        list_file, source=source or d.source, mode=mode, batch_size=d.batch_size,
        num_segments=p.num_segments, target_size=p.target_size, short_size=p.short_size,
        device=env.device, rank=env.rank, world_size=env.world_size, seed=cfg.seed,
        data_prefix=d.data_prefix or None, **opts)


def evaluate(model, loader, env: dist.Env) -> dict:
    """Top-1/top-5 over exactly the samples of the loader's list, summed over all ranks."""
    model.eval()
    counts = np.zeros(4)  # top1 hits, top5 hits, samples, loss sum
    with paddle.no_grad():
        for imgs, labels in loader:
            logits = model(imgs.astype("float32"))
            loss = F.cross_entropy(logits, labels, reduction="sum")
            k = min(5, logits.shape[1])
            c1, c5 = topk_correct(logits.numpy(), labels.numpy(), (1, k))
            counts += (c1, c5, labels.shape[0], float(loss))
    top1, top5, n, loss = dist.all_reduce_sum(counts, env)
    model.train()
    return {"top1": top1 / n, "top5": top5 / n, "loss": loss / n, "samples": int(n)}


def weights_digest(model) -> str:
    """SHA-256 over all parameters and buffers, in state-dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()[:16]


def _save(model, path, **meta):
    state = dict(model.state_dict())
    state["__meta__"] = meta
    checkpoint.save(state, path)


def train(cfg, env: dist.Env) -> dict:
    out = cfg.output_dir
    log = MetricsLog(out, env.is_main)
    if env.is_main:
        log.start_new()  # a fresh run does not append to an earlier run's curves
        with open(os.path.join(out, "config.yaml"), "w", encoding="utf-8") as f:
            yaml.safe_dump(to_plain(cfg), f, sort_keys=False)
    paddle.seed(cfg.seed)  # identical initial weights on every rank (DataParallel also broadcasts)
    np.random.seed(cfg.seed)
    model = build_model(cfg)
    train_loader = make_loader(cfg, env, "train")
    val_loader = make_loader(cfg, env, "val") if cfg.DATASET.val_list else None
    steps = len(train_loader)
    global_batch = cfg.DATASET.batch_size * env.world_size
    lr = build_lr(cfg.OPTIMIZER, steps, cfg.epochs, global_batch)
    opt = build_optimizer(cfg.OPTIMIZER, lr, model)
    net = model
    if env.world_size > 1:
        from paddle.distributed import fleet
        net, opt = fleet.distributed_model(model), fleet.distributed_optimizer(opt)
    paddle.seed(cfg.seed + 1000 * (env.rank + 1))  # different dropout on each rank
    scaler = paddle.amp.GradScaler() if cfg.amp and env.device == "gpu" else None
    if env.is_main:
        print(f"train: {env.world_size} rank(s) on {env.device}, {train_loader.num_samples} clips/rank/epoch, "
              f"{steps} steps/epoch x {cfg.epochs} epochs, global batch {global_batch}, "
              f"lr {lr.get_lr():.4g}", flush=True)

    best, step, t_start = {"top1": -1.0}, 0, time.time()
    totals = {"data": 0.0, "batch": 0.0, "samples": 0}
    last_eval = {}
    for epoch in range(cfg.epochs):
        net.train()
        win = {"data": 0.0, "batch": 0.0, "samples": 0, "loss": 0.0, "hits": 0}
        t_prev = time.time()
        for imgs, labels in train_loader:
            t_data = time.time()
            with paddle.amp.auto_cast(enable=scaler is not None):
                logits = net(imgs)
                loss = F.cross_entropy(logits.astype("float32"), labels)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            opt.clear_grad()
            lr.step()
            step += 1
            t_end = time.time()
            n = labels.shape[0]
            win["data"] += t_data - t_prev
            win["batch"] += t_end - t_prev
            win["samples"] += n
            # device-side sums: reading them back every step would stall a GPU
            win["loss"] += loss.detach() * n
            win["hits"] += (logits.argmax(axis=1) == labels).astype("int64").sum()
            t_prev = t_end
            if step % cfg.log_interval == 0 or step % steps == 0:
                m = win["samples"]
                rec = dict(mode="train", epoch=epoch + 1, step=step, lr=lr.get_lr(),
                           loss=float(win["loss"]) / m, top1=float(win["hits"]) / m,
                           samples_per_s=m * env.world_size / win["batch"],
                           data_time=win["data"] / m * n, batch_time=win["batch"] / m * n)
                log.write(**rec)
                if env.is_main:
                    print(f"epoch {epoch + 1}/{cfg.epochs} step {step} loss {rec['loss']:.4f} "
                          f"top1 {rec['top1']:.3f} lr {rec['lr']:.4g} {rec['samples_per_s']:.1f} clips/s "
                          f"data {rec['data_time'] * 1000:.0f}ms batch {rec['batch_time'] * 1000:.0f}ms",
                          flush=True)
                for k in ("data", "batch", "samples"):
                    totals[k] += win[k]
                win = {"data": 0.0, "batch": 0.0, "samples": 0, "loss": 0.0, "hits": 0}
        last = epoch + 1 == cfg.epochs
        dist.average_bn_buffers(model, env)  # every rank: it is a collective
        if val_loader is not None and ((epoch + 1) % cfg.val_interval == 0 or last):
            last_eval = evaluate(net, val_loader, env)
            log.write(mode="val", epoch=epoch + 1, step=step, **last_eval)
            if env.is_main:
                print(f"epoch {epoch + 1} val top1 {last_eval['top1']:.4f} top5 {last_eval['top5']:.4f} "
                      f"loss {last_eval['loss']:.4f} ({last_eval['samples']} clips)", flush=True)
            if last_eval["top1"] > best["top1"]:
                best = {**last_eval, "epoch": epoch + 1}
                if env.is_main:
                    _save(model, os.path.join(out, "best.pdparams"), epoch=epoch + 1, **last_eval)
        if env.is_main and ((epoch + 1) % cfg.save_interval == 0 or last):
            _save(model, os.path.join(out, "latest.pdparams"), epoch=epoch + 1, step=step)
            checkpoint.save(opt.state_dict(), os.path.join(out, "latest.pdopt"))
    wall = time.time() - t_start
    # every rank logs a digest of its weights: equal digests prove the ranks stayed in sync
    print(f"rank {env.rank}: weights digest {weights_digest(model)}", flush=True)
    summary = {"val_top1": last_eval.get("top1"), "best_val_top1": best["top1"] if best["top1"] >= 0 else None,
               "best_epoch": best.get("epoch"), "wall_s": wall,
               "train_samples_per_s": totals["samples"] * env.world_size / max(totals["batch"], 1e-9),
               "data_wait_share": totals["data"] / max(totals["batch"], 1e-9)}
    log.write(mode="summary", **summary)
    return summary
