"""Checkpoints and exact resume of a training run: when to write (save points), what the best
epoch's weights are until then (a pending best), the resume state and the checks that a run
may resume from it.

Files (every write atomic: a kill mid-write leaves the previous file):
  save_path                    the best checkpoint (model_checkpoint.py), written at save
                               points from the pending best epoch's weights.
  <save_path stem>.resume.pth  the state after the last save point: the trained weights only
                               (parameters no phase trains, e.g. the frozen text tower, are
                               rebuilt from the backbone's weights and checked by a
                               fingerprint), optimizer, scheduler, grad scaler, best so far,
                               history. After the last epoch it shrinks to a "finished" record,
                               which makes a re-run refuse to overwrite the finished run.
"""
import hashlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from handreid.checkpoint import legacy, model_checkpoint
from handreid.core.atomic_files import atomic_write
from handreid.core import registry
from handreid.core.errors import UserError
from handreid.core.runtime import check_not_running
from handreid.train.selection import Best

RESUME_FORMAT = "clip-handid-resume"
RESUME_VERSION = 2
# Config keys that do not change what training computes: a run may resume with other values.
NON_TRAINING_KEYS = {"name", "data_dir", "num_workers", "cache_images", "device", "save_path",
                     "log_path", "variant", "num_splits", "gallery", "flip", "ap_mode", "ties",
                     "max_rank", "eval_batch_size", "results_dir", "plots", "plot_queries",
                     "save_every", "save_every_minutes", "open_set", "rerank", "rerank_k1",
                     "rerank_k2", "rerank_lambda", "seeds", "tensorboard",
                     "likelihood_ratio", "lr_calibrator", "calibration_data"}


def resume_path(config):
    return model_checkpoint.resume_file(config["save_path"])


def sum_fingerprint(tensors):
    """A cheap fingerprint of weights that must not change (the frozen ones): the sha256 of
    each tensor's name and float64 sum. It catches other weights (another `pretrained:`), not
    a deliberate edit that keeps every sum."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(tensors[name].detach().double().sum().cpu().numpy().tobytes())
    return hasher.hexdigest()


# ---------------------------------------------------------------- the resume state

@dataclass
class ResumeState:
    """What a run needs to continue exactly after `epoch`. `trained`, `optimizer`, `scheduler`
    and `scaler` are None in the record of a finished run."""
    method: str
    config: dict
    identity_names: list
    world_size: int
    iters_per_epoch: int
    epoch: int
    phase: int                  # index of the phase whose optimizer the state holds
    finished: bool
    best: Best
    best_written: int           # epoch of the checkpoint on disk (None: none written)
    history: list               # the metrics rows of every epoch so far
    frozen_digest: str          # sum_fingerprint of the frozen weights (None: not kept)
    trained: dict = None
    optimizer: dict = None
    scheduler: dict = None
    scaler: dict = None

    def to_dict(self):
        state = {"format": RESUME_FORMAT, "format_version": RESUME_VERSION}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name == "best":
                state["best"] = value.as_dict()
            elif value is not None or item.name not in ("trained", "optimizer", "scheduler",
                                                        "scaler"):
                state[item.name] = value
        return state

    @classmethod
    def from_dict(cls, state):
        """Today's fields of a state dict (the other keys of a converted first-release state,
        e.g. its clip_state_dict, are not carried into the states written after it)."""
        names = {item.name for item in fields(cls)}
        values = {k: v for k, v in state.items() if k in names}
        values["best"] = Best(**state["best"])
        values.setdefault("best_written", state["best"]["epoch"])
        return cls(**values)


def load_resume_state(path):
    """The resume state at `path` (first-release files converted); UserError if unreadable
    or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(f"cannot read resume state {path}: corrupt or truncated "
                        f"({type(err).__name__}); delete it, or pass --overwrite to train "
                        f"from scratch") from None
    kind = (state.get("format"), state.get("format_version")) if isinstance(state, dict) else None
    if kind not in ((RESUME_FORMAT, RESUME_VERSION), legacy.RESUME_V1):
        raise UserError(f"{path} is not a {RESUME_FORMAT} v{RESUME_VERSION} file; delete it, "
                        f"or pass --overwrite to train from scratch")
    if kind == legacy.RESUME_V1:
        state = legacy.resume_state_from_v1(state)
    return ResumeState.from_dict(state)


def settings_changed(saved, config):
    """Training settings of `config` that differ from the saved run's; a key the saved run
    did not know yet counts with its default."""
    return [f"{key}: {saved.get(key, spec['default'])!r} -> {config[key]!r}"
            for key, spec in registry.config_keys(config["method"]).items()
            if key not in NON_TRAINING_KEYS and saved.get(key, spec["default"]) != config[key]]


def refuse_foreign_checkpoint(config):
    """A fresh run replaces no file at save_path: without its resume state beside it, the file
    is not this run's (a document, a checkpoint copied from elsewhere, a finished checkpoint
    whose resume state was removed, or the first checkpoint of a run killed before its resume
    state was written) and is replaced only with --overwrite."""
    save_path = Path(config["save_path"])
    if save_path.exists():
        raise UserError(f"{save_path} exists without the resume state {resume_path(config)} "
                        f"a run leaves beside its checkpoint (another file, a copied "
                        f"checkpoint, or a run stopped before its first save completed); pass "
                        f"--overwrite to replace it, or set another save_path")


def read_resume_state(config, overwrite=False):
    """The ResumeState of an unfinished run at save_path, or None to start fresh.
    UserError for a finished run (unless overwrite), an unreadable file, a run whose
    training settings differ from `config`, or a file at save_path that no run of it wrote
    (refuse_foreign_checkpoint; unless overwrite)."""
    path = resume_path(config)
    if overwrite:
        return None
    if not path.exists():
        refuse_foreign_checkpoint(config)
        return None
    state = load_resume_state(path)
    if state.finished:
        raise finished_error(config, state)
    changed = settings_changed(state.config, config)
    if changed:
        raise UserError(f"{path} belongs to a run with other training settings "
                        f"({'; '.join(changed)}); pass --overwrite to start again, or set "
                        f"another save_path")
    return state


def finished_error(config, state):
    """The UserError of a re-run of a finished run: pass --overwrite; when the finished run's
    checkpoint is gone or does not load, it says so in evaluation's words."""
    best = state.best
    value = "n/a" if best.value is None else f"{best.value:.4g}"
    finished = (f"training of {config['save_path']} already finished ({state.epoch} epochs, "
                f"best {best.metric or 'epoch'} {value} at epoch {best.epoch})")
    problem = model_checkpoint.checkpoint_problem(config["save_path"])
    if problem:
        return UserError(f"{finished}, but {problem}; pass --overwrite to train again, or "
                         f"restore the file")
    return UserError(f"{finished}; pass --overwrite to train again, or set another save_path")


def needs_training(config):
    """Whether `config`'s run has yet to be trained or finished (no checkpoint, or a resume
    state of an unfinished run); UserError when another process is training it now, when an
    unfinished run cannot resume with `config`, or when a finished run's checkpoint is gone
    or does not load (finished_error)."""
    check_not_running(config["save_path"])
    path = resume_path(config)
    if not path.exists():
        return not Path(config["save_path"]).is_file()
    state = load_resume_state(path)
    if state.finished:
        if model_checkpoint.checkpoint_problem(config["save_path"]):
            raise finished_error(config, state)
        return False
    read_resume_state(config)  # an unfinished run that cannot resume is an error here
    return True


# ---------------------------------------------------------------- when and what to write

class SavePoints:
    """The save-point rule: after every `every_epochs`-th epoch, when `every_minutes` (> 0)
    have passed since the last save, at the last epoch and when a stop was requested."""

    def __init__(self, every_epochs, every_minutes, clock=time.monotonic):
        self.every_epochs, self.every_minutes, self.clock = every_epochs, every_minutes, clock
        self.last_save = clock()

    def due(self, epoch, last, stop):
        return (stop or last or epoch % self.every_epochs == 0
                or (self.every_minutes > 0
                    and self.clock() - self.last_save >= 60 * self.every_minutes))

    def saved(self):
        self.last_save = self.clock()


@dataclass
class PendingBest:
    """The best epoch's trained weights, not yet written to save_path. `weights` None: the
    model's weights now are that epoch's (no later epoch has run yet)."""
    epoch: int
    weights: dict = None


class Checkpointer:
    """Writes one run's best checkpoint and resume state, and restores a resume state into the
    model, optimizer, scheduler and grad scaler. Rank 0 writes; every rank restores."""

    def __init__(self, config, method, model):
        self.config, self.method, self.model = config, method, model
        self.save_points = SavePoints(config["save_every"], config["save_every_minutes"])
        self.pending = None         # PendingBest or None
        self.best_written = None    # epoch of the checkpoint on disk
        self.saved_epoch = None     # epoch of the resume state on disk
        self.frozen_digest = sum_fingerprint(self.frozen_state())

    def frozen_state(self):
        return {k: v for k, v in self.model.state_dict().items() if self.method.is_frozen(k)}

    def trained_state(self):
        return {k: v for k, v in self.model.state_dict().items()
                if not self.method.is_frozen(k)}

    def new_best(self, epoch):
        """Epoch `epoch` (just trained) is the new best: write it at the next save point."""
        self.pending = PendingBest(epoch)

    def keep_pending_weights(self):
        """Before the next epoch changes the weights: copy the pending best's to the CPU."""
        if self.pending is not None and self.pending.weights is None:
            self.pending.weights = {k: v.detach().to("cpu", copy=True)
                                    for k, v in self.trained_state().items()}

    def save(self, state, best):
        """The pending best checkpoint (if any), then the resume state `state`."""
        if self.pending is not None:
            weights = self.model.state_dict()
            weights.update(self.pending.weights or {})
            self.method.save_checkpoint(self.config["save_path"], best.epoch, best.record(),
                                        weights)
            self.pending, self.best_written = None, best.epoch
        state.best_written = self.best_written
        atomic_write(resume_path(self.config), lambda f: torch.save(state.to_dict(), f))
        self.save_points.saved()
        self.saved_epoch = state.epoch

    def restore(self, state, scaler):
        """Load `state`'s trained weights and grad scaler after checking that it belongs to
        this run (method, identities, best checkpoint present, frozen weights, names)."""
        path = resume_path(self.config)
        if state.method != self.method.name:
            raise UserError(f"{path} belongs to a {state.method} run, this is "
                            f"{self.method.name}; pass --overwrite, or set another save_path")
        if state.identity_names != self.method.identity_names:
            raise UserError(f"{path} was trained on other identities than train/ of "
                            f"{self.config['data_dir']} now holds; pass --overwrite to start "
                            f"again, or point data_dir at the data it was trained on")
        if state.best.epoch is not None and not Path(self.config["save_path"]).is_file():
            raise UserError(f"the best checkpoint {self.config['save_path']} of the run in "
                            f"{path} is missing; restore it, or pass --overwrite")
        if state.frozen_digest not in (None, self.frozen_digest):
            raise UserError(f"{path} was trained on top of other frozen weights than this run "
                            f"built (pretrained: changed?); restore the weights it used, or "
                            f"pass --overwrite")
        stored = {k: v for k, v in state.trained.items() if not self.method.is_frozen(k)}
        if stored.keys() != self.trained_state().keys():
            raise UserError(f"{path} does not fit this model (its trained weights differ in "
                            f"names); pass --overwrite to train from scratch")
        try:
            self.model.load_state_dict(stored, strict=False)
            scaler.load_state_dict(state.scaler)
        except (KeyError, RuntimeError, ValueError) as err:
            self._unfit(err)
        self.best_written = state.best_written
        self.saved_epoch = state.epoch

    def restore_optimizer(self, state, optimizer, scheduler, iters_per_epoch, world_size):
        path = resume_path(self.config)
        if state.iters_per_epoch != iters_per_epoch:
            raise UserError(f"{path} was written with {state.iters_per_epoch} steps per "
                            f"epoch ({state.world_size} processes), this run has "
                            f"{iters_per_epoch} ({world_size}); resume with "
                            f"{state.world_size} processes, or pass --overwrite")
        try:
            optimizer.load_state_dict(state.optimizer)
            scheduler.load_state_dict(state.scheduler)
        except (KeyError, RuntimeError, ValueError) as err:
            self._unfit(err)

    def _unfit(self, err):
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{resume_path(self.config)} does not fit this model "
                        f"({type(err).__name__}: {reason}); pass --overwrite to train from "
                        f"scratch") from None
