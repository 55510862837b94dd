"""The training loop every method shares: phases -> epochs -> steps.

A method (methods/base.py; one file of handreid/methods/) gives the model, phases,
parameter groups and the loss of a batch. The Engine runs them with mixed precision, grad
scaling, DDP, clipping, the lr schedule, device-side loss sums (read every PROGRESS_EVERY
steps: no host sync per step), the NaN stop and a stop every rank agrees on. After each epoch
it calls, in this order: selection (selection.py), checkpoints (checkpointing.py: save points,
pending best, resume state), the run log (run_log.py); then every rank waits at a barrier.

Resume is exact: every epoch's randomness (sampler order, augmentation, loader worker seeds)
is seeded from (seed, epoch, rank) when it starts, so no RNG state is stored. A kill -9 loses
at most `save_every` epochs or `save_every_minutes` (plus the running epoch); the first Ctrl-C
or SIGTERM finishes the epoch, saves and exits 130, a second one stops at once. Under torchrun
rank 0 validates, logs and writes; every rank reads the resume state (on several nodes
save_path must be on a shared disk); the model is wrapped in DDP anew in each phase.
"""
import contextlib
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from handreid.data.device_augment import device_augment
from handreid.data.loaders import set_loader_epoch
from handreid.train.checkpointing import Checkpointer, ResumeState, read_resume_state, resume_path
from handreid.core.errors import ConfigError, UserError
from handreid.methods.base import lr_factor, phase_of
from handreid.train.run_log import RunLog, curve_path, log, metrics_path
from handreid.core.runtime import (GracefulStop, autocast, epoch_seed, rank_and_world, resolve_precision,
                     run_lock, seed_everything)
from handreid.train.selection import Selection, validation_signals

# Steps between reads of the device-side loss sums (progress bar, non-finite loss check).
PROGRESS_EVERY = 25


class _MethodForward(nn.Module):
    """What DistributedDataParallel wraps: the model, run through the method's forward."""

    def __init__(self, model, method):
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, inputs):
        return self.method.forward(self.model, inputs)


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
        self.resnet = not hasattr(self.model.clip_model.visual, "transformer")
        if config["channels_last"] and self.resnet:
            self.model.clip_model.visual.to(memory_format=torch.channels_last)
        self.amp_dtype = resolve_precision(config["amp"], self.device)
        # augment_on: device -> uint8 batches, augmented here with a per-epoch seeded generator.
        self.augment = device_augment(config)
        self.augment_generator = torch.Generator(self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.selection = Selection(config, has_val=val_loader is not None)
        self.checkpoints = Checkpointer(config, method, self.model)
        self.run_log = RunLog(config, self.phases, self.is_main, overwrite)
        self.stopped_early = None    # why the run stopped before its last epoch, if it did
        self.history = []
        self.epochs_done = 0
        self.stop = GracefulStop(announce=self.is_main)
        self.optimizer = self.scheduler = self.net = None
        self.iters_per_epoch = None

    def train(self):
        """Train (or resume) to the last epoch of the last phase; -> summary dict."""
        self.run_log.open()
        try:
            # Rank 0 holds the lock for the whole run; the other ranks follow it.
            with self.stop, run_lock(self.config["save_path"]) if self.is_main else \
                    contextlib.nullcontext():
                state = read_resume_state(self.config, self.overwrite)
                if state is not None:
                    self.checkpoints.restore(state, self.scaler)
                    self.selection.restore(state.best)
                    self.epochs_done, self.history = state.epoch, list(state.history)
                self.run_log.start(
                    self.method, self.epochs_done, self.device, self.world_size,
                    self.amp_dtype, len(self.train_loader), self.selection.rule,
                    sum(v.numel() for v in self.checkpoints.frozen_state().values()))
                first = 0
                for index, phase in enumerate(self.phases):
                    if self.epochs_done < first + phase.epochs and not self.stopped_early:
                        # The saved optimizer belongs to the phase the saved epoch was in.
                        self._run_phase(phase, first,
                                        state if state and state.phase == index else None)
                    first += phase.epochs
                if self.is_main:
                    self.run_log.finish(self.stopped_early, self.selection.best)
        except KeyboardInterrupt:
            saved = self.checkpoints.saved_epoch
            if self.is_main and not self.stop.active and self.epochs_done and \
                    saved != self.epochs_done:
                # Stopped before the next epoch's first step: the weights are still those of
                # the last finished epoch, so they can be saved exactly.
                self._save(self.epochs_done, finished=False)
            if self.is_main:
                kept = (f"epoch {self.history[-1]['epoch']} is kept in "
                        f"{resume_path(self.config)}; run the same command again to resume"
                        if self.checkpoints.saved_epoch else "no epoch had been saved")
                log.warning(f"interrupted during epoch {self.epochs_done + 1}: {kept}")
            raise
        finally:
            self.run_log.close()
        return self.summary()

    def summary(self):
        best = self.selection.best
        return {"save_path": str(self.config["save_path"]),
                "resume_path": str(resume_path(self.config)),
                "log_path": str(self.config["log_path"]),
                "metrics_path": str(metrics_path(self.config)),
                "curve_path": str(curve_path(self.config)),
                "best_epoch": best.epoch, "selection": best.metric,
                "best_value": best.value, "early_stop": self.stopped_early,
                "history": self.history}

    def _run_phase(self, phase, first_epoch, state):
        """Run (or continue) one phase; `state`: a resume state written inside it, else None."""
        loader = self.method.start_phase(phase, self.train_loader, self.device)
        self.iters_per_epoch = len(loader)
        if self.iters_per_epoch == 0:
            raise UserError(f"train/ gives no batch of {self.config['batch_size']} images per "
                            f"process in phase {phase.name}; lower batch_size")
        optimizer = torch.optim.Adam if phase.optimizer == "adam" else torch.optim.AdamW
        self.optimizer = optimizer(self.method.param_groups(phase))
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.iters_per_epoch, phase))
        if state is not None:
            self.checkpoints.restore_optimizer(state, self.optimizer, self.scheduler,
                                               self.iters_per_epoch, self.world_size)
        wrapped = _MethodForward(self.model, self.method)
        self.net = (DistributedDataParallel(
            wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.distributed else wrapped)
        if self.config["compile"]:
            self.net = torch.compile(self.net)
        self.run_log.phase(phase, self.iters_per_epoch, self.optimizer.param_groups)
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
        self.stop.active = False
        row = {"epoch": epoch, "phase": phase.name, **self._train_one_epoch(phase, loader, epoch)}
        signals = (validation_signals(self.method, self.model, self.val_loader,
                                      self.train_loader, self.config, self.selection.rule,
                                      self.device, self.amp_dtype)
                   if self.is_main and phase.selects else {})
        row.update(val_acc=signals.get("val_accuracy"), val_loss=signals.get("val_loss"),
                   val_map=signals.get("val_map"))
        stop = self._agreed(self.stop.requested)
        written = 0.0
        if self.is_main:
            # select -> save: the checkpoint written now holds the epoch just selected.
            row["best"] = phase.selects and self.selection.update(epoch, signals)
            if row["best"]:
                self.checkpoints.new_best(epoch)
            self.history.append(row)
            self.stopped_early = (self.selection.early_stop(
                epoch, self.history, {p.name: p.selects for p in self.phases},
                self.total_epochs) if phase.selects else None)
            if self.stopped_early:
                row["early_stop"] = self.stopped_early
            last = epoch == self.total_epochs or bool(self.stopped_early)
            if self.checkpoints.save_points.due(epoch, last, stop):
                began = time.perf_counter()
                self._save(epoch, finished=last)
                self.run_log.curve(self.history, self.selection.best, self.selection.rule)
                written = time.perf_counter() - began
            else:
                self.checkpoints.keep_pending_weights()
        if self.selection.patience and self.distributed and self._agreed(bool(self.stopped_early)):
            self.stopped_early = self.stopped_early or "early stop decided on rank 0"
        row.update(checkpoint_seconds=written, epoch_time=time.perf_counter() - started)
        self.run_log.epoch(phase, row, epoch_in_phase, self.history, self.selection.best)
        self.epochs_done = epoch
        if self.distributed:
            dist.barrier()  # no rank starts the next epoch before the files are written
        if stop:
            raise KeyboardInterrupt

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
            self.stop.active = True
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
        if phase.uses_images and self.config["channels_last"] and self.resnet:
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
        best = self.checkpoints.best_written
        kept = (f"the checkpoint of epoch {best} stays at {self.config['save_path']}"
                if best is not None else
                f"no checkpoint of this run was written to {self.config['save_path']}")
        raise UserError(f"epoch {epoch}, step {step}/{self.iters_per_epoch}: the training "
                        f"loss is not finite (nan or inf); training stopped and {kept}; lower "
                        f"lr, set grad_clip, or use amp: fp32, then re-run with --overwrite")

    def _agreed(self, flag):
        """Whether `flag` is set on any rank (one small collective)."""
        if not self.distributed:
            return flag
        flag = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _save(self, epoch, finished):
        """The pending best checkpoint, then the resume state after `epoch`."""
        state = ResumeState(
            method=self.method.name, config=dict(self.config),
            identity_names=self.method.identity_names, world_size=self.world_size,
            iters_per_epoch=self.iters_per_epoch, epoch=epoch, phase=phase_of(self.phases, epoch),
            finished=finished, best=self.selection.best,
            best_written=self.checkpoints.best_written, history=self.history,
            frozen_digest=self.checkpoints.frozen_digest)
        if not finished:
            state.trained = self.checkpoints.trained_state()
            state.optimizer, state.scheduler = (self.optimizer.state_dict(),
                                                self.scheduler.state_dict())
            state.scaler = self.scaler.state_dict()
        self.checkpoints.save(state, self.selection.best)
