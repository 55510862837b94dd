"""Stage 1 trainer: fine-tune the CLIP image encoder and an identity head with cross-entropy
while the text tower stays frozen.

An epoch is one pass over train/ (AdamW on the image encoder and the head only, linear warmup
then cosine or step decay per iteration, label smoothing, optional gradient clipping, mixed
precision), then top-1 accuracy of the head on val/ (one held-out image per training
identity). Model selection uses val/ only, never a test split.

Files it writes (every write atomic: a kill mid-write leaves the previous file):
  save_path                    best checkpoint by val accuracy (make_model's format). On a tie
                               the later epoch wins: with one val image per identity, accuracy
                               saturates early, and the later model has trained longer at a
                               lower lr. Without a val loader: the last epoch.
  <save_path stem>.resume.pth  state after the last finished epoch: weights, optimizer,
                               scheduler, grad scaler, best so far, history. After the last
                               epoch it shrinks to a "finished" record (no tensors), which
                               makes a re-run refuse to overwrite the finished run.
  log_path                     human log, appended across runs and resumes
  <log stem>_metrics.jsonl     one JSON line per epoch: epoch, train_loss, train_acc and
                               val_acc (%), lr (image encoder, last step), images_per_s (all
                               processes), epoch_time (s, training + validation)
  <log stem>_curve.png         loss and accuracy per epoch, written at the end

Resume is exact because every epoch's randomness (sampler order, augmentation, loader worker
seeds) is seeded from (seed, epoch, rank) when the epoch starts: no RNG state has to survive
an interruption. Under torchrun (WORLD_SIZE > 1) the model runs in DistributedDataParallel;
train loss and accuracy are summed over ranks; rank 0 validates, logs and writes the files.
Every rank reads the resume state, so on several nodes save_path must be on a shared disk.
"""
import json
import logging
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from matplotlib.figure import Figure
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import make_model
from build_dataloader import set_loader_epoch
from config import SCHEMA, ConfigError, UserError, atomic_write, atomic_write_text

RESUME_FORMAT = "clip-handid-stage1-resume"
RESUME_VERSION = 1
# Config keys that do not change what training computes: a run may resume with other values.
NON_TRAINING_KEYS = {"name", "data_dir", "num_workers", "cache_images", "device", "save_path",
                     "log_path", "variant", "num_splits", "gallery", "flip", "ap_mode",
                     "max_rank", "eval_batch_size", "results_dir", "plots", "plot_queries"}
# Parameter names (split at '.' and '_') that get no weight decay even when not 1-D.
NO_DECAY_NAME = re.compile(r"(^|[._])(bias|norm|ln|bn|positional|\w*embedding)\w*", re.I)
PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}

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


# ---------------------------------------------------------------- runtime

def resolve_device(config):
    """config device -> torch.device; `auto` and `cuda` pick this process's LOCAL_RANK GPU."""
    name = config["device"]
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device; use auto, cpu, cuda or cuda:N") \
            from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device: {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device: {name} but no CUDA GPU is available; set device: cpu "
                              f"or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


def resolve_precision(amp, device):
    """config amp -> autocast dtype, None for fp32. auto: bf16 on CUDA where the GPU has it,
    else fp16 (with a grad scaler); fp32 on CPU, where autocast rarely pays off."""
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise ConfigError("amp: fp16 needs a CUDA device; on CPU use amp: bf16 or fp32")
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("amp: bf16 is not supported by this GPU; use amp: fp16 or auto")
    return PRECISIONS[amp]


def init_distributed(config):
    """Join the torchrun process group when WORLD_SIZE > 1 (nccl on CUDA, gloo on CPU);
    -> this process's device."""
    device = resolve_device(config)
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    seed %= 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """A well-mixed 32-bit seed for one (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed % 2 ** 64, epoch, rank]).generate_state(1)[0])


# ---------------------------------------------------------------- optimisation

def no_weight_decay(name, param):
    """Biases, norm scales, class token (all 1-D) and embeddings are not decayed."""
    return param.ndim <= 1 or bool(NO_DECAY_NAME.search(name))


def param_groups(clip_model, classifier, config):
    """AdamW groups over the image encoder (lr) and the head (lr * head_lr_mult), each split
    into decayed and not-decayed parameters. Nothing outside `.visual` is included."""
    groups = []
    for part, module, lr in (("image_encoder", clip_model.visual, config["lr"]),
                             ("head", classifier, config["lr"] * config["head_lr_mult"])):
        decay, plain = [], []
        for name, param in module.named_parameters():
            if param.requires_grad:
                (plain if no_weight_decay(name, param) else decay).append(param)
        groups.append({"name": part, "params": decay, "lr": lr,
                       "weight_decay": config["weight_decay"]})
        groups.append({"name": f"{part}_no_decay", "params": plain, "lr": lr,
                       "weight_decay": 0.0})
    return [group for group in groups if group["params"]]


def lr_factor(step, iters_per_epoch, config):
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup over
    warmup_epochs, then a cosine decay to 0 at the end, or x lr_gamma at each epoch of
    lr_steps."""
    warmup = config["warmup_epochs"] * iters_per_epoch
    if step < warmup:
        return (step + 1) / warmup
    if config["scheduler"] == "cosine":
        total = config["epochs"] * iters_per_epoch
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    epoch = step / iters_per_epoch
    return config["lr_gamma"] ** sum(epoch >= milestone for milestone in config["lr_steps"])


# ---------------------------------------------------------------- resume state

def read_resume_state(config, overwrite=False):
    """The saved state of an unfinished run at save_path, or None to start fresh.
    UserError for a finished run (unless overwrite), an unreadable file, or a run whose
    training settings differ from `config`."""
    path = resume_path(config)
    if overwrite or not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise UserError(f"cannot read resume state {path}: corrupt or truncated "
                        f"({type(err).__name__}); delete it, or pass --overwrite to train "
                        f"from scratch") from None
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT \
            or state.get("format_version") != RESUME_VERSION:
        raise UserError(f"{path} is not a {RESUME_FORMAT} v{RESUME_VERSION} file; delete it, "
                        f"or pass --overwrite to train from scratch")
    if state["finished"]:
        best = state["best_val_accuracy"]
        raise UserError(f"training of {config['save_path']} already finished ({state['epoch']} "
                        f"epochs, best val accuracy "
                        f"{'n/a' if best is None else f'{best:.2f}%'}); pass --overwrite to "
                        f"train again, or set another save_path")
    changed = [f"{key}: {state['config'].get(key)!r} -> {config[key]!r}" for key in SCHEMA
               if key not in NON_TRAINING_KEYS and state["config"].get(key) != config[key]]
    if changed:
        raise UserError(f"{path} belongs to a run with other training settings "
                        f"({'; '.join(changed)}); pass --overwrite to start again, or set "
                        f"another save_path")
    return state


# ---------------------------------------------------------------- the trainer

class FinetuneTrainerStage1:
    """Trains `classifier` on top of `clip_model.visual` (text tower frozen) on
    `train_loader` batches (images, class indices); train() runs or resumes the run.

    overwrite=True starts from scratch even if save_path holds a finished or unfinished
    run; its files are replaced only as the new run writes its own.
    """

    def __init__(self, clip_model, classifier, train_loader, config, device, val_loader=None,
                 overwrite=False):
        if classifier is None:
            raise ValueError("Stage 1 trains an identity head: build_model(config, num_classes)")
        self.config, self.overwrite = config, overwrite
        self.device = torch.device(device)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.distributed else 0
        self.world_size = dist.get_world_size() if self.distributed else 1
        self.is_main = self.rank == 0
        self.identity_names = list(train_loader.dataset.classes)
        self.iters_per_epoch = len(train_loader)
        if self.iters_per_epoch == 0:
            raise UserError(f"train/ gives no batch of {config['batch_size']} images per "
                            f"process; lower batch_size")
        if not 0.0 <= config["label_smoothing"] <= 1.0:
            raise ConfigError(f"label_smoothing must be in [0, 1], got "
                              f"{config['label_smoothing']}")

        # Stage 1 trains the image encoder only, whatever the caller's model froze.
        make_model.freeze_text_tower(clip_model)
        self.model = make_model.HandIdModel(clip_model, classifier).to(self.device)
        self.net = (DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.distributed else self.model)
        self.amp_dtype = resolve_precision(config["amp"], self.device)
        self.scaler = torch.amp.GradScaler(self.device.type,
                                           enabled=self.amp_dtype == torch.float16)
        self.optimizer = torch.optim.AdamW(param_groups(clip_model, classifier, config))
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.iters_per_epoch, config))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
        self.start_epoch = 0
        self.history = []
        self.best_val_accuracy = self.best_epoch = None

    # ------------------------------------------------------------ public

    def train(self):
        """Train (or resume) to config epochs; -> summary dict with the output paths."""
        handlers = self._open_log()
        restore_sigterm = self._raise_on_sigterm()
        epoch = self.start_epoch + 1
        try:
            self._restore(read_resume_state(self.config, self.overwrite))
            self._log_start()
            for epoch in range(self.start_epoch + 1, self.config["epochs"] + 1):
                self._run_epoch(epoch)
            if self.is_main:
                atomic_write(curve_path(self.config), self._plot_curves)
                log.info(f"done: best val accuracy {self._best_text()}; checkpoint "
                         f"{self.config['save_path']}; curve {curve_path(self.config)}")
        except KeyboardInterrupt:
            if self.is_main:
                kept = (f"epoch {self.history[-1]['epoch']} is kept in "
                        f"{resume_path(self.config)}; run the same command again to resume"
                        if self.history else "no epoch had finished")
                log.warning(f"interrupted during epoch {epoch}: {kept}")
            raise
        finally:
            restore_sigterm()
            for handler in handlers:
                log.removeHandler(handler)
                handler.close()
        return self.summary()

    def summary(self):
        return {"save_path": str(self.config["save_path"]),
                "resume_path": str(resume_path(self.config)),
                "log_path": str(self.config["log_path"]),
                "metrics_path": str(metrics_path(self.config)),
                "curve_path": str(curve_path(self.config)),
                "best_epoch": self.best_epoch, "best_val_accuracy": self.best_val_accuracy,
                "history": self.history}

    # ------------------------------------------------------------ one epoch

    def _run_epoch(self, epoch):
        started = time.perf_counter()
        # Epoch randomness depends on (seed, epoch, rank) only: resumed == uninterrupted.
        seed_everything(epoch_seed(self.config["seed"], epoch, self.rank))
        set_loader_epoch(self.train_loader, epoch)
        train_loss, train_acc, lr, images_per_s = self._train_one_epoch(epoch)
        val_acc = self._validate() if self.is_main else None
        row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
               "val_acc": val_acc, "lr": lr, "images_per_s": images_per_s,
               "epoch_time": time.perf_counter() - started}
        if self.is_main:
            self._end_epoch(row)
        if self.distributed:
            dist.barrier()  # no rank starts the next epoch before the files are written

    def _train_one_epoch(self, epoch):
        self.net.train()
        # Summed over the epoch: loss * images, correct predictions, images.
        totals = torch.zeros(3, dtype=torch.float64, device=self.device)
        bar = tqdm(self.train_loader, desc=f"epoch {epoch}/{self.config['epochs']}",
                   unit="batch", leave=False, disable=None if self.is_main else True)
        started = time.perf_counter()
        for step, (images, labels) in enumerate(bar, 1):
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits, _ = self.net(images)
            loss = self.criterion(logits.float(), labels)
            self._check_finite(loss, epoch, step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            if self.config["grad_clip"] > 0:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(self.trainable, self.config["grad_clip"])
            self.scaler.step(self.optimizer)
            self.scaler.update()
            lr = self.optimizer.param_groups[0]["lr"]  # the image encoder's, for this step
            self.scheduler.step()
            with torch.no_grad():
                totals += torch.stack([loss.detach().double() * len(labels),
                                       (logits.argmax(1) == labels).sum().double(),
                                       torch.tensor(float(len(labels)), device=self.device,
                                                    dtype=torch.float64)])
            if self.is_main:
                loss_sum, correct, seen = totals.tolist()
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.1f}%",
                                lr=f"{lr:.2e}",
                                img_s=f"{seen / (time.perf_counter() - started):.0f}",
                                refresh=False)
        bar.close()
        if self.distributed:
            dist.all_reduce(totals)
        loss_sum, correct, seen = totals.tolist()
        return (loss_sum / seen, 100.0 * correct / seen, lr,
                seen / (time.perf_counter() - started))

    def _check_finite(self, loss, epoch, step):
        value = loss.detach().clone()
        if self.distributed:
            dist.all_reduce(value)  # every rank sees a NaN of any rank and stops alike
        if not torch.isfinite(value):
            kept = (f"the checkpoint of epoch {self.best_epoch} stays at "
                    f"{self.config['save_path']}" if self.best_epoch is not None
                    else f"no epoch of this run finished, so {self.config['save_path']} "
                         f"was not written")
            raise UserError(f"epoch {epoch}, step {step}/{self.iters_per_epoch}: the training "
                            f"loss is {value.item()}; training stopped and {kept}; lower lr, "
                            f"set grad_clip, or use amp: fp32, then re-run with --overwrite")

    @torch.no_grad()
    def _validate(self):
        """Top-1 accuracy (%) of the head on val/, or None without val images. Runs the
        unwrapped model: DDP's collective calls would wait for the other ranks."""
        if self.val_loader is None:
            return None
        self.model.eval()
        correct = total = 0
        for images, labels in tqdm(self.val_loader, desc="val", unit="batch", leave=False,
                                   disable=None):
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                logits, _ = self.model(images.to(self.device, non_blocking=True))
            correct += (logits.argmax(1).cpu() == labels).sum().item()
            total += len(labels)
        return 100.0 * correct / total if total else None

    def _end_epoch(self, row):
        """Rank 0: best checkpoint, then resume state, metrics and the log line."""
        epoch, val_acc = row["epoch"], row["val_acc"]
        is_best = (val_acc is None or self.best_val_accuracy is None
                   or val_acc >= self.best_val_accuracy)
        if is_best:
            make_model.save_checkpoint(self.config["save_path"], self.model.clip_model,
                                       self.model.classifier, self.config, self.identity_names,
                                       epoch, val_acc)
            self.best_val_accuracy, self.best_epoch = val_acc, epoch
        self.history.append(row)
        self._write_resume_state(epoch)
        atomic_write_text(metrics_path(self.config),
                          "".join(json.dumps(r) + "\n" for r in self.history))
        val_text = "n/a" if val_acc is None else f"{val_acc:.2f}%"
        log.info(f"epoch {epoch}/{self.config['epochs']}  loss {row['train_loss']:.4f}  "
                 f"train acc {row['train_acc']:.2f}%  val acc {val_text}  "
                 f"(best {self._best_text()})  lr {row['lr']:.3e}  "
                 f"{row['images_per_s']:.1f} img/s  {row['epoch_time']:.1f} s"
                 + ("  * saved" if is_best else ""))

    def _best_text(self):
        if self.best_epoch is None:
            return "n/a"
        accuracy = "n/a" if self.best_val_accuracy is None else f"{self.best_val_accuracy:.2f}%"
        return f"{accuracy} at epoch {self.best_epoch}"

    # ------------------------------------------------------------ resume

    def _write_resume_state(self, epoch):
        finished = epoch == self.config["epochs"]
        state = {"format": RESUME_FORMAT, "format_version": RESUME_VERSION,
                 "config": dict(self.config), "identity_names": self.identity_names,
                 "world_size": self.world_size, "iters_per_epoch": self.iters_per_epoch,
                 "epoch": epoch, "finished": finished,
                 "best_val_accuracy": self.best_val_accuracy, "best_epoch": self.best_epoch,
                 "history": self.history}
        if not finished:
            state.update(clip_state_dict=self.model.clip_model.state_dict(),
                         classifier_state_dict=self.model.classifier.state_dict(),
                         optimizer=self.optimizer.state_dict(),
                         scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict())
        atomic_write(resume_path(self.config), lambda f: torch.save(state, f))

    def _restore(self, state):
        if state is None:
            return
        path = resume_path(self.config)
        if state["identity_names"] != self.identity_names:
            raise UserError(f"{path} was trained on other identities than train/ of "
                            f"{self.config['data_dir']} now holds; pass --overwrite to start "
                            f"again, or point data_dir at the data it was trained on")
        if state["iters_per_epoch"] != self.iters_per_epoch:
            raise UserError(f"{path} was written with {state['iters_per_epoch']} steps per "
                            f"epoch ({state['world_size']} processes), this run has "
                            f"{self.iters_per_epoch} ({self.world_size}); resume with "
                            f"{state['world_size']} processes, or pass --overwrite")
        if state["best_epoch"] is not None and not Path(self.config["save_path"]).is_file():
            raise UserError(f"the best checkpoint {self.config['save_path']} of the run in "
                            f"{path} is missing; restore it, or pass --overwrite")
        try:
            self.model.clip_model.load_state_dict(state["clip_state_dict"])
            self.model.classifier.load_state_dict(state["classifier_state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
        except (KeyError, RuntimeError, ValueError) as err:
            reason = (str(err).strip().splitlines() or [""])[0][:200]
            raise UserError(f"{path} does not fit this model ({type(err).__name__}: {reason}); "
                            f"pass --overwrite to train from scratch") from None
        self.start_epoch = state["epoch"]
        self.history = list(state["history"])
        self.best_val_accuracy, self.best_epoch = state["best_val_accuracy"], state["best_epoch"]

    # ------------------------------------------------------------ logging and plots

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

    def _raise_on_sigterm(self):
        """SIGTERM (a scheduler's stop, torchrun's shutdown) ends the run like Ctrl-C: the
        last finished epoch stays resumable. -> a function that puts the old handler back."""
        if threading.current_thread() is not threading.main_thread():
            return lambda: None  # signal handlers can only be set from the main thread

        def interrupt(signum, frame):
            raise KeyboardInterrupt

        previous = signal.signal(signal.SIGTERM, interrupt)
        return lambda: signal.signal(signal.SIGTERM,
                                     signal.SIG_DFL if previous is None else previous)

    def _log_start(self):
        if not self.is_main:
            return
        frozen = sum(p.numel() for p in self.model.clip_model.parameters() if not p.requires_grad)
        groups = ", ".join(f"{g['name']} ({sum(p.numel() for p in g['params'])} params, lr "
                           f"{g['initial_lr']:.2e}, wd {g['weight_decay']})"
                           for g in self.optimizer.param_groups)
        precision = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}
        start = (f"resuming after epoch {self.start_epoch} from {resume_path(self.config)}"
                 if self.start_epoch else "starting from scratch")
        log.info(f"stage 1 training of {self.config['name']}: {start}")
        log.info("resolved config:\n" + yaml.safe_dump(dict(self.config), sort_keys=False))
        log.info(f"device {self.device}, {self.world_size} process(es), precision "
                 f"{precision[self.amp_dtype]}, {len(self.identity_names)} identities, "
                 f"{self.iters_per_epoch} steps per epoch per process")
        log.info(f"optimizer AdamW: {groups}; frozen (text side): {frozen} params")

    def _plot_curves(self, handle):
        epochs = [row["epoch"] for row in self.history]
        figure = Figure(figsize=(10, 4))
        loss_axes, acc_axes = figure.subplots(1, 2)
        loss_axes.plot(epochs, [row["train_loss"] for row in self.history], marker="o")
        loss_axes.set(xlabel="epoch", ylabel="cross-entropy", title="training loss")
        acc_axes.plot(epochs, [row["train_acc"] for row in self.history], marker="o",
                      label="train")
        if any(row["val_acc"] is not None for row in self.history):
            acc_axes.plot(epochs, [row["val_acc"] for row in self.history], marker="o",
                          label="val")
        acc_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", ylim=(0, 100),
                     title="identity accuracy")
        acc_axes.legend()
        figure.suptitle(self.config["name"])
        figure.tight_layout()
        figure.savefig(handle, format="png", dpi=100)
