"""Evaluate every eval config and print one summary table (baseline and fine-tuned side by side).

    python run_all_finetuned_stage1.py                       # the default configs below
    python run_all_finetuned_stage1.py --train               # first train missing checkpoints
    python run_all_finetuned_stage1.py --configs 'configs/demo/eval_*.yml' --train
    python run_all_finetuned_stage1.py --set num_splits=2    # an override for every config
    python run_all_finetuned_stage1.py --train --seeds 0 1 2 # one model per training seed

Each config is evaluated in this process by handreid.evaluation.evaluate.evaluate_config, the
evaluation experiments/run_eval_clip.py runs (its JSON, CSV row and plots land in the config's
results_dir). A failing config is reported with a one-line reason
and the rest still run; the exit code is 1 if any failed. With --train, a fine-tuned eval
config whose checkpoint is missing first runs its train config (eval_X.yml -> train_X.yml in
the same folder) in a subprocess, with the same --set overrides, through the train script of its
`method` (the registry's): experiments/train_stage1_frozen_text.py (stage1),
train_stage2_clipreid.py (clipreid), train_clip_handid.py (clip_handid), or experiments/train.py
for a method file.
Ctrl-C is passed on to a training child: it finishes its epoch and saves (the same command
then resumes it); a second Ctrl-C stops it at once. A --configs pattern that matches nothing
is an error. With --seeds (or a config's seeds:), a fine-tuned config is trained and
evaluated once per seed (save_path, log and results name get _seed<N>) and its row holds
mean ± std over seeds, the std over seeds x splits and a 95% t interval (result_stats.py).
The table's method column says baseline, stage1, clipreid (Stage 2) or clip_handid; it is written as <out>.md and <out>.csv.

Features are shared across the configs of one invocation: an image is encoded once per model
(backbone and weights, or checkpoint file; flip rule, precision), so a backbone's baseline on
the four 11k aspects, whose galleries all hold the other aspects' test images, encodes each
image once. Each results JSON counts the images encoded fresh and taken from earlier configs.
"""
import csv
import glob
import io
import signal
import subprocess
import sys
import traceback
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core import registry
from handreid.evaluation import protocol
from handreid.evaluation import result_stats
from handreid.core.config_files import ArgumentParser, config_text, load_config, resolve_config
from handreid.core.errors import check_writable, ConfigError, run_cli, UserError
from handreid.core.atomic_files import atomic_write_text
from handreid.train.checkpointing import needs_training
from handreid.core.runtime import check_not_running
from handreid.evaluation.evaluate import evaluate_config

ROOT = Path(__file__).resolve().parent
# The summary table's order of the methods of one dataset and model; other methods go last.
METHOD_ORDER = ("baseline", "stage1", "clipreid", "clip_handid")
DEFAULT_CONFIGS = ["configs/baseline/eval_*.yml",
                   # the default recipe (CLIP-ReID's), not the named _seed/_clipfh recipes
                   "configs/finetuning_stage1_frozen_text/eval_*_[lr].yml",
                   "configs/finetuning_stage1_frozen_text/eval_*_hd.yml",
                   "configs/finetuning_stage2_clipreid/eval_*.yml",
                   "configs/finetuning_clip_handid/eval_*.yml"]
METRIC_COLUMNS = (("rank1", "rank-1"), ("rank5", "rank-5"), ("rank10", "rank-10"),
                  ("mAP", "mAP"), ("mAP_trapezoid", "mAP (trapezoid)"), ("eer", "EER"),
                  ("tar_at_far_1e-3", "TAR@FAR=1e-3"), ("cllr", "Cllr"))


def parse_args(argv):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, metavar="GLOB",
                        help="eval config files or glob patterns (default: %(default)s)")
    parser.add_argument("--train", action="store_true",
                        help="train the missing checkpoint of each fine-tuned config first")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a key in every config; repeatable")
    parser.add_argument("--seeds", nargs="+", type=int, metavar="N",
                        help="one model per training seed for each fine-tuned config (own "
                             "save_path, log and results: <stem>_seed<N>); overrides seeds:")
    parser.add_argument("--out", default="logs/results/summary",
                        help="summary table path without suffix (default: %(default)s)")
    parser.add_argument("--print-config", action="store_true",
                        help="print each config resolved, each key with the file or --set it "
                             "came from, and stop")
    return parser.parse_args(argv)


def find_configs(patterns):
    paths = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise ConfigError(f"no config matches {pattern}; check the path or glob pattern "
                              f"given to --configs")
        paths += [Path(p) for p in matches if Path(p) not in paths]
    return paths


def seed_overrides(config, seed):
    """Overrides giving `config`'s run with training seed `seed` its own checkpoint, log and
    results names, derived from the resolved ones: <stem>_seed<N>."""
    save, log = Path(config["save_path"]), Path(config["log_path"])
    return [f"seed={seed}", f"name={config['name']}_seed{seed}",
            f"save_path={save.with_name(f'{save.stem}_seed{seed}{save.suffix}')}",
            f"log_path={log.with_name(f'{log.stem}_seed{seed}{log.suffix}')}"]


def run_child(command):
    """Run `command` in its own process group -> its exit code. A Ctrl-C (or SIGTERM) here
    is passed on: the first lets a training finish its epoch and save (then this run stops
    too), a second stops it at once; the child is never killed for the first."""
    child = subprocess.Popen(command, process_group=0)
    stops = []

    def forward(signum, frame):
        stops.append(signum)
        if len(stops) > 2:
            child.kill()
        else:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stops:
        raise KeyboardInterrupt
    return code


def train_missing(config_path, config, overrides, seed):
    """Run the train config matching `config_path` (with training seed `seed`, or its own
    when None) when its checkpoint does not exist yet or its run is unfinished (it then
    resumes); refused while another process trains it."""
    if config["variant"] != "finetuned":
        return
    train_config = config_path.with_name(config_path.name.replace("eval_", "train_", 1))
    if not config_path.name.startswith("eval_") or not train_config.is_file():
        check_not_running(config["save_path"])  # never evaluate a run while it trains
        if Path(config["save_path"]).is_file():
            return
        raise UserError(f"checkpoint {config['save_path']} is missing and there is no train "
                        f"config {train_config} to make it")
    train = load_config(train_config, overrides)
    if seed is not None:
        overrides = overrides + seed_overrides(train, seed)
        train = load_config(train_config, overrides)
    if Path(train["save_path"]) != Path(config["save_path"]):
        raise UserError(f"{train_config} trains {train['save_path']} but {config_path} "
                        f"evaluates {config['save_path']}: set the same save_path in both")
    if not needs_training(train):  # the resume state is checked against the train config
        return
    command = [sys.executable, str(ROOT / registry.load(train["method"]).train_script),
               "--config", str(train_config)]
    for override in overrides:
        command += ["--set", override]
    print(f"\n=== training {train_config}" + ("" if seed is None else f" with seed {seed}")
          + f" (checkpoint {config['save_path']} is missing or its run unfinished)", flush=True)
    code = run_child(command)
    if code != 0:
        raise UserError(f"training with {train_config} exited with code {code}")
    if not Path(config["save_path"]).is_file():
        raise UserError(f"training with {train_config} wrote no checkpoint at "
                        f"{config['save_path']}")


def run_seed(config_path, args, store, seed):
    """Train (with --train) and evaluate one model of `config_path` -> its results dict."""
    overrides = list(args.overrides)
    if seed is not None:
        overrides += seed_overrides(load_config(config_path, overrides), seed)
    config = load_config(config_path, overrides)
    if args.train:
        train_missing(config_path, config, list(args.overrides), seed)
    print(f"\n=== evaluating {config_path}" + ("" if seed is None else f" (seed {seed})"),
          flush=True)
    return evaluate_config(config, store)


def run_one(config_path, args, store):
    """Evaluate one config (training it first with --train; one model per seed for a
    fine-tuned config with seeds) -> summary row. `store` carries features across configs:
    an image is encoded once per model in this run."""
    config = load_config(config_path, args.overrides)
    seeds = args.seeds if args.seeds is not None else config["seeds"]
    if seeds is not None and any(not isinstance(s, int) for s in seeds):
        raise UserError(f"seeds must be whole numbers, got {seeds}; fix seeds: or --seeds")
    seeds = sorted(set(seeds)) if seeds and config["variant"] == "finetuned" else [None]
    results = [run_seed(config_path, args, store, seed) for seed in seeds]
    result = results[0]
    row = {"config": str(config_path), "model": config["model"], "dataset": result["dataset"],
           "variant": config["variant"], "flip": result["flip"],
           "rerank": "yes" if result["rerank"] else "no", "splits": result["num_splits"],
           "seeds": "" if seeds == [None] else " ".join(map(str, seeds)),
           "method": "baseline" if config["variant"] == "baseline" else config["method"]}
    for key, _ in METRIC_COLUMNS:
        stats = result_stats.summarise_runs(results, key) or {}
        if len(results) == 1:  # the results file's own mean and std
            stats.update(mean=result["mean"].get(key), std=result["std"].get(key))
        for suffix, name in (("", "mean"), ("_std", "std"), ("_std_seeds_splits", "std_all"),
                             ("_ci_lo", "lo"), ("_ci_hi", "hi")):
            row[key + suffix] = stats.get(name)
    return row


def sort_key(row):
    # Same dataset and model next to each other: baseline, then Stage 1, then Stage 2.
    rank = METHOD_ORDER.index(row["method"]) if row["method"] in METHOD_ORDER \
        else len(METHOD_ORDER)
    return row["dataset"], row["model"], rank, row["config"]


def metric_cell(row, key):
    """mean ± std [lo, hi]; with seeds mean ± std over seeds (± std over seeds x splits)."""
    if row[key] is None:
        return "n/a"
    cell = f"{row[key]:.2f}"
    if row[f"{key}_std"] is not None:
        cell += f" ± {row[f'{key}_std']:.2f}"
    if row[f"{key}_std_seeds_splits"] is not None:
        cell += f" (± {row[f'{key}_std_seeds_splits']:.2f})"
    if row[f"{key}_ci_lo"] is not None:
        cell += f" [{row[f'{key}_ci_lo']:.2f}, {row[f'{key}_ci_hi']:.2f}]"
    return cell


def same_as_baseline(rows):
    """(fine-tuned config, baseline config) pairs of one model and dataset whose every metric
    is equal: the fine-tuning did not change what is ranked (lr 0, a warmup longer than the
    training, the baseline's weights saved as the checkpoint)."""
    def measured(row):
        return [row[key] for key, _ in METRIC_COLUMNS if row[key] is not None]
    baselines = [row for row in rows if row["variant"] == "baseline"]
    return [(row["config"], base["config"]) for row in rows if row["variant"] == "finetuned"
            for base in baselines
            if (base["model"], base["dataset"], base["flip"], base["rerank"]) ==
            (row["model"], row["dataset"], row["flip"], row["rerank"])
            and measured(row) and measured(row) == measured(base)]


def markdown_table(rows, failures):
    lines = ["| config | method | model | dataset | variant | flip | rerank | splits | seeds | "
             + " | ".join(label for _, label in METRIC_COLUMNS) + " |",
             "|---" * (9 + len(METRIC_COLUMNS)) + "|"]
    for row in rows:
        cells = [row["config"], row["method"], row["model"], row["dataset"], row["variant"],
                 row["flip"], row["rerank"], str(row["splits"]), row["seeds"] or "-"]
        cells += [metric_cell(row, key) for key, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if rows:
        text += ("\nmean ± std [95% interval], percent. One model (seeds -): std over its "
                 "splits (sample std, ddof=1). Several seeds: mean over seeds x splits ± std "
                 "of the seeds' means (training variance) (± std over all seeds x splits). "
                 "Interval: Student-t 95% interval of the mean over the splits (over all seeds "
                 "x splits with seeds). mAP: "
                 "uninterpolated (torchreid / fast-reid); mAP (trapezoid): the MBA-Net / "
                 "CLIP-HandID rule; mINP (in the results files) equals mAP when each "
                 "gallery holds one image per identity (one true match a query), as in these "
                 "protocols. flip: sum is the published hand tables' test-time flip. "
                 "EER and TAR@FAR: verification over all query x gallery pairs. Cllr (bits, "
                 "not percent): of the calibrated likelihood ratios, with likelihood_ratio: "
                 "true.\n")
    for tuned, base in same_as_baseline(rows):
        text += (f"\nWarning: {tuned} evaluates exactly as the baseline {base} (every metric "
                 f"equal): its training did not change the features; check lr, warmup_epochs "
                 f"against epochs, and that save_path is the trained checkpoint.\n")
    if failures:
        text += "\nFailed:\n" + "".join(f"- {path}: {reason}\n" for path, reason in failures)
    return text


def csv_table(rows):
    fields = ["config", "method", "model", "dataset", "variant", "flip", "rerank", "splits",
              "seeds"]
    fields += [key + suffix for key, _ in METRIC_COLUMNS
               for suffix in ("", "_std", "_std_seeds_splits", "_ci_lo", "_ci_hi")]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else round(v, 4) if isinstance(v, float) else v
                      for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def main(argv=None):
    args = parse_args(argv)
    load_config(None, args.overrides)  # a bad --set is one error, not one per config
    if args.print_config:
        for config_path in find_configs(args.configs):
            print(f"# {config_path}\n{config_text(*resolve_config(config_path, args.overrides))}")
        return
    check_writable(Path(args.out).with_suffix(".md"))  # before the first evaluation
    rows, failures, store = [], [], protocol.FeatureStore()
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
    for tuned, base in same_as_baseline(rows):
        print(f"warning: {tuned} evaluates exactly as the baseline {base}; see the summary",
              file=sys.stderr)
    table = markdown_table(rows, failures)
    print(f"\n{'=' * 32} the table {'=' * 32}\n\n{table}")
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
