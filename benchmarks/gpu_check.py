"""GPU check, no network: model step throughput and peak memory, real training runs (data
wait, checkpoint time), evaluation speed and a timed mini results table, one summary block.

    python benchmarks/gpu_check.py            # on the CUDA GPU
    python benchmarks/gpu_check.py --compile  # also the compile: true rows
    python benchmarks/gpu_check.py --cpu      # the same steps, small, on the CPU (tiny model)

1. benchmarks/bench_train.py: ViT-B/16 and RN50 (random init, the real architectures) at
   batch 64 with bf16 autocast: images/s of the training step and peak GPU memory, as
   configured by default and with each speed option (tf32, channels_last for RN50, and
   compile with --compile);
2. synthetic 11k (four aspects) and HD, made and prepared by the project's scripts;
3. the whole results table on them, timed: run_all_finetuned_stage1.py --train over the
   baseline and fine-tuning eval configs of every model and dataset, with random-init weights
   (`pretrained: none`) and a few epochs: times only, the metrics mean nothing. Each training
   run's metrics JSONL gives its images/s, the share of step time spent waiting for data and
   the checkpoint seconds per epoch;
4. benchmarks/bench_eval.py: evaluation images/s (ViT-B/16), 1 split against 10.
A failing step is reported (with the tail of its log) and the others still run; the exit
code is then 1. Everything runs in a temporary folder that is removed at the end.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handreid.core.startup import start

start()

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_CONFIGS = ("configs/baseline/eval_*.yml", "configs/finetuning_*/eval_*.yml")
METRIC_FIELDS = ("images_per_s", "data_time_fraction", "checkpoint_seconds", "epoch_time")


def settings(cpu, compile_rows):
    """What each step runs: the full check on the GPU, a small one on the CPU."""
    if cpu:
        return {"device": "cpu", "benches": [(["tiny"], ["default", "channels_last=true"])],
                "batch": 16, "amp": "fp32", "steps": 2,
                "eval_model": "tiny", "subjects": 24, "images_per_aspect": 5, "epochs": 2,
                # The tiny ViT has 2 blocks and no layer4: CLIP-ReID's block-11 triplet
                # feature and RN50 stride of the Stage-2 / CLIP-HandID recipes are turned off.
                "table_overrides": ["model=tiny", "num_splits=2", "batch_size=16",
                                    "num_workers=0", "resnet_last_stride=2",
                                    "triplet_intermediate_layer=null"],
                "note": ", tiny model for every config"}
    compiled = ["compile=true"] if compile_rows else []
    return {"device": "cuda",
            "benches": [(["vitb16"], ["default", "tf32=true", *compiled]),
                        (["rn50"], ["default", "channels_last=true", "tf32=true", *compiled])],
            "batch": 64, "amp": "bf16", "steps": 12, "eval_model": "vitb16", "subjects": 60,
            "images_per_aspect": 10, "epochs": 3, "table_overrides": ["num_workers=8"],
            "note": ""}


class Steps:
    """Runs the check's scripts with this interpreter, each into its own log; remembers the
    failures instead of stopping."""

    def __init__(self, log_dir):
        self.log_dir, self.failures = log_dir, []

    def run(self, name, command, cwd=ROOT):
        """-> wall seconds, or None if the script failed (its log tail is printed)."""
        log = self.log_dir / f"{name}.log"
        started = time.perf_counter()
        with open(log, "w") as handle:
            code = subprocess.run([sys.executable, *map(str, command)], cwd=cwd,
                                  stdout=handle, stderr=subprocess.STDOUT).returncode
        if code == 0:
            return time.perf_counter() - started
        print("\n".join(log.read_text().splitlines()[-30:]), file=sys.stderr)
        self.failures.append(f"{name}: {Path(command[0]).name} exited with code {code}")
        return None


def make_datasets(steps, work, subjects, images_per_aspect):
    """Synthetic raw 11k and HD where the configs' default data_dir expects them (relative
    to `work`, the working directory of the results table), prepared in place."""
    for raw_format, folder, prepare in (("11k", "11khands", "prepare_11k.py"),
                                        ("hd", "HD", "prepare_hd.py")):
        raw = work / "datasets" / folder
        steps.run(f"make_{raw_format}", [
            ROOT / "datasets/make_synthetic_hands.py", "--format", raw_format, "--out", raw,
            "--subjects", subjects, "--images-per-aspect", images_per_aspect])
        steps.run(f"prepare_{raw_format}", [ROOT / "datasets" / prepare, "--raw", raw])


def training_rows(work):
    """One table row per training run of the results table, from its metrics JSONL: the mean
    over epochs after the first (warm-up, cache building) where there are several."""
    rows = ["| training run | epochs | images/s | data wait share | checkpoint s/epoch | "
            "epoch s |", "|---|---|---|---|---|---|"]
    for path in sorted((work / "logs").rglob("*_metrics.jsonl")):
        epochs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        later = epochs[1:] or epochs
        cells = []
        for field in METRIC_FIELDS:
            values = [row[field] for row in later if row.get(field) is not None]
            cells.append(f"{sum(values) / len(values):.2f}" if values else "n/a")
        rows.append(f"| {path.name[:-len('_metrics.jsonl')]} | {len(epochs)} | "
                    + " | ".join(cells) + " |")
    return rows


def read(path):
    return path.read_text().strip() if path.is_file() else f"({path.name}: not produced)"


def device_line(device):
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("gpu_check: no CUDA device; run with --cpu for the small CPU check")
        props = torch.cuda.get_device_properties(0)
        return (f"device: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
                f"torch {torch.__version__}, CUDA {torch.version.cuda}")
    return f"device: CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="small check on the CPU with the tiny model (no GPU needed)")
    parser.add_argument("--compile", action="store_true",
                        help="also measure compile: true (its compilation time comes on top)")
    args = parser.parse_args()
    plan = settings(args.cpu, args.compile)
    header = device_line(plan["device"])
    print(header, flush=True)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as folder:
        work = Path(folder)
        steps = Steps(work)
        print("1/4 training step throughput", flush=True)
        train_tables = []
        for number, (models, options) in enumerate(plan["benches"]):
            out = work / f"train{number}.md"
            steps.run(f"bench_train{number}", [
                ROOT / "benchmarks/bench_train.py", "--device", plan["device"], "--models",
                *models, "--batch-sizes", plan["batch"], "--amp", plan["amp"], "--steps",
                plan["steps"], "--options", *options, "--out", out])
            train_tables.append(read(out))
        print("2/4 synthetic 11k and HD", flush=True)
        make_datasets(steps, work, plan["subjects"], plan["images_per_aspect"])
        print("3/4 results table (train + evaluate every config)", flush=True)
        overrides = ["pretrained=none", f"epochs={plan['epochs']}", "warmup_epochs=1",
                     f"device={plan['device']}", "plots=false", *plan["table_overrides"]]
        table_seconds = steps.run("results_table", [
            ROOT / "run_all_finetuned_stage1.py", "--train", "--configs",
            *(ROOT / pattern for pattern in RESULTS_CONFIGS), "--out", work / "summary",
            *(word for item in overrides for word in ("--set", item))], cwd=work)
        summary_md = work / "summary.md"
        configs = (sum(1 for line in summary_md.read_text().splitlines()
                       if line.startswith("| ") and "/" in line)
                   if summary_md.is_file() else 0)
        print("4/4 evaluation speed", flush=True)
        steps.run("bench_eval", [ROOT / "benchmarks/bench_eval.py", "--device", plan["device"],
                                 "--model", plan["eval_model"], "--out", work / "eval.md"])
        table = (f"{table_seconds:.0f} s wall" if table_seconds is not None
                 else f"failed ({configs} configs evaluated)")
        summary = [
            "", "==================== GPU CHECK SUMMARY ====================", header, "",
            "\n\n".join(train_tables), "",
            f"Results table on synthetic data ({configs} eval configs, each fine-tuned one "
            f"trained first, {plan['epochs']} epochs, random init{plan['note']}: times "
            f"only): {table}", "",
            *training_rows(work), "",
            read(work / "eval.md"), "",
            *(f"FAILED {failure}" for failure in steps.failures),
            f"total: {time.perf_counter() - started:.0f} s",
            "============================================================"]
    print("\n".join(summary))
    return 1 if steps.failures else 0


if __name__ == "__main__":
    sys.exit(main())
