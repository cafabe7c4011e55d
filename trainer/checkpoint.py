"""Checkpoints, one owner: what a training run writes into its output folder and when, what a resume
reads back, and which files stay. Every file is written atomically: a killed writer leaves the previous
file loadable.

A training checkpoint (``latest.pdckpt`` after every epoch, ``epoch_N.pdckpt`` every ``save_interval``)
holds everything resume needs: model, optimizer (with its LR scheduler), AMP scaler, epoch, step, best
metric, seed, world size, steps per epoch, config and the job's run id. ``best.pdparams`` holds the model
weights alone (plus a ``__meta__`` entry) for eval, test, predict and export. Reading a file as data (the
restricted unpickler) is ``trainer.weights``; this module decides which file is read.
"""

from __future__ import annotations

import os

import paddle

from common.log import get_logger
from common.runlock import RUN_ID_ENV

from . import distill, weights
from .config import ConfigError, to_plain

log = get_logger(__name__)

LATEST, BEST = "latest.pdckpt", "best.pdparams"


def epoch_name(epoch: int) -> str:
    return f"epoch_{epoch}.pdckpt"


def save(obj, path: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        paddle.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_state(path: str, model, optimizer, scaler=None, parts=None, **meta) -> None:
    """``parts``: {name: network} stored beside the model (a distillation peer, trainer.distill)."""
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "meta": meta}
    state.update({name: net.state_dict() for name, net in (parts or {}).items()})
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    save(state, path)


def remove_stale_temporaries(folder: str) -> None:
    """Delete the half-written files (``NAME.tmp-PID``) a killed run left behind."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            head, sep, pid = name.rpartition(".tmp-")
            if sep and head and pid.isdigit():
                os.unlink(os.path.join(folder, name))


def save_weights(model, path: str, **meta) -> None:
    state = dict(model.state_dict())
    state["__meta__"] = meta
    save(state, path)


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
    log.info(
        f"train: resuming with {steps_per_epoch} steps/epoch where the checkpoint had {saved_steps}: the LR "
        f"schedule goes on from epoch {epoch} (step {step} of the new schedule, lr {scheduler.get_lr():.4g})"
    )
    return step


def _epoch_files(folder: str) -> list[tuple[int, str]]:
    """(N, path) of every ``epoch_N.pdckpt`` in ``folder``, in no particular order."""
    epochs = []
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            n = name[len("epoch_") : -len(".pdckpt")]
            if name.startswith("epoch_") and name.endswith(".pdckpt") and n.isdigit():
                epochs.append((int(n), os.path.join(folder, name)))
    return epochs


def newest_loading(folder: str) -> tuple[str | None, dict | None]:
    """(path, loaded state) of the newest checkpoint in ``folder`` that loads: latest.pdckpt, else the
    epoch_N.pdckpt of the highest N; (None, None) when there is none. Those that do not load (empty, cut
    short by a full disk or a copy) are named once; when none loads the run stops naming them all."""
    epochs = _epoch_files(folder)
    latest = os.path.join(folder, LATEST)
    paths = ([latest] if os.path.isfile(latest) else []) + [p for _, p in sorted(epochs, reverse=True)]
    skipped = []
    for path in paths:
        try:
            state = weights.load_checkpoint(path)
        except (weights.WeightsError, OSError) as e:
            skipped.append(str(e))
            continue
        if skipped:
            log.info(f"train: resume=auto: skipped {'; '.join(skipped)}; resuming from {path}")
        return path, state
    if skipped:
        raise weights.WeightsError(
            f"resume=auto: no checkpoint in {folder} loads ({'; '.join(skipped)}); move them away to start "
            "anew, or give one with -o resume=PATH"
        )
    return None, None


class Checkpoints:
    """The checkpoints of one training run in ``folder``: rank 0 (``is_main``) writes ``latest.pdckpt``
    after every epoch, ``epoch_N.pdckpt`` every ``save_interval`` epochs (the newest ``keep_epochs`` of
    them stay, the config's ``keep_checkpoints``; None keeps all) and ``best.pdparams``; every rank reads
    the checkpoint it resumes from. After ``find_resume``, ``resume_path`` names it (None: a fresh run)."""

    def __init__(self, folder: str, *, save_interval: int, is_main: bool = True, keep_epochs: int | None = None):
        if keep_epochs is not None and keep_epochs < 1:
            raise ValueError(f"keep_epochs must be None (keep all) or >= 1, not {keep_epochs}")
        self.folder, self.save_interval, self.is_main, self.keep_epochs = folder, save_interval, is_main, keep_epochs
        self.resume_path: str | None = None
        self._resume_state = None  # the checkpoint loaded while finding it, until resume() takes it

    def find_resume(self, resume: str) -> str | None:
        """The checkpoint to resume from, by the ``resume`` setting: a path; "auto", the newest in the
        folder that loads; "" none, unless this is a restarted attempt of the job that wrote latest."""
        if not resume:
            self.resume_path, self._resume_state = self._own_attempt()
        elif resume == "auto":
            self.resume_path, self._resume_state = newest_loading(self.folder)
        elif not os.path.isfile(resume):
            raise FileNotFoundError(
                f"resume: checkpoint {resume} does not exist (use -o resume=auto to "
                "continue from OUTPUT_DIR/latest.pdckpt when there is one)"
            )
        else:
            self.resume_path, self._resume_state = resume, None
        return self.resume_path

    def _own_attempt(self) -> tuple[str | None, dict | None]:
        """OUTPUT_DIR/latest.pdckpt when an earlier attempt of this very job wrote it: run_dist.sh restarted
        the job after a rank died (run_dist.sh --max-restarts), and it goes on from the last complete epoch."""
        run_id = os.environ.get(RUN_ID_ENV)
        if not run_id:
            return None, None
        path, state = newest_loading(self.folder)
        if path is None or state["meta"].get("run_id") != run_id:
            return None, None
        log.info(f"train: restarted: resuming this job ({run_id}) from {path}, epoch {state['meta']['epoch']}")
        return path, state

    def resume(self, model, optimizer, model_cfg=None, parts=None) -> tuple[dict, dict | None]:
        """``restore`` the checkpoint ``find_resume`` found (read once: the state it loaded, if any)."""
        state, self._resume_state = self._resume_state, None  # the weights then live in the model and optimizer
        return restore(self.resume_path, model, optimizer, model_cfg, parts, state=state)

    def clean(self) -> None:
        """At the start of a run: remove what a killed writer left half-written."""
        if self.is_main:
            remove_stale_temporaries(self.folder)

    def save_best(self, model, **meta) -> None:
        """``best.pdparams``: the weights of a new best validation result (``meta``: that result)."""
        if self.is_main:
            save_weights(model, os.path.join(self.folder, BEST), **meta)

    def save_epoch(self, epoch: int, model, optimizer, scaler=None, *, parts=None, as_best=False, **meta) -> None:
        """After epoch ``epoch`` (counted from 1): ``latest.pdckpt``, ``epoch_N.pdckpt`` when it is due,
        then the epoch files beyond ``keep_epochs`` go; ``as_best`` (a run that validates nothing, at its
        end) writes its weights as ``best.pdparams`` too. ``meta`` joins the job's run id and the epoch."""
        if not self.is_main:
            return
        meta = dict(run_id=os.environ.get(RUN_ID_ENV, ""), epoch=epoch, **meta)
        for name in [LATEST] + ([epoch_name(epoch)] if epoch % self.save_interval == 0 else []):
            save_state(os.path.join(self.folder, name), model, optimizer, scaler, parts=parts, **meta)
        self._prune()
        if as_best:
            save_weights(model, os.path.join(self.folder, BEST), epoch=epoch)

    def _prune(self) -> None:
        if self.keep_epochs is not None:
            for _, path in sorted(_epoch_files(self.folder))[: -self.keep_epochs]:
                os.unlink(path)
