"""Evaluate every eval config and print one summary table (baseline and fine-tuned side by side).

    python run_all_finetuned_stage1.py                       # the default configs below
    python run_all_finetuned_stage1.py --train               # first train missing checkpoints
    python run_all_finetuned_stage1.py --configs 'configs/demo/eval_*.yml' --train
    python run_all_finetuned_stage1.py --set num_splits=2    # an override for every config

Each config runs through experiments/run_eval_clip.py (in this process; its JSON, CSV row and
plots land in the config's results_dir). A failing config is reported with a one-line reason
and the rest still run; the exit code is 1 if any failed. With --train, a fine-tuned eval
config whose checkpoint is missing first runs its train config (eval_X.yml -> train_X.yml in
the same folder) in a subprocess, with the same --set overrides, through the train script of its
`method`: experiments/train_stage1_frozen_text.py (stage1), train_stage2_clipreid.py (clipreid)
or train_clip_handid.py (clip_handid). The table's method column says baseline, stage1,
clipreid (Stage 2) or clip_handid; it is written as
<out>.md and <out>.csv.

Features are shared across the configs of one invocation: an image is encoded once per model
(backbone and weights, or checkpoint file; flip rule, precision), so a backbone's baseline on
the four 11k aspects, whose galleries all hold the other aspects' test images, encodes each
image once. Each results JSON counts the images encoded fresh and taken from earlier configs.
"""
import csv
import glob
import io
import subprocess
import sys
import traceback
from pathlib import Path

import evaluation
from config import ArgumentParser, ConfigError, UserError, atomic_write_text, load_config, run_cli
from engine import needs_training
from experiments import run_eval_clip

ROOT = Path(__file__).resolve().parent
# config `method` -> the script that trains it
TRAIN_SCRIPTS = {"stage1": ROOT / "experiments/train_stage1_frozen_text.py",
                 "clipreid": ROOT / "experiments/train_stage2_clipreid.py",
                 "clip_handid": ROOT / "experiments/train_clip_handid.py"}
DEFAULT_CONFIGS = ["configs/baseline/eval_*.yml",
                   "configs/finetuning_stage1_frozen_text/eval_*.yml",
                   "configs/finetuning_stage2_clipreid/eval_*.yml",
                   "configs/finetuning_clip_handid/eval_*.yml"]
METRIC_COLUMNS = (("rank1", "rank-1"), ("rank5", "rank-5"), ("rank10", "rank-10"),
                  ("mAP", "mAP"), ("mAP_trapezoid", "mAP (trapezoid)"), ("eer", "EER"),
                  ("tar_at_far_1e-3", "TAR@FAR=1e-3"))


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="GLOB",
                        help="eval config files or glob patterns (default: %(default)s)")
    parser.add_argument("--train", action="store_true",
                        help="train the missing checkpoint of each fine-tuned config first")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key in every config; repeatable")
    parser.add_argument("--out", default="logs/results/summary",
                        help="summary table path without suffix (default: %(default)s)")
    return parser.parse_args(argv)


def find_configs(patterns):
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            print(f"note: no config matches {pattern}")
        paths += [Path(p) for p in matches if Path(p) not in paths]
    if not paths:
        raise ConfigError(f"no eval config found for {' '.join(patterns)}; pass --configs with "
                          f"YAML files or glob patterns")
    return paths


def train_missing(config_path, config, overrides):
    """Run the train config matching `config_path` when its checkpoint does not exist yet or
    its run is unfinished (it then resumes); refused while another process trains it."""
    if config["variant"] != "finetuned" or not needs_training(config):
        return
    train_config = config_path.with_name(config_path.name.replace("eval_", "train_", 1))
    if not config_path.name.startswith("eval_") or not train_config.is_file():
        raise UserError(f"checkpoint {config['save_path']} is missing and there is no train "
                        f"config {train_config} to make it")
    method = load_config(train_config, overrides)["method"]
    if method not in TRAIN_SCRIPTS:
        raise UserError(f"{train_config} says method: {method}, which no train script here "
                        f"trains (known: {', '.join(TRAIN_SCRIPTS)}); fix its method:")
    command = [sys.executable, str(TRAIN_SCRIPTS[method]), "--config", str(train_config)]
    for override in overrides:
        command += ["--set", override]
    print(f"\n=== training {train_config} (checkpoint {config['save_path']} is missing or its "
          f"run unfinished)", flush=True)
    code = subprocess.run(command).returncode
    if code != 0:
        raise UserError(f"training with {train_config} exited with code {code}")
    if not Path(config["save_path"]).is_file():
        raise UserError(f"training with {train_config} wrote no checkpoint at "
                        f"{config['save_path']}: the two configs' save_path differ")


def run_one(config_path, args, store):
    """Evaluate one config (training it first with --train) -> summary row. `store` carries
    features across configs: an image is encoded once per model in this run."""
    config = load_config(config_path, args.overrides)
    if args.train:
        train_missing(config_path, config, args.overrides)
    print(f"\n=== evaluating {config_path}", flush=True)
    result = run_eval_clip.evaluate_config(config, store)
    row = {"config": str(config_path), "model": config["model"], "dataset": result["dataset"],
           "variant": config["variant"], "flip": result["flip"],
           "rerank": "yes" if result["rerank"] else "no", "splits": result["num_splits"],
           "method": "baseline" if config["variant"] == "baseline" else config["method"]}
    for key, _ in METRIC_COLUMNS:
        row[key], row[f"{key}_std"] = result["mean"][key], result["std"][key]
    return row


def sort_key(row):
    # Same dataset and model next to each other: baseline, then Stage 1, then Stage 2.
    order = ("baseline", *TRAIN_SCRIPTS)
    rank = order.index(row["method"]) if row["method"] in order else len(order)
    return row["dataset"], row["model"], rank, row["config"]


def markdown_table(rows, failures):
    lines = ["| config | method | model | dataset | variant | flip | rerank | splits | "
             + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
             "|---" * (8 + len(METRIC_COLUMNS)) + "|"]
    for row in rows:
        cells = [row["config"], row["method"], row["model"], row["dataset"], row["variant"],
                 row["flip"], row["rerank"], str(row["splits"])]
        cells += ["n/a" if row[key] is None else f"{row[key]:.2f}" + (
            "" if row[f"{key}_std"] is None else f" ± {row[f'{key}_std']:.2f}")
            for key, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if rows:
        text += ("\nmean ± std over the splits (sample std, ddof=1), percent. mAP: "
                 "uninterpolated (torchreid / fast-reid); mAP (trapezoid): the MBA-Net / "
                 "CLIP-HandID rule. flip: sum is the published hand tables' test-time flip. "
                 "EER and TAR@FAR: verification over all query x gallery pairs.\n")
    if failures:
        text += "\nFailed:\n" + "".join(f"- {path}: {reason}\n" for path, reason in failures)
    return text


def csv_table(rows):
    fields = ["config", "method", "model", "dataset", "variant", "flip", "rerank", "splits"]
    fields += [name for key, _ in METRIC_COLUMNS for name in (key, f"{key}_std")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else round(v, 4) if isinstance(v, float) else v
                      for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def main(argv=None):
    args = parse_args(argv)
    load_config(None, args.overrides)  # a bad --set is one error, not one per config
    rows, failures, store = [], [], evaluation.FeatureStore()
    for config_path in find_configs(args.configs):
        try:
            rows.append(run_one(config_path, args, store))
        except UserError as err:
            failures.append((config_path, str(err)))
            print(f"error: {config_path}: {err}", file=sys.stderr)
        except Exception as err:  # a bug in one run must not cost the rest of the table
            traceback.print_exc()
            failures.append((config_path, f"{type(err).__name__}: {err}".splitlines()[0]))
    rows.sort(key=sort_key)
    table = markdown_table(rows, failures)
    print("\n" + table)
    out = Path(args.out)
    atomic_write_text(out.with_suffix(".md"), table)
    atomic_write_text(out.with_suffix(".csv"), csv_table(rows))
    print(f"summary: {out.with_suffix('.md')}, {out.with_suffix('.csv')}")
    if failures:
        print(f"{len(failures)} of {len(failures) + len(rows)} configs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
