"""Cost of the likelihood ratios: the evaluation of the synthetic protocol with the tiny model,
with likelihood_ratio off and on (two-fold calibration of every split, each calibrator), run
side by side in one process; each setting's best of --repeats runs.

    python benchmarks/bench_likelihood_ratio.py [--subjects 40] [--splits 10] [--repeats 3]
        [--out benchmarks/results/likelihood_ratio.md]
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
SETTINGS = (("off", False, "logistic"), ("logistic", True, "logistic"),
            ("isotonic", True, "isotonic"), ("kde", True, "kde"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--splits", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = torch.device("cpu")
    best, pairs = {}, None
    with tempfile.TemporaryDirectory() as folder:
        prepare_synthetic_11k(folder, args.subjects, args.splits)
        for _ in range(args.repeats):
            for label, on, kind in SETTINGS:  # interleaved: a load change hits all alike
                config = load_config(BASELINE_CONFIG, [
                    ("data_dir", folder), ("num_splits", args.splits), ("model", "tiny"),
                    ("pretrained", "none"), ("plots", False), ("likelihood_ratio", on),
                    ("lr_calibrator", kind)])
                torch.manual_seed(0)
                clip_model, _ = build_model(config)
                report = evaluate(HandIdModel(clip_model).to(device), config, device).report
                best[label] = min(best.get(label, float("inf")),
                                  report["timings"]["total_seconds"])
                if on:
                    pairs = report["per_split"][0]["num_lr_pairs"]
    rows = ["| likelihood ratios | evaluation s (best of %d) | added |" % args.repeats,
            "|---|---|---|"]
    for label, _, _ in SETTINGS:
        added = "" if label == "off" else f"{100 * (best[label] / best['off'] - 1):+.1f}%"
        rows.append(f"| {label} | {best[label]:.2f} | {added} |")
    text = "\n".join([f"Likelihood ratios: evaluation of synthetic 11k dorsal_r ({args.subjects} "
                      f"subjects, {args.splits} splits, {pairs} reported pairs in split 0), "
                      f"tiny model (random init), CPU, {torch.get_num_threads()} threads:", ""]
                     + rows)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n\n")


if __name__ == "__main__":
    main()
