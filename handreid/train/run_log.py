"""What a training run shows while it runs. Rank 0 writes (the other ranks stay silent):
  log_path                     human log, appended across runs and resumes
  <log stem>_metrics.jsonl     one JSON line per epoch
  <log stem>_curve.png         loss terms, accuracy and selection signals per epoch, the
                               selected epoch and phase starts marked; rewritten at every save
                               point and at the end
  <log stem>_tensorboard/      TensorBoard events of the same per-epoch metrics (tensorboard:)
A tracker writer (TensorBoardLog is one) plugs in at RunLog.epoch, which gets every row.
"""
import json
import logging
import os
import sys
from pathlib import Path

import torch
import yaml
from matplotlib.figure import Figure

from handreid.core.atomic_files import atomic_write, atomic_write_text, open_no_follow
from handreid.core.errors import UserError
from handreid.train.checkpointing import resume_path
from handreid.core.runtime import PRECISION_NAMES
from handreid.methods.base import schedule_warnings

log = logging.getLogger("handid.train")

# Scalars written to TensorBoard per epoch, besides every loss_<term>; tag -> row key.
TENSORBOARD_SCALARS = {"loss/total": "train_loss", "accuracy/train": "train_acc",
                       "accuracy/val": "val_acc", "val/loss": "val_loss", "val/map": "val_map",
                       "lr": "lr", "speed/images_per_s": "images_per_s",
                       "speed/data_time_fraction": "data_time_fraction",
                       "speed/epoch_seconds": "epoch_time"}


def metrics_path(config):
    path = Path(config["log_path"])
    return path.with_name(f"{path.stem}_metrics.jsonl")


def refuse_foreign_metrics(path, overwrite):
    """A file at the metrics path whose first line is no metrics row of a run (a JSON object
    with an epoch and a train loss) is replaced only with --overwrite."""
    if overwrite or not path.is_file():
        return
    with open(path, "rb") as handle:
        first = handle.readline(1 << 20)
    try:
        row = json.loads(first)
    except ValueError:
        row = None
    if not (isinstance(row, dict) and {"epoch", "train_loss"} <= row.keys()):
        raise UserError(f"{path} exists and is not the metrics file of a training run; move it "
                        f"away, set another log_path, or pass --overwrite to replace it")


def curve_path(config):
    path = Path(config["log_path"])
    return path.with_name(f"{path.stem}_curve.png")


def tensorboard_dir(log_path):
    """<log stem>_tensorboard/ beside the log: `tensorboard --logdir logs` finds every run."""
    path = Path(log_path)
    return path.with_name(f"{path.stem}_tensorboard")


class TensorBoardLog:
    """One scalar per metric per epoch (step = epoch). A resumed run continues the same folder;
    events of epochs after `first_epoch - 1` left by an interrupted run are purged."""

    def __init__(self, log_path, first_epoch):
        # Imported here: only a training run that writes events pays for it.
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(tensorboard_dir(log_path)), purge_step=first_epoch)

    def add(self, row):
        epoch = row["epoch"]
        for tag, key in TENSORBOARD_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], epoch)
        for key, value in row.items():
            if key.startswith("loss_") and value is not None:
                self.writer.add_scalar(f"loss/{key[5:]}", value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


def plot_curves(handle, history, phases, best_epoch, selection, name):
    """Loss terms, accuracy and selection signals per epoch as a PNG written to `handle`.
    Every panel spans every epoch of the run; the selected (best) epoch and, for methods
    with several phases, where each phase starts are marked on every panel."""
    epochs = [row["epoch"] for row in history]
    total = sum(phase.epochs for phase in phases)
    figure = Figure(figsize=(15, 4))
    loss_axes, acc_axes, val_axes = figure.subplots(1, 3, sharex=True)
    terms = [k for k in history[-1] if k.startswith("loss_")] if history else []
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="total")
    for term in terms if len(terms) > 1 else []:
        loss_axes.plot(epochs, [row.get(term) for row in history], marker=".", label=term[5:])
    loss_axes.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        if any(row.get(key) is not None for row in history):
            acc_axes.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    acc_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", ylim=(0, 100),
                 title="identity accuracy")
    for key, label in (("val_loss", "val loss"), ("val_map", "val mAP (%)")):
        if any(row.get(key) is not None for row in history):
            val_axes.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    val_axes.set(xlabel="epoch", title=f"selection signals (selection: "
                                       f"{selection or 'last epoch'})")
    starts, first = [], 0
    for phase in phases[:-1]:
        first += phase.epochs
        starts.append((first + 0.5, phases[len(starts) + 1].name))
    for axes in (loss_axes, acc_axes, val_axes):
        for boundary, phase_name in starts:
            axes.axvline(boundary, color="grey", linestyle="--",
                         label=f"phase {phase_name} starts")
        if best_epoch is not None:
            axes.axvline(best_epoch, color="tab:red", linestyle=":",
                         label=f"selected epoch {best_epoch}")
        if axes.lines:
            axes.legend(fontsize="small")
    loss_axes.set_xlim(0.5, max(total, 1) + 0.5)
    figure.suptitle(name)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=100)


FILE_ONLY = {"file_only": True}  # `extra` of a log line the terminal does not show


def not_file_only(record):
    """The terminal's filter: lines meant for the log file alone (the resolved config) stay
    out, so the progress and the results stand out."""
    return not getattr(record, "file_only", False)


class RunLog:
    """The log lines, metrics JSONL, curves and tracker of one run on one rank (only rank 0
    writes). open() before the run, close() after it, also when it fails."""

    def __init__(self, config, phases, is_main, overwrite=False):
        self.config, self.phases, self.is_main = config, phases, is_main
        self.overwrite = overwrite
        self.total_epochs = sum(phase.epochs for phase in phases)
        self.handlers, self.tensorboard, self.log_file = [], None, None

    def open(self):
        """File + console handlers on rank 0; other ranks stay silent. UserError, before
        anything is written, for a metrics file this project did not write (unless
        overwrite) or a symbolic link at log_path."""
        log.setLevel(logging.INFO)
        log.propagate = False
        if not self.is_main:
            self.handlers = [logging.NullHandler()]
        else:
            refuse_foreign_metrics(metrics_path(self.config), self.overwrite)
            path = Path(self.config["log_path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            self.log_file = os.fdopen(open_no_follow(path, os.O_WRONLY | os.O_APPEND |
                                                     os.O_CREAT, "set another log_path"),
                                      "a", encoding="utf-8")
            terminal = logging.StreamHandler(sys.stderr)
            terminal.addFilter(not_file_only)
            self.handlers = [logging.StreamHandler(self.log_file), terminal]
            formatter = logging.Formatter("%(asctime)s %(levelname)s %(message)s",
                                          "%Y-%m-%d %H:%M:%S")
            for handler in self.handlers:
                handler.setFormatter(formatter)
        for handler in self.handlers:
            log.addHandler(handler)

    def close(self):
        if self.tensorboard is not None:
            self.tensorboard.close()
        for handler in self.handlers:
            log.removeHandler(handler)
            handler.close()
        if self.log_file is not None:
            self.log_file.close()

    def start(self, method, epochs_done, device, world_size, amp_dtype, steps_per_epoch,
              selection, frozen_values):
        """The run's first lines: what trains, from where, on what, schedule warnings; then
        the tracker opens."""
        if not self.is_main:
            return
        start = (f"resuming after epoch {epochs_done} from {resume_path(self.config)}"
                 if epochs_done else "starting from scratch")
        log.info(f"{method.name} training of {self.config['name']}: {start}")
        log.info("resolved config:\n" + yaml.safe_dump(dict(self.config), sort_keys=False),
                 extra=FILE_ONLY)
        log.info(f"log: {self.config['log_path']} (with the resolved config)")
        phases = ", ".join(f"{p.name} {p.epochs} epochs" for p in self.phases)
        log.info(f"device {device}, {world_size} process(es), precision "
                 f"{PRECISION_NAMES[amp_dtype]}, {len(method.identity_names)} identities, "
                 f"{steps_per_epoch} steps per epoch per process; phases: {phases}; "
                 f"selection: {selection or 'last epoch (no val/)'}; never trained (not in "
                 f"resume states): {frozen_values} values")
        for warning in schedule_warnings(self.phases):
            log.warning(warning)
        if device.type == "cpu":
            log.info(f"CPU: {torch.get_num_threads()} threads, OMP_WAIT_POLICY "
                     f"{os.environ.get('OMP_WAIT_POLICY', 'unset')}")
        if self.config["tensorboard"]:
            self.tensorboard = TensorBoardLog(self.config["log_path"], epochs_done + 1)

    def phase(self, phase, steps_per_epoch, groups):
        """A phase's first line (methods with several phases): its optimizer groups."""
        if not self.is_main or len(self.phases) == 1:
            return
        described = ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params'])} params, lr "
                              f"{g['initial_lr']:.2e}, wd {g['weight_decay']})" for g in groups)
        log.info(f"phase {phase.name}: {phase.epochs} epochs, {steps_per_epoch} steps per "
                 f"epoch; optimizer {described}")

    def epoch(self, phase, row, epoch_in_phase, history, best):
        """After an epoch: its log line, the metrics JSONL (all of `history`), the tracker."""
        if not self.is_main:
            return
        atomic_write_text(metrics_path(self.config),
                          "".join(json.dumps(r) + "\n" for r in history))
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
            parts.append(f"(best {best.describe()})")
        parts.append(f"lr {row['lr']:.3e}  {row['images_per_s']:.1f} img/s  data "
                     f"{100 * row['data_time_fraction']:.0f}%  {row['epoch_time']:.1f} s")
        if row["checkpoint_seconds"] > 0:
            parts.append(f"saved in {row['checkpoint_seconds']:.2f} s")
        log.info("  ".join(parts) + ("  * best" if row["best"] else ""))
        if self.tensorboard is not None:
            self.tensorboard.add(row)

    def curve(self, history, best, selection):
        atomic_write(curve_path(self.config), lambda handle: plot_curves(
            handle, history, self.phases, best.epoch, selection, self.config["name"]))

    def finish(self, stopped_early, best):
        # The last epoch is a save point: the checkpoint and the curve are on disk.
        if stopped_early:
            log.info(stopped_early)
        log.info(f"done: best {best.describe()}; checkpoint {self.config['save_path']}; "
                 f"curve {curve_path(self.config)}")
