"""Evaluation protocol cost: 1 split against 10 splits on the same prepared synthetic 11k
data and model, with the number of images listed by the splits and the number encoded
(each unique image once).

    python benchmarks/bench_eval.py [--model tiny|vitb16] [--device cpu|cuda]
        [--subjects 40] [--out benchmarks/results/eval.md]
"""
import argparse
import tempfile
from pathlib import Path

from handreid.core.startup import start

start()

ROOT = Path(__file__).resolve().parents[1]

import torch

from handreid.core.config_files import load_config
from handreid.core.atomic_files import atomic_write_text
from handreid.evaluation.protocol import evaluate
from handreid.model.backbone import HandIdModel, build_model
from synthetic_data import prepare_synthetic_11k

BASELINE_CONFIG = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = ["| splits | images listed | images encoded | encode s | encode img/s | metrics s "
            "| total s |", "|---|---|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        prepare_synthetic_11k(folder, args.subjects, 10)
        for num_splits in (1, 10):
            config = load_config(BASELINE_CONFIG, [
                ("data_dir", folder), ("num_splits", num_splits), ("model", args.model),
                ("pretrained", "none"), ("plots", False)])
            torch.manual_seed(0)
            clip_model, _ = build_model(config)
            report = evaluate(HandIdModel(clip_model).to(device), config, device).report
            counts, times = report["counts"], report["timings"]
            rows.append(f"| {num_splits} | {counts['images_listed']} | "
                        f"{counts['images_encoded']} | {times['encode_seconds']:.2f} | "
                        f"{counts['images_encoded'] / times['encode_seconds']:.0f} | "
                        f"{times['metrics_seconds']:.2f} | {times['total_seconds']:.2f} |")
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    text = "\n".join([f"Evaluation protocol, {args.model} (random init) on synthetic 11k "
                      f"dorsal_r vs gallery{{i}}_all, {where}:", ""] + rows)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n\n")


if __name__ == "__main__":
    main()
