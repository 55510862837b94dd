"""Checkpoint I/O of a training run: bytes written and seconds spent saving, the first
release's scheme against the engine's, side by side in one run.

new: the real engine (Stage 1, default save settings: save_every 10 epochs, best checkpoint
     written at save points and at the end, resume states without the frozen text tower);
     bytes are every byte the process passed to write() during the run (`wchar` of
     /proc/self/io: checkpoints, resume states, logs, metrics), seconds the engine's own
     `checkpoint_seconds`.
old: the first release wrote, after every epoch, the best checkpoint whenever val accuracy
     did not drop (>=, so nearly every epoch once it saturates) and a resume state with the
     full CLIP state_dict, head, optimizer, scheduler and scaler. The benchmark replays exactly
     those writes with the same model and optimizer state after the run, epoch by epoch, using
     the run's own val accuracies.

Random images in memory (batch_size x steps per epoch) and random-initialised backbones (no
download), so the numbers are the I/O of the scheme, not of the data.

    python benchmarks/bench_checkpoint_io.py [--models tiny vitb16] [--epochs 20]
        [--out benchmarks/results/checkpoint_io.md]
"""
import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from handreid.core.startup import start

start()

ROOT = Path(__file__).resolve().parents[1]

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from handreid.model import backbone
from handreid.core.config_files import load_config
from handreid.core.atomic_files import atomic_write, atomic_write_text
from finetune_trainer_stage1 import FinetuneTrainerStage1

NUM_CLASSES = 8
# Per model: (batch size, steps per epoch) small enough for a CPU, as "a few images".
SIZES = {"tiny": (16, 2), "vitb16": (2, 1)}


def written_bytes():
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise RuntimeError("this benchmark needs Linux's /proc/self/io")


def loaders(config, steps):
    side = backbone.preprocess_spec(config)["image_size"]
    count = steps * config["batch_size"]
    generator = torch.Generator().manual_seed(0)
    dataset = TensorDataset(torch.randn(count, 3, side, side, generator=generator),
                            torch.arange(count) % NUM_CLASSES)
    dataset.classes = [f"id{i}" for i in range(NUM_CLASSES)]
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=0)
    train = DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler,
                       generator=torch.Generator(), drop_last=True)
    val = DataLoader(dataset, batch_size=config["batch_size"])
    return train, val


def new_scheme(config, steps):
    """-> (trainer, summary, bytes written, seconds saving) of a real engine run."""
    train, val = loaders(config, steps)
    clip_model, classifier = backbone.build_model(config, NUM_CLASSES)
    trainer = FinetuneTrainerStage1(clip_model, classifier, train, config, "cpu", val,
                                    overwrite=True)
    before = written_bytes()
    with contextlib.redirect_stderr(io.StringIO()):
        summary = trainer.train()
    total = written_bytes() - before
    return trainer, summary, total, sum(row["checkpoint_seconds"] for row in summary["history"])


def old_scheme(trainer, summary, folder):
    """Replay the first release's writes for every epoch of `summary`'s run."""
    model, config = trainer.model, trainer.config
    best, total, seconds = None, 0, 0.0
    for row in summary["history"]:
        before, started = written_bytes(), time.perf_counter()
        if best is None or row["val_acc"] >= best:
            best = row["val_acc"]
            trainer.method.save_checkpoint(folder / "old.pth", row["epoch"])
        state = {"format": "clip-handid-stage1-resume", "format_version": 1,
                 "config": dict(config), "history": summary["history"], "epoch": row["epoch"],
                 "finished": row["epoch"] == config["epochs"]}
        if not state["finished"]:
            state.update(clip_state_dict=model.clip_model.state_dict(),
                         classifier_state_dict=model.extras["classifier"].state_dict(),
                         optimizer=trainer.optimizer.state_dict(),
                         scheduler=trainer.scheduler.state_dict(),
                         scaler=trainer.scaler.state_dict())
        atomic_write(folder / "old.resume.pth", lambda f: torch.save(state, f))
        seconds += time.perf_counter() - started
        total += written_bytes() - before
    return total, seconds


def measure(model, epochs, folder):
    batch_size, steps = SIZES.get(model, (2, 1))
    config = load_config(None, [
        ("model", model), ("pretrained", "none"), ("batch_size", batch_size),
        ("epochs", epochs), ("warmup_epochs", 1), ("lr", 1e-4), ("num_workers", 0),
        ("augment_on", "loader"),  # the random images are already float tensors
        ("device", "cpu"), ("save_path", str(folder / f"{model}.pth")),
        ("log_path", str(folder / f"{model}.log"))])
    trainer, summary, new_bytes, new_seconds = new_scheme(config, steps)
    final = Path(config["save_path"]).stat().st_size
    old_bytes, old_seconds = old_scheme(trainer, summary, folder)
    return [(model, "old (first release)", old_bytes, old_bytes / final, old_seconds, epochs),
            (model, "new (engine defaults)", new_bytes, new_bytes / final, new_seconds, epochs),
            final]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vitb16"])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the table to this .md file")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    lines = ["## Checkpoint I/O per training run", "",
             f"`python benchmarks/bench_checkpoint_io.py --models {' '.join(args.models)} "
             f"--epochs {args.epochs}` (CPU, random-init weights; bytes = everything the "
             f"process wrote)", "",
             "| model | scheme | final checkpoint | bytes written | x final checkpoint | "
             "seconds saving | per epoch |", "|---|---|---|---|---|---|---|"]
    for model in args.models:
        with tempfile.TemporaryDirectory() as folder:
            *rows, final = measure(model, args.epochs, Path(folder))
        for name, scheme, total, ratio, seconds, epochs in rows:
            lines.append(f"| {name} | {scheme} | {final / 2**20:.1f} MiB | "
                         f"{total / 2**20:.1f} MiB | {ratio:.1f}x | {seconds:.2f} s | "
                         f"{seconds / epochs:.3f} s |")
        print("\n".join(lines[-2:]), flush=True)
    text = "\n".join(lines) + "\n"
    print("\n" + text)
    if args.out:
        atomic_write_text(args.out, text)


if __name__ == "__main__":
    main()
