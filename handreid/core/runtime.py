"""What every entry point shares at run time: the device, the precision and its autocast,
torchrun / DistributedDataParallel setup, seeding, per-epoch seeds, GPU math settings, the
lock that keeps two runs from writing the same checkpoint, and the graceful stop on Ctrl-C.
"""
import contextlib
import fcntl
import os
import random
import signal
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from handreid.core.atomic_files import open_no_follow
from handreid.core.errors import ConfigError, UserError

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + grad scaler"}


# ---------------------------------------------------------------- device and precision

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


def autocast(device, dtype):
    """Mixed-precision context for `dtype` (None = plain fp32)."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def configure_backends(config, device):
    """GPU math settings: TF32 matmuls/convolutions (config tf32) and cuDNN autotuning, which
    pays off because every input has the same size."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = config["tf32"]
    torch.backends.cudnn.allow_tf32 = config["tf32"]
    torch.backends.cudnn.benchmark = True


# ---------------------------------------------------------------- torchrun

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


def distributed():
    return dist.is_available() and dist.is_initialized()


def rank_and_world():
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return (dist.get_rank(), dist.get_world_size()) if distributed() else (0, 1)


def is_main_process():
    """Rank 0, judged before or after the process group exists (RANK is set by torchrun)."""
    return (dist.get_rank() if distributed() else int(os.environ.get("RANK", 0))) == 0


# ---------------------------------------------------------------- seeding

def seed_everything(seed):
    """Seed python, numpy and torch (CPU and every GPU)."""
    seed %= 2 ** 32
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def epoch_seed(seed, epoch, rank):
    """A well-mixed 32-bit seed for one (run seed, epoch, rank)."""
    return int(np.random.SeedSequence([seed % 2 ** 64, epoch, rank]).generate_state(1)[0])


# ---------------------------------------------------------------- one run per checkpoint

def lock_path(save_path):
    return Path(f"{save_path}.lock")


def _open_lock(path, fix):
    """The lock file, created if missing, never through a symbolic link (open_no_follow)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.fdopen(open_no_follow(path, os.O_RDWR | os.O_CREAT, fix), "r+")


def _acquire(handle, save_path, doing, fix):
    """Take the lock on an open lock file without waiting; UserError naming its holder."""
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        raise UserError(f"{save_path} is being {doing} by {holder}; wait for it to finish or "
                        f"stop it, or {fix}") from None


@contextlib.contextmanager
def run_lock(save_path, doing="trained", fix="set another save_path"):
    """Hold an OS lock on <save_path>.lock while a run writes save_path. The kernel drops the
    lock when the process ends, however it ends, so a crash or kill -9 leaves no stale lock.
    UserError naming the holder (`save_path is being <doing> by ...; ... or <fix>`) when
    another process has it."""
    with _open_lock(lock_path(save_path), fix) as handle:
        _acquire(handle, save_path, doing, fix)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)})\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def check_not_running(save_path):
    """UserError if a run holds save_path's lock now (for callers about to start one)."""
    path = lock_path(save_path)
    if not path.exists():
        return
    with _open_lock(path, "set another save_path") as handle:
        _acquire(handle, save_path, "trained", "set another save_path")
        fcntl.flock(handle, fcntl.LOCK_UN)


# ---------------------------------------------------------------- graceful stop

class GracefulStop:
    """Within `with`: the first Ctrl-C / SIGTERM (a scheduler's stop, torchrun's shutdown)
    while `active` (inside a training epoch) sets `requested`, for the run to stop after the
    epoch; a second one, or one while not active, raises KeyboardInterrupt at once. Handlers
    are only set from the main thread; the old ones come back on exit."""

    def __init__(self, announce=True):
        self.announce, self.requested, self.active = announce, False, False
        self.previous = {}

    def _request(self, signum, frame):
        if self.requested or not self.active:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print(f"\nstopping after this epoch (it is saved then); "
                  f"{signal.Signals(signum).name} again stops at once", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self.previous = {sig: signal.signal(sig, self._request)
                             for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        return False
