"""Training throughput (images/s) of the Stage-1 trainer by model, batch size and precision.

The real FinetuneTrainerStage1 step (autocast, grad scaler, AdamW over the image encoder and
head) on random in-memory images of the model's input size, so the number is the model's
speed, not the disk's (benchmarks/bench_data_path.py measures the loader). Models are random
initialised with the real architectures (no download). Epoch 1 is warm-up (and compiles
with compile=true); the figure is epoch 2's images/s. On CUDA it also reports peak GPU memory.
--options measures config overrides side by side: each item is `default` or comma-separated
key=value pairs, e.g. `default tf32=true channels_last=true compile=true`.

    python benchmarks/bench_train.py [--models tiny vitb16] [--batch-sizes 16] [--amp fp32 bf16]
        [--steps 3] [--device cpu|cuda] [--options default ...] [--out benchmarks/results/train.md]
"""
import argparse
import contextlib
import io
import resource
import tempfile
import time
from pathlib import Path

from handreid.core.startup import start

start()

ROOT = Path(__file__).resolve().parents[1]

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from handreid.core.config_files import load_config, parse_override
from handreid.core.errors import run_cli
from handreid.core.atomic_files import atomic_write_text
from finetune_trainer_stage1 import FinetuneTrainerStage1
from handreid.model.backbone import build_model, preprocess_spec
from handreid.core.runtime import configure_backends

NUM_CLASSES = 100


def random_loader(config, steps):
    """`steps` batches of random images and labels, shaped like the real train loader."""
    side = preprocess_spec(config)["image_size"]
    count = steps * config["batch_size"]
    dataset = TensorDataset(torch.randn(count, 3, side, side),
                            torch.randint(0, NUM_CLASSES, (count,)))
    dataset.classes = [str(i) for i in range(NUM_CLASSES)]
    generator = torch.Generator()
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, seed=0)
    return DataLoader(dataset, batch_size=config["batch_size"], sampler=sampler,
                      generator=generator, drop_last=True)


def option_overrides(option):
    """'default' -> []; 'compile=true,tf32=true' -> [("compile", True), ("tf32", True)]."""
    return [] if option == "default" else [parse_override(item) for item in option.split(",")]


def measure(model, batch_size, amp, steps, device, option, workdir):
    config = load_config(None, [
        ("model", model), ("pretrained", "none"), ("batch_size", batch_size), ("amp", amp),
        ("epochs", 2), ("warmup_epochs", 0), ("device", device), ("augment_on", "loader"),
        ("save_path", f"{workdir}/{model}.pth"), ("log_path", f"{workdir}/{model}.log"),
        *option_overrides(option)])
    configure_backends(config, torch.device(device))
    clip_model, classifier = build_model(config, NUM_CLASSES)
    trainer = FinetuneTrainerStage1(clip_model, classifier, random_loader(config, steps),
                                    config, device, overwrite=True)
    if trainer.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(trainer.device)
    with contextlib.redirect_stderr(io.StringIO()):
        summary = trainer.train()
    peak = (f"{torch.cuda.max_memory_allocated(trainer.device) / 2**30:.1f} GiB"
            if trainer.device.type == "cuda"
            else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS")
    return summary["history"][-1]["images_per_s"], peak


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "vitb16"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16])
    parser.add_argument("--amp", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=3, help="training steps per epoch")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", nargs="+", default=["default"],
                        help="config overrides to compare: 'default' or key=value[,key=value]")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device_name = (torch.cuda.get_device_name() if args.device.startswith("cuda")
                   else f"CPU, {torch.get_num_threads()} threads")
    for option in args.options:
        load_config(None, option_overrides(option))  # a bad option fails before any run
    exit_code = 0
    rows = ["| model | batch | precision | options | images/s | peak memory |",
            "|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as workdir:
        for model in args.models:
            for batch_size in args.batch_sizes:
                for amp in args.amp:
                    for option in args.options:
                        started = time.perf_counter()
                        try:
                            rate, peak = measure(model, batch_size, amp, args.steps,
                                                 args.device, option,
                                                 f"{workdir}/run{len(rows)}")
                            result = f"{rate:.1f} | {peak}"
                        # One option failing (e.g. compile without a C compiler, out of
                        # memory) must not cost the other rows; the row says why.
                        except Exception as err:
                            reason = f"{type(err).__name__}: {err}".splitlines()[0][:120]
                            result = f"failed: {reason.replace('|', '/')} | -"
                            exit_code = 1
                            if torch.cuda.is_available():
                                torch.cuda.empty_cache()
                        rows.append(f"| {model} | {batch_size} | {amp} | {option} | {result} |")
                        print(rows[-1], f"({time.perf_counter() - started:.0f} s)", flush=True)
    text = "\n".join([f"Training throughput on {device_name} (random init, random images, "
                      f"{args.steps} steps per epoch, epoch 2):", ""] + rows)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n\n")
    return exit_code


if __name__ == "__main__":
    run_cli(main)
