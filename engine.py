"""The training loop every method shares.

A method (finetune_trainer_stage1.py, finetune_trainer_stage2.py, ...) is a small subclass of
`Method`: its model (CLIP + extra modules by name + the retrieval feature), its phases, its
trainable parameter groups, and the loss of one batch as named terms. The `Engine` owns the
rest: the epoch loop over the phases, mixed precision and grad scaling, DistributedDataParallel,
gradient clipping, the lr schedule (per iteration or per epoch), validation and model
selection, checkpoints, exact resume, the process lock, logs, the metrics JSONL and the curves.

Files a run writes (every write atomic: a kill mid-write leaves the previous file):
  save_path                    the best checkpoint by the `selection` signal on val/ (make_model
                               format: full CLIP state_dict, extra modules, feature definition).
                               Written at save points and at the end, from an in-memory copy of
                               the best epoch's trained weights.
  <save_path stem>.resume.pth  the state after the last save point: the trained weights only
                               (parameters no phase trains, e.g. the frozen text tower, are
                               rebuilt from the backbone's weights and checked by a digest),
                               optimizer, scheduler, grad scaler, best so far, history. Written
                               every `save_every` epochs or `save_every_minutes`, whichever
                               comes first, and when Ctrl-C / SIGTERM stop the run. After the
                               last epoch it shrinks to a "finished" record, which makes a
                               re-run refuse to overwrite the finished run.
  <save_path>.lock             an OS lock held while the run writes: a second run of the same
                               save_path is refused, naming the first.
  log_path                     human log, appended across runs and resumes
  <log stem>_metrics.jsonl     one JSON line per epoch (see METRIC_DOCS in README)
  <log stem>_curve.png         loss terms, accuracy and selection signals per epoch, the
                               selected epoch and phase starts marked; rewritten at every save
                               point and at the end
  <log stem>_tensorboard/      TensorBoard events of the same per-epoch metrics (tensorboard:)

Work lost to a kill -9 is at most `save_every` epochs or `save_every_minutes` minutes (plus the
epoch running then). The first Ctrl-C or SIGTERM lets the running epoch finish, writes the
resume state and exits (130); a second one stops at once.

Resume is exact because every epoch's randomness (sampler order, augmentation, loader worker
seeds) is seeded from (seed, epoch, rank) when the epoch starts: no RNG state has to survive
an interruption. Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel
(wrapped anew in each phase, as the trained parameters change); loss terms and accuracy are
summed over ranks; rank 0 validates, logs and writes the files. Every rank reads the resume
state, so on several nodes save_path must be on a shared disk.

No host synchronisation per step: loss sums and a non-finite-loss flag stay on the device and
are read every PROGRESS_EVERY steps (progress bar, NaN stop) and at the end of the epoch.
"""
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import losses
import make_model
from build_dataloader import (device_augment, get_train_val_loaders, set_loader_epoch,
                              train_gallery_loader)
from config import make_parser, SCHEMA
from errors import ConfigError, UserError
from atomic_files import atomic_write, atomic_write_text
from reid_metrics import compute_reid_metrics
from run_log import TensorBoardLog, plot_curves
from runtime import (PRECISION_NAMES, autocast, check_not_running, configure_backends,
                     epoch_seed, init_distributed, is_main_process, rank_and_world,
                     resolve_precision, run_lock, seed_everything)

RESUME_FORMAT = "clip-handid-resume"
RESUME_VERSION = 2
LEGACY_RESUME = ("clip-handid-stage1-resume", 1)
# Config keys that do not change what training computes: a run may resume with other values.
NON_TRAINING_KEYS = {"name", "data_dir", "num_workers", "cache_images", "device", "save_path",
                     "log_path", "variant", "num_splits", "gallery", "flip", "ap_mode",
                     "max_rank", "eval_batch_size", "results_dir", "plots", "plot_queries",
                     "save_every", "save_every_minutes", "open_set", "rerank", "rerank_k1",
                     "rerank_k2", "rerank_lambda", "seeds", "tensorboard",
                     "likelihood_ratio", "lr_calibrator", "calibration_data"}
# Parameter names (split at '.' and '_') that get no weight decay even when not 1-D.
NO_DECAY_NAME = re.compile(r"(^|[._])(bias|norm|ln|bn|positional|\w*embedding)\w*", re.I)
# Steps between reads of the device-side loss sums (progress bar, non-finite loss check).
PROGRESS_EVERY = 25
# Higher is better for these selection signals; lower for val_loss.
HIGHER_IS_BETTER = {"val_accuracy": True, "val_map": True, "val_loss": False}

log = logging.getLogger("handid.train")


# ---------------------------------------------------------------- paths

def resume_path(config):
    path = Path(config["save_path"])
    return path.with_name(f"{path.stem}.resume.pth")


def metrics_path(config):
    path = Path(config["log_path"])
    return path.with_name(f"{path.stem}_metrics.jsonl")


def curve_path(config):
    path = Path(config["log_path"])
    return path.with_name(f"{path.stem}_curve.png")


# ---------------------------------------------------------------- optimisation

def no_weight_decay(name, param):
    """Biases, norm scales, class token (all 1-D) and embeddings are not decayed."""
    return param.ndim <= 1 or bool(NO_DECAY_NAME.search(name))


def decay_groups(name, module, lr, weight_decay, bias_lr_factor=1.0, decay_all=False):
    """Optimizer groups of the trainable parameters of `module`: `name` (decayed) and
    `name`_no_decay (biases, norms, embeddings; decayed too when `decay_all`, as CLIP-ReID
    does); with bias_lr_factor != 1 every parameter whose name contains `bias` (CLIP-ReID's
    rule) goes to `name`_bias / `name`_bias_no_decay at lr x bias_lr_factor. Empty groups
    are left out."""
    groups = {}
    for param_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = decay_all or not no_weight_decay(param_name, param)
        bias = bias_lr_factor != 1.0 and "bias" in param_name
        key = name + ("_bias" if bias else "") + ("" if decays else "_no_decay")
        groups.setdefault(key, {"name": key, "params": [],
                                "lr": lr * (bias_lr_factor if bias else 1.0),
                                "weight_decay": weight_decay if decays else 0.0})
        groups[key]["params"].append(param)
    order = [name + suffix for suffix in ("", "_no_decay", "_bias", "_bias_no_decay")]
    return [groups[key] for key in order if key in groups]


def config_groups(config, name, module, lr, weight_decay):
    """decay_groups with the config's bias_lr_factor and weight_decay_all."""
    return decay_groups(name, module, lr, weight_decay, config["bias_lr_factor"],
                        config["weight_decay_all"])


@dataclass
class Phase:
    """A stretch of epochs with its own optimizer and lr schedule: linear warmup from
    `warmup_start` x lr to lr over warmup_epochs, then cosine down to min_lr_factor x lr at
    the phase's end, or x lr_gamma at each epoch of lr_steps (counted from the phase's
    start). lr_stepping `iteration`: the factor changes at every optimizer step;
    `epoch`: once per epoch, at its start, from the epoch index t = (0-based epoch of the
    phase) + epoch_origin: warmup factor warmup_start + (1 - warmup_start) t / warmup_epochs
    while t < warmup_epochs; step: lr_gamma ** (milestones <= t); cosine: on t / epochs from
    t = 0, the warmup a prefix (CLIP-ReID: torch-style WarmupMultiStepLR and timm's
    CosineLRScheduler stepped with the 1-based epoch, origin 1)."""
    name: str
    epochs: int
    optimizer: str = "adamw"          # adamw | adam
    warmup_epochs: int = 0
    warmup_start: float = 0.0
    scheduler: str = "cosine"         # cosine | step
    lr_steps: tuple = ()
    lr_gamma: float = 0.1
    min_lr_factor: float = 0.0
    lr_stepping: str = "iteration"    # iteration | epoch
    epoch_origin: int = 1             # index of a phase's first epoch when stepping per epoch
    selects: bool = True              # validate and select the best epoch in this phase
    uses_images: bool = True          # batches are images (augmented, channels-last)

    @classmethod
    def from_config(cls, config, name="main", **overrides):
        settings = {"epochs": config["epochs"], "warmup_epochs": config["warmup_epochs"],
                    "scheduler": config["scheduler"], "lr_steps": tuple(config["lr_steps"]),
                    "lr_gamma": config["lr_gamma"], "lr_stepping": config["lr_stepping"],
                    "epoch_origin": config["lr_epoch_origin"]}
        return cls(name=name, **{**settings, **overrides})


def lr_factor(step, iters_per_epoch, phase):
    """Multiplier of the base lr at optimizer step `step` (0-based) of `phase`."""
    if phase.lr_stepping == "epoch":
        return epoch_lr_factor(step // iters_per_epoch + phase.epoch_origin, phase)
    warmup = phase.warmup_epochs * iters_per_epoch
    if step < warmup:
        return phase.warmup_start + (1.0 - phase.warmup_start) * (step + 1) / warmup
    if phase.scheduler == "cosine":
        total = phase.epochs * iters_per_epoch
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return phase.min_lr_factor + (1.0 - phase.min_lr_factor) * cosine
    epoch = step / iters_per_epoch
    return phase.lr_gamma ** sum(epoch >= milestone for milestone in phase.lr_steps)


def epoch_lr_factor(t, phase):
    """Multiplier of the base lr for the epoch of index t (lr_stepping: epoch)."""
    if t < phase.warmup_epochs:
        return phase.warmup_start + (1.0 - phase.warmup_start) * t / phase.warmup_epochs
    if phase.scheduler == "cosine":
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / phase.epochs)))
        return phase.min_lr_factor + (1.0 - phase.min_lr_factor) * cosine
    return phase.lr_gamma ** sum(t >= milestone for milestone in phase.lr_steps)


def schedule_warnings(phases):
    """Schedules that cannot do what they say: a warmup as long as the phase (the lr never
    reaches its set value) or a step that lies beyond the phase's last epoch. -> [str]."""
    found = []
    for phase in phases:
        where = f"phase {phase.name}: " if len(phases) > 1 else ""
        if phase.epochs and phase.warmup_epochs >= phase.epochs:
            found.append(f"{where}warmup of {phase.warmup_epochs} epochs >= the "
                         f"{phase.epochs} training epochs: the lr never reaches its set value "
                         f"(it peaks at {lr_factor(phase.epochs - 1, 1, phase):.3g} x lr); "
                         f"lower the warmup or train longer")
        late = [m for m in phase.lr_steps if m >= phase.epochs]
        if phase.scheduler == "step" and late:
            found.append(f"{where}lr step(s) at epoch {', '.join(map(str, late))} lie beyond "
                         f"the last epoch ({phase.epochs}) and never apply; move them "
                         f"below it")
    return found


# ---------------------------------------------------------------- methods

class Method:
    """What a training method supplies; the engine does the rest. Subclasses set `name` (kept
    in checkpoints) and `train_command` (quoted in errors), build `self.model` (a
    make_model.HandIdModel) in __init__, and implement param_groups and loss."""
    name = None
    train_command = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.name:
            make_model.register_method(cls.name, cls.train_command or f"train with {cls.name}")

    def __init__(self, config, identity_names):
        self.config = config
        self.identity_names = list(identity_names)
        self.model = None

    def phases(self):
        """[Phase]; default one phase from the config's epochs and schedule keys."""
        return [Phase.from_config(self.config)]

    def module_specs(self):
        """{extra module name: make_model spec} so evaluation can rebuild them."""
        return {}

    def is_frozen(self, state_name):
        """True for HandIdModel state entries that no phase trains (not kept in resume
        states): by default everything of CLIP outside the image encoder."""
        return state_name.startswith("clip_model.") and \
            not state_name.startswith("clip_model.visual.")

    def start_phase(self, phase, train_loader, device):
        """Set what trains in `phase` and precompute what stays fixed; -> the loader the
        phase iterates. Default: the image encoder and every extra module train."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(not self.is_frozen(name))
        return train_loader

    def param_groups(self, phase):
        raise NotImplementedError

    def forward(self, model, inputs):
        """The training forward pass (runs inside DistributedDataParallel)."""
        return model(inputs)

    def loss(self, phase, outputs, labels):
        """-> ({term name: scalar tensor}, logits for the train accuracy or None)."""
        raise NotImplementedError

    def classify(self, model, images):
        """Identity logits for val accuracy / val loss, or None without an identity head."""
        return model(images)[0]

    def triplet_term(self, features, labels):
        """{"triplet": weighted batch-hard triplet loss} when triplet_weight > 0, else {}."""
        weight = self.config["triplet_weight"]
        if weight <= 0:
            return {}
        return {"triplet": weight * losses.batch_hard_triplet(
            features, labels, self.config["triplet_margin"], self.config["triplet_soft_margin"])}


class _MethodForward(nn.Module):
    """What DistributedDataParallel wraps: the model, run through the method's forward."""

    def __init__(self, model, method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs):
        return self.method.forward(self.model, inputs)


# ---------------------------------------------------------------- resume state

def _settings_changed(saved, config):
    """Training settings of `config` that differ from the saved run's; a key the saved run
    did not know yet counts with its default."""
    return [f"{key}: {saved.get(key, spec['default'])!r} -> {config[key]!r}"
            for key, spec in SCHEMA.items()
            if key not in NON_TRAINING_KEYS and saved.get(key, spec["default"]) != config[key]]


def _load_resume_state(path):
    """The resume state at `path` in today's layout; UserError if unreadable or foreign."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(f"cannot read resume state {path}: corrupt or truncated "
                        f"({type(err).__name__}); delete it, or pass --overwrite to train "
                        f"from scratch") from None
    kind = (state.get("format"), state.get("format_version")) if isinstance(state, dict) else None
    if kind not in ((RESUME_FORMAT, RESUME_VERSION), LEGACY_RESUME):
        raise UserError(f"{path} is not a {RESUME_FORMAT} v{RESUME_VERSION} file; delete it, "
                        f"or pass --overwrite to train from scratch")
    return _from_legacy_state(state) if kind == LEGACY_RESUME else state


def read_resume_state(config, overwrite=False):
    """The saved state of an unfinished run at save_path, or None to start fresh.
    UserError for a finished run (unless overwrite), an unreadable file, or a run whose
    training settings differ from `config`."""
    path = resume_path(config)
    if overwrite or not path.exists():
        return None
    state = _load_resume_state(path)
    if state["finished"]:
        best = state["best"]
        value = "n/a" if best["value"] is None else f"{best['value']:.4g}"
        raise UserError(f"training of {config['save_path']} already finished ({state['epoch']} "
                        f"epochs, best {best['metric'] or 'epoch'} {value} at epoch "
                        f"{best['epoch']}); pass --overwrite to train again, or set another "
                        f"save_path")
    changed = _settings_changed(state["config"], config)
    if changed:
        raise UserError(f"{path} belongs to a run with other training settings "
                        f"({'; '.join(changed)}); pass --overwrite to start again, or set "
                        f"another save_path")
    return state


def needs_training(config):
    """Whether `config`'s run has yet to be trained or finished (no checkpoint, or a resume
    state of an unfinished run); UserError when another process is training it now, or when
    an unfinished run cannot resume with `config`."""
    check_not_running(config["save_path"])
    path = resume_path(config)
    if not Path(config["save_path"]).is_file():
        return True
    if not path.exists() or _load_resume_state(path)["finished"]:
        return False
    read_resume_state(config)  # an unfinished run that cannot resume is an error here
    return True


def _from_legacy_state(state):
    """A first-release Stage-1 resume state in today's layout."""
    accuracy = state["best_val_accuracy"]
    converted = {**state, "method": "stage1", "phase": 0, "frozen_digest": None,
                 "best": {"epoch": state["best_epoch"], "metric": "val_accuracy",
                          "value": accuracy, "signals": {"val_accuracy": accuracy}}}
    if not state["finished"]:
        trained = {f"clip_model.{k}": v for k, v in state["clip_state_dict"].items()}
        trained.update({f"extras.classifier.{k}": v
                        for k, v in state["classifier_state_dict"].items()})
        converted["trained"] = trained
    return converted


def _digest(tensors):
    """A fingerprint of tensors that must not change (the frozen weights)."""
    hasher = hashlib.sha256()
    for name in sorted(tensors):
        hasher.update(name.encode())
        hasher.update(tensors[name].detach().double().sum().cpu().numpy().tobytes())
    return hasher.hexdigest()


# ---------------------------------------------------------------- the engine

class Engine:
    """Runs `method` on `train_loader` batches (inputs, class indices); train() runs or
    resumes the run. overwrite=True starts from scratch even if save_path holds a finished or
    unfinished run; its files are replaced only as the new run writes its own."""

    def __init__(self, method, train_loader, config, device, val_loader=None, overwrite=False):
        self.method, self.config, self.overwrite = method, config, overwrite
        self.device = torch.device(device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.rank, self.world_size = rank_and_world()
        self.distributed = self.world_size > 1
        self.is_main = self.rank == 0
        self.phases = method.phases()
        if not self.phases or any(p.epochs < 0 for p in self.phases) or \
                sum(p.epochs for p in self.phases) == 0:
            raise ConfigError("the training has no epochs; set epochs: (and the method's phase "
                              "epochs) to at least 1")
        self.total_epochs = sum(p.epochs for p in self.phases)
        if not 0.0 <= config["label_smoothing"] <= 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1], got "
                              f"{config['label_smoothing']}")
        self.model = method.model.to(self.device)
        if config["channels_last"] and self._is_resnet():
            self.model.clip_model.visual.to(memory_format=torch.channels_last)
        self.amp_dtype = resolve_precision(config["amp"], self.device)
        # augment_on: device -> uint8 batches, augmented here with a per-epoch seeded generator.
        self.augment = device_augment(config)
        self.augment_generator = torch.Generator(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.selection = config["selection"] if val_loader is not None else None
        self.patience = config["early_stop_patience"] or 0
        if self.patience and self.selection not in HIGHER_IS_BETTER:
            raise ConfigError(f"early_stop_patience needs a selection signal on val/ to wait "
                              f"for (selection: {', '.join(HIGHER_IS_BETTER)}, and a val/ "
                              f"split); set early_stop_patience: 0 or change selection")
        self.stopped_early = None    # why the run stopped before its last epoch, if it did
        self.history = []
        self.epochs_done = 0
        self.best = {"epoch": None, "metric": self.selection, "value": None, "signals": {}}
        self.best_unsaved = None     # trained weights of the best epoch, not yet on disk
        self.best_written = None     # epoch of the checkpoint on disk
        self.stop_requested = self.in_epoch = False
        self.saved_epoch = None
        self.last_save = time.monotonic()
        self.frozen_digest = _digest(self._frozen_state())
        self.optimizer = self.scheduler = self.net = None
        self.tensorboard = None

    # ------------------------------------------------------------ public

    def train(self):
        """Train (or resume) to the last epoch of the last phase; -> summary dict."""
        handlers = self._open_log()
        restore_signals = self._stop_on_signals()
        try:
            # Rank 0 holds the lock for the whole run; the other ranks follow it.
            with run_lock(self.config["save_path"]) if self.is_main else contextlib.nullcontext():
                state = read_resume_state(self.config, self.overwrite)
                self._restore(state)
                self._log_start()
                if self.is_main and self.config["tensorboard"]:
                    self.tensorboard = TensorBoardLog(self.config["log_path"],
                                                      self.epochs_done + 1)
                first = 0
                for index, phase in enumerate(self.phases):
                    if self.epochs_done < first + phase.epochs and not self.stopped_early:
                        # The saved optimizer belongs to the phase the saved epoch was in.
                        self._run_phase(phase, first,
                                        state if state and state["phase"] == index else None)
                    first += phase.epochs
                if self.is_main:
                    self._finish()
        except KeyboardInterrupt:
            if self.is_main and not self.in_epoch and self.epochs_done and \
                    self.saved_epoch != self.epochs_done:
                # Stopped before the next epoch's first step: the weights are still those of
                # the last finished epoch, so they can be saved exactly.
                self._save(self.epochs_done, finished=False)
            if self.is_main:
                kept = (f"epoch {self.history[-1]['epoch']} is kept in "
                        f"{resume_path(self.config)}; run the same command again to resume"
                        if self.saved_epoch else "no epoch had been saved")
                log.warning(f"interrupted during epoch {self.epochs_done + 1}: {kept}")
            raise
        finally:
            restore_signals()
            if self.tensorboard is not None:
                self.tensorboard.close()
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()
        return self.summary()

    def summary(self):
        best = self.best
        return {"save_path": str(self.config["save_path"]),
                "resume_path": str(resume_path(self.config)),
                "log_path": str(self.config["log_path"]),
                "metrics_path": str(metrics_path(self.config)),
                "curve_path": str(curve_path(self.config)),
                "best_epoch": best["epoch"], "selection": best["metric"],
                "best_value": best["value"], "early_stop": self.stopped_early,
                "history": self.history}

    # ------------------------------------------------------------ phases

    def _run_phase(self, phase, first_epoch, state):
        """Run (or continue) one phase; `state`: a resume state written inside it, else None."""
        loader = self.method.start_phase(phase, self.train_loader, self.device)
        self.iters_per_epoch = len(loader)
        if self.iters_per_epoch == 0:
            raise UserError(f"train/ gives no batch of {self.config['batch_size']} images per "
                            f"process in phase {phase.name}; lower batch_size")
        groups = self.method.param_groups(phase)
        optimizer = torch.optim.Adam if phase.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = optimizer(groups)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.iters_per_epoch, phase))
        if state is not None:
            self._restore_optimizer(state)
        wrapped = _MethodForward(self.model, self.method)
        self.net = (DistributedDataParallel(
            wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.distributed else wrapped)
        if self.config["compile"]:
            self.net = torch.compile(self.net)
        if self.is_main and len(self.phases) > 1:
            log.info(f"phase {phase.name}: {phase.epochs} epochs, {self.iters_per_epoch} steps "
                     f"per epoch; optimizer {self._describe_groups()}")
        for epoch in range(max(self.epochs_done, first_epoch) + 1, first_epoch + phase.epochs + 1):
            self._run_epoch(phase, loader, epoch, epoch - first_epoch)
            if self.stopped_early:
                break

    def _run_epoch(self, phase, loader, epoch, epoch_in_phase):
        started = time.perf_counter()
        # Epoch randomness depends on (seed, epoch, rank) only: resumed == uninterrupted.
        seed_everything(epoch_seed(self.config["seed"], epoch, self.rank))
        self.augment_generator.manual_seed(epoch_seed(self.config["seed"], epoch, self.rank))
        set_loader_epoch(loader, epoch)
        self.in_epoch = False
        train = self._train_one_epoch(phase, loader, epoch)
        signals = self._validate() if self.is_main and phase.selects else {}
        row = {"epoch": epoch, "phase": phase.name, **train,
               "val_acc": signals.get("val_accuracy"), "val_loss": signals.get("val_loss"),
               "val_map": signals.get("val_map")}
        stop = self._agreed(self.stop_requested)
        checkpoint_seconds = self._end_epoch(phase, row, signals, stop) if self.is_main else 0.0
        if self.patience and self.distributed and self._agreed(bool(self.stopped_early)):
            self.stopped_early = self.stopped_early or "early stop decided on rank 0"
        row.update(checkpoint_seconds=checkpoint_seconds,
                   epoch_time=time.perf_counter() - started)
        if self.is_main:
            atomic_write_text(metrics_path(self.config),
                              "".join(json.dumps(r) + "\n" for r in self.history))
            self._log_epoch(phase, row, epoch_in_phase)
            if self.tensorboard is not None:
                self.tensorboard.add(row)
        self.epochs_done = epoch
        if self.distributed:
            dist.barrier()  # no rank starts the next epoch before the files are written
        if stop:
            raise KeyboardInterrupt

    # ------------------------------------------------------------ one epoch

    def _train_one_epoch(self, phase, loader, epoch):
        self.net.train()
        terms_seen = None
        # Summed over the epoch on the device: each loss term x images, correct predictions.
        sums = None
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        seen, data_time, lr = 0, 0.0, self.optimizer.param_groups[0]["lr"]
        bar = tqdm(total=self.iters_per_epoch, desc=f"epoch {epoch}/{self.total_epochs}",
                   unit="batch", leave=False, disable=None if self.is_main else True)
        started = waited = time.perf_counter()
        for step, (inputs, labels) in enumerate(loader, 1):
            data_time += time.perf_counter() - waited
            self.in_epoch = True
            inputs = self._to_device(inputs, phase)
            labels = labels.to(self.device, non_blocking=True)
            with autocast(self.device, self.amp_dtype):
                outputs = self.net(inputs)
                terms, logits = self.method.loss(phase, outputs, labels)
            loss = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.trainable, self.config["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]  # the first group's, for this step
            self.scheduler.step()
            with torch.no_grad():
                if terms_seen is None:
                    terms_seen = list(terms)
                    sums = torch.zeros(len(terms) + 2, dtype=torch.float64, device=self.device)
                correct = ((logits.argmax(1) == labels).sum() if logits is not None
                           else torch.zeros((), device=self.device))
                sums += torch.stack([loss.detach().double() * len(labels),
                                     *(t.detach().double() * len(labels)
                                       for t in terms.values()), correct.double()])
                bad_step = torch.where((bad_step < 0) & ~torch.isfinite(loss.detach()),
                                       torch.tensor(step, device=self.device), bad_step)
            seen += len(labels)
            bar.update()
            if step % PROGRESS_EVERY == 0 or step == self.iters_per_epoch:
                self._check_finite(bad_step, epoch)
                if self.is_main:
                    values = sums.tolist()
                    bar.set_postfix(loss=f"{values[0] / seen:.4f}", lr=f"{lr:.2e}",
                                    img_s=f"{seen / (time.perf_counter() - started):.0f}",
                                    refresh=False)
            waited = time.perf_counter()
        bar.close()
        self._check_finite(bad_step, epoch)
        elapsed = time.perf_counter() - started
        counts = torch.tensor([float(seen)], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        values, total = sums.tolist(), counts.item()
        row = {"train_loss": values[0] / total,
               **{f"loss_{name}": value / total for name, value in zip(terms_seen, values[1:])},
               "train_acc": 100.0 * values[-1] / total if logits is not None else None,
               "lr": lr, "images_per_s": total / elapsed,
               "data_time_fraction": data_time / elapsed}
        return row

    def _to_device(self, inputs, phase):
        inputs = inputs.to(self.device, non_blocking=True)
        if phase.uses_images and self.augment is not None:
            inputs = self.augment(inputs, self.augment_generator)
        if phase.uses_images and self.config["channels_last"] and self._is_resnet():
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        return inputs

    def _check_finite(self, bad_step, epoch):
        """Stop on a non-finite loss (read from the device here, not at every step)."""
        flag = bad_step.clone()
        if self.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops alike
        step = int(flag.item())
        if step < 0:
            return
        best = self.best_written
        kept = (f"the checkpoint of epoch {best} stays at {self.config['save_path']}"
                if best is not None else
                f"no checkpoint of this run was written to {self.config['save_path']}")
        raise UserError(f"epoch {epoch}, step {step}/{self.iters_per_epoch}: the training "
                        f"loss is not finite (nan or inf); training stopped and {kept}; lower "
                        f"lr, set grad_clip, or use amp: fp32, then re-run with --overwrite")

    @torch.no_grad()
    def _validate(self):
        """Selection signals on val/: val_accuracy and val_loss (%, cross-entropy) of the
        identity head, val_map (val images ranked against the train images) when selected.
        Runs the unwrapped model: DDP's collective calls would wait for the other ranks."""
        if self.val_loader is None:
            return {}
        self.model.eval()
        signals = {}
        logits, labels = [], []
        with autocast(self.device, self.amp_dtype):
            for images, targets in tqdm(self.val_loader, desc="val", unit="batch", leave=False,
                                        disable=None):
                out = self.method.classify(self.model, images.to(self.device, non_blocking=True))
                if out is None:
                    break
                logits.append(out.float())
                labels.append(targets.to(self.device))
        if logits:
            logits, labels = torch.cat(logits), torch.cat(labels)
            signals["val_accuracy"] = 100.0 * (logits.argmax(1) == labels).float().mean().item()
            signals["val_loss"] = F.cross_entropy(logits, labels).item()
        if self.selection == "val_map":
            query, query_ids = self._encode(self.val_loader)
            gallery, gallery_ids = self._encode(train_gallery_loader(self.config,
                                                                      self.train_loader))
            signals["val_map"] = compute_reid_metrics(query @ gallery.T, query_ids,
                                                      gallery_ids)["mAP"]
        self.model.train()
        return signals

    def _encode(self, loader):
        features, labels = [], []
        with autocast(self.device, self.amp_dtype):
            for images, targets in loader:
                batch = self.model.features(images.to(self.device, non_blocking=True))
                features.append(F.normalize(batch.float(), dim=1))
                labels += targets.tolist()
        return torch.cat(features), labels

    def _agreed(self, flag):
        """Whether `flag` is set on any rank (one small collective)."""
        if not self.distributed:
            return flag
        flag = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------ selection and saving

    def _improves(self, signals):
        # selection: last keeps every newer epoch (CLIP-ReID evaluates the last one).
        if self.selection in (None, "last") or self.best["epoch"] is None:
            return True
        value, best = signals.get(self.selection), self.best["value"]
        if value is None or best is None:
            return True
        # Ties go to the later epoch: it has trained longer at a lower lr.
        return value >= best if HIGHER_IS_BETTER[self.selection] else value <= best

    def _end_epoch(self, phase, row, signals, stop):
        """Rank 0: model selection and save points. -> seconds spent writing files (0 when
        nothing was written)."""
        epoch = row["epoch"]
        row["best"] = False
        if phase.selects and self._improves(signals):
            self.best = {"epoch": epoch, "metric": self.selection,
                         "value": signals.get(self.selection), "signals": signals}
            self.best_unsaved = "live"
            row["best"] = True
        self.history.append(row)
        self.stopped_early = self._early_stop(epoch) if phase.selects else None
        if self.stopped_early:
            row["early_stop"] = self.stopped_early
        last = epoch == self.total_epochs or bool(self.stopped_early)
        save_point = (stop or last or epoch % self.config["save_every"] == 0
                      or (self.config["save_every_minutes"] > 0 and time.monotonic()
                          - self.last_save >= 60 * self.config["save_every_minutes"]))
        if not save_point:
            if self.best_unsaved == "live":
                # Keep the best epoch's trained weights until the next save point writes them.
                self.best_unsaved = {k: v.detach().to("cpu", copy=True)
                                     for k, v in self._trained_state().items()}
            return 0.0
        started = time.perf_counter()
        self._save(epoch, finished=last)
        atomic_write(curve_path(self.config), self._plot_curves)
        return time.perf_counter() - started

    def _early_stop(self, epoch):
        """Why the run stops after `epoch` (None: it goes on). Counts the validated epochs
        since the best one from history and best alone, so a resumed run stops where an
        uninterrupted one does."""
        if not self.patience or self.best["epoch"] is None or epoch == self.total_epochs:
            return None
        selects = {p.name: p.selects for p in self.phases}
        stale = sum(1 for r in self.history
                    if r["epoch"] > self.best["epoch"] and selects.get(r["phase"], True))
        if stale < self.patience:
            return None
        return (f"early stop after epoch {epoch}: {self.selection} has not improved for "
                f"{stale} epochs (early_stop_patience {self.patience}); best "
                f"{self._best_text()}")

    def _save(self, epoch, finished):
        """Best checkpoint (if a newer best exists), then the resume state."""
        if self.best_unsaved is not None:
            state = self.model.state_dict()
            if isinstance(self.best_unsaved, dict):
                state.update(self.best_unsaved)
            make_model.save_checkpoint(
                self.config["save_path"], self.model, self.config, self.method.identity_names,
                self.best["epoch"], method=self.method.name,
                module_specs=self.method.module_specs(), selection=self._selection_record(),
                state=state)
            self.best_unsaved, self.best_written = None, self.best["epoch"]
        self._write_resume_state(epoch, finished)
        self.last_save = time.monotonic()
        self.saved_epoch = epoch

    def _selection_record(self):
        return {"metric": self.best["metric"], "value": self.best["value"],
                **self.best["signals"]}

    def _finish(self):
        # The last epoch is a save point: the checkpoint and the curve are on disk.
        if self.stopped_early:
            log.info(self.stopped_early)
        log.info(f"done: best {self._best_text()}; checkpoint {self.config['save_path']}; "
                 f"curve {curve_path(self.config)}")

    # ------------------------------------------------------------ resume

    def _frozen_state(self):
        return {k: v for k, v in self.model.state_dict().items() if self.method.is_frozen(k)}

    def _trained_state(self):
        return {k: v for k, v in self.model.state_dict().items()
                if not self.method.is_frozen(k)}

    def _write_resume_state(self, epoch, finished):
        state = {"format": RESUME_FORMAT, "format_version": RESUME_VERSION,
                 "method": self.method.name, "config": dict(self.config),
                 "identity_names": self.method.identity_names, "world_size": self.world_size,
                 "iters_per_epoch": self.iters_per_epoch, "epoch": epoch,
                 "phase": self._phase_of(epoch), "finished": finished, "best": self.best,
                 "best_written": self.best_written, "history": self.history,
                 "frozen_digest": self.frozen_digest}
        if not finished:
            state.update(trained=self._trained_state(),
                         optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict())
        atomic_write(resume_path(self.config), lambda f: torch.save(state, f))

    def _phase_of(self, epoch):
        """Index of the phase that epoch `epoch` (counted from 1 over all phases) belongs to:
        the phase whose optimizer a resume state written after that epoch holds."""
        last = 0
        for index, phase in enumerate(self.phases):
            last += phase.epochs
            if epoch <= last:
                return index
        return len(self.phases) - 1

    def _restore(self, state):
        if state is None:
            return
        path = resume_path(self.config)
        if state["method"] != self.method.name:
            raise UserError(f"{path} belongs to a {state['method']} run, this is "
                            f"{self.method.name}; pass --overwrite, or set another save_path")
        if state["identity_names"] != self.method.identity_names:
            raise UserError(f"{path} was trained on other identities than train/ of "
                            f"{self.config['data_dir']} now holds; pass --overwrite to start "
                            f"again, or point data_dir at the data it was trained on")
        if state["best"]["epoch"] is not None and not Path(self.config["save_path"]).is_file():
            raise UserError(f"the best checkpoint {self.config['save_path']} of the run in "
                            f"{path} is missing; restore it, or pass --overwrite")
        if state["frozen_digest"] not in (None, self.frozen_digest):
            raise UserError(f"{path} was trained on top of other frozen weights than this run "
                            f"built (pretrained: changed?); restore the weights it used, or "
                            f"pass --overwrite")
        stored = {k: v for k, v in state["trained"].items() if not self.method.is_frozen(k)}
        if stored.keys() != self._trained_state().keys():
            raise UserError(f"{path} does not fit this model (its trained weights differ in "
                            f"names); pass --overwrite to train from scratch")
        try:
            self.model.load_state_dict(stored, strict=False)
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            self._unfit(path, err)
        self.epochs_done = state["epoch"]
        self.history = list(state["history"])
        self.best = state["best"]
        if self.best["metric"] != self.selection:
            # A run started under another selection rule (older code): the next epoch that
            # has the current rule's signal becomes the best.
            self.best = {**self.best, "metric": self.selection, "value": None}
        self.best_written = state.get("best_written", self.best["epoch"])
        self.saved_epoch = state["epoch"]

    def _restore_optimizer(self, state):
        path = resume_path(self.config)
        if state["iters_per_epoch"] != self.iters_per_epoch:
            raise UserError(f"{path} was written with {state['iters_per_epoch']} steps per "
                            f"epoch ({state['world_size']} processes), this run has "
                            f"{self.iters_per_epoch} ({self.world_size}); resume with "
                            f"{state['world_size']} processes, or pass --overwrite")
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
        except (KeyError, RuntimeError, ValueError) as err:
            self._unfit(path, err)

    @staticmethod
    def _unfit(path, err):
        reason = (str(err).strip().splitlines() or [""])[0][:200]
        raise UserError(f"{path} does not fit this model ({type(err).__name__}: {reason}); "
                        f"pass --overwrite to train from scratch") from None

    # ------------------------------------------------------------ signals, logs and plots

    def _stop_on_signals(self):
        """The first Ctrl-C / SIGTERM (a scheduler's stop, torchrun's shutdown) finishes the
        running epoch, saves and stops; a second one, or one before the first step of an
        epoch, stops at once. -> a function that puts the old handlers back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signal handlers can only be set from the main thread

        def request_stop(signum, frame):
            if self.stop_requested or not self.in_epoch:
                raise KeyboardInterrupt
            self.stop_requested = True
            if self.is_main:
                print(f"\nstopping after this epoch (it is saved then); "
                      f"{signal.Signals(signum).name} again stops at once", file=sys.stderr)

        previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT,
                                                                     signal.SIGTERM)}

        def restore():
            for sig, handler in previous.items():
                signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        return restore

    def _open_log(self):
        """File + console handlers on rank 0; other ranks stay silent."""
        log.setLevel(logging.INFO)
        log.propagate = False
        if not self.is_main:
            handlers = [logging.NullHandler()]
        else:
            Path(self.config["log_path"]).parent.mkdir(parents=True, exist_ok=True)
            handlers = [logging.FileHandler(self.config["log_path"], encoding="utf-8"),
                        logging.StreamHandler(sys.stderr)]
            formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                          "%Y-%m-%d %H:%M:%S")
            for handler in handlers:
                handler.setFormatter(formatter)
        for handler in handlers:
            log.addHandler(handler)
        return handlers

    def _describe_groups(self):
        return ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params'])} params, lr "
                         f"{g['initial_lr']:.2e}, wd {g['weight_decay']})"
                         for g in self.optimizer.param_groups)

    def _log_start(self):
        if not self.is_main:
            return
        frozen = sum(v.numel() for v in self._frozen_state().values())
        start = (f"resuming after epoch {self.epochs_done} from {resume_path(self.config)}"
                 if self.epochs_done else "starting from scratch")
        log.info(f"{self.method.name} training of {self.config['name']}: {start}")
        log.info("resolved config:\n" + yaml.safe_dump(dict(self.config), sort_keys=False))
        phases = ", ".join(f"{p.name} {p.epochs} epochs" for p in self.phases)
        log.info(f"device {self.device}, {self.world_size} process(es), precision "
                 f"{PRECISION_NAMES[self.amp_dtype]}, {len(self.method.identity_names)} "
                 f"identities, {len(self.train_loader)} steps per epoch per process; phases: "
                 f"{phases}; selection: {self.selection or 'last epoch (no val/)'}; "
                 f"never trained (not in resume states): {frozen} values")
        for warning in schedule_warnings(self.phases):
            log.warning(warning)
        if self.device.type == "cpu":
            log.info(f"CPU: {torch.get_num_threads()} threads, OMP_WAIT_POLICY "
                     f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")

    def _best_text(self):
        best = self.best
        if best["epoch"] is None:
            return "n/a"
        if best["metric"] is None or best["value"] is None:
            return f"epoch {best['epoch']}"
        return f"{best['metric']} {best['value']:.4g} at epoch {best['epoch']}"

    def _log_epoch(self, phase, row, epoch_in_phase):
        where = (f"epoch {row['epoch']}/{self.total_epochs}" if len(self.phases) == 1 else
                 f"{phase.name} epoch {epoch_in_phase}/{phase.epochs} "
                 f"({row['epoch']}/{self.total_epochs})")
        terms = [k for k in row if k.startswith("loss_")]
        parts = [f"{where}  loss {row['train_loss']:.4f}"
                 + (" (" + ", ".join(f"{k[5:]} {row[k]:.4f}" for k in terms) + ")"
                    if len(terms) > 1 else "")]
        if row["train_acc"] is not None:
            parts.append(f"train acc {row['train_acc']:.2f}%")
        if phase.selects:
            for key, label, fmt in (("val_acc", "val acc", "{:.2f}%"),
                                    ("val_loss", "val loss", "{:.4f}"),
                                    ("val_map", "val mAP", "{:.2f}")):
                if row[key] is not None:
                    parts.append(f"{label} {fmt.format(row[key])}")
            parts.append(f"(best {self._best_text()})")
        parts.append(f"lr {row['lr']:.3e}  {row['images_per_s']:.1f} img/s  data "
                     f"{100 * row['data_time_fraction']:.0f}%  {row['epoch_time']:.1f} s")
        if row["checkpoint_seconds"] > 0:
            parts.append(f"saved in {row['checkpoint_seconds']:.2f} s")
        log.info("  ".join(parts) + ("  * best" if row["best"] else ""))

    def _plot_curves(self, handle):
        plot_curves(handle, self.history, self.phases, self.best["epoch"], self.selection,
                    self.config["name"])

    def _is_resnet(self):
        return not hasattr(self.model.clip_model.visual, "transformer")


def training_parser(description, default_config=None):
    """--config, --set and --overwrite, as every train script takes them."""
    parser = make_parser(description, default_config)
    parser.add_argument("--overwrite", action="store_true",
                        help="train from scratch even if save_path holds a finished or "
                             "unfinished run (its files are replaced as the new run writes)")
    return parser


def check_method(config, name):
    """ConfigError unless `config` is for the method `name` that a train script trains."""
    if config["method"] != name:
        raise ConfigError(f"this script trains method {name} but the config says method: "
                          f"{config['method']}; set method: {name}, or train it with "
                          f"{make_model.KNOWN_METHODS.get(config['method'], 'its own script')}")


def report(summary):
    """Rank 0 prints where the run's files are."""
    if not summary["is_main"]:
        return
    value = summary["best_value"]
    best = (f"epoch {summary['best_epoch']}" + ("" if value is None else
                                                 f", {summary['selection']} {value:.4g}"))
    print(f"checkpoint ({best}): {summary['save_path']}")
    print(f"log: {summary['log_path']}\nmetrics: {summary['metrics_path']}\n"
          f"curve: {summary['curve_path']}\nresume state / finished-run record: "
          f"{summary['resume_path']}")


def run_training(method_factory, config, overwrite=False):
    """What a train entry script does after parsing: data, model, method, engine.

    method_factory(config, identity_names, num_classes) -> Method. Returns the engine's
    summary (rank 0 prints it)."""
    device = init_distributed(config)
    configure_backends(config, device)
    try:
        # Refuse a bad amp, a running or finished run or a mismatched resume state before
        # loading data.
        resolve_precision(config["amp"], device)
        if is_main_process():
            check_not_running(config["save_path"])
        read_resume_state(config, overwrite)
        seed_everything(config["seed"])
        train_loader, val_loader, num_classes = get_train_val_loaders(config)
        method = method_factory(config, list(train_loader.dataset.classes), num_classes)
        engine = Engine(method, train_loader, config, device, val_loader, overwrite=overwrite)
        summary = engine.train()
    finally:
        if dist.is_initialized():
            dist.barrier()  # rank 0 may still be writing; no rank tears down before it ends
            dist.destroy_process_group()
    summary["is_main"] = engine.is_main
    return summary
