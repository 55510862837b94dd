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
Ctrl-C (SIGTERM, SIGHUP) is passed on to a training child: it finishes its epoch and saves
(the same command then resumes it); a second one stops it at once. The child ends with this
process (Linux: a parent-death signal): a kill -9 of the batch leaves no training behind,
and the same command resumes it from its last save point. A --configs pattern that matches nothing
is an error. With --seeds (or a config's seeds:), a fine-tuned config is trained and
evaluated once per seed (save_path, log and results name get _seed<N>) and its row holds
mean ± std over seeds, the std over seeds x splits and a 95% t interval (result_stats.py).
The table's method column says baseline, stage1, clipreid (Stage 2) or clip_handid; its note
column says "unfinished (epoch k of n)" for the checkpoint of a run that has not finished. It is
written as <out>.md and <out>.csv; where a summary with more rows is there, it stays and this
one goes beside it as <out>.<time>.md / .csv (a warning says so).

Features are shared across the configs of one invocation: an image is encoded once per model
(backbone and weights, or checkpoint file; flip rule, precision), so a backbone's baseline on
the four 11k aspects, whose galleries all hold the other aspects' test images, encodes each
image once. Each results JSON counts the images encoded fresh and taken from earlier configs.
"""
import csv
import ctypes
import glob
import io
import os
import signal
import subprocess
import sys
import time
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
PR_SET_PDEATHSIG = 1  # linux/prctl.h
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


def end_with_parent(parent):
    """In the child, before it runs (Linux): the kernel sends SIGKILL to this process when its
    parent dies, however it dies (kill -9 included), so no training is orphaned holding its
    run lock; the run resumes from its last save point when the batch is run again."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0 or os.getppid() != parent:
        os._exit(1)  # no parent-death signal, or the parent already died before it was set


def run_child(command):
    """Run `command` in its own process group -> its exit code. A Ctrl-C, SIGTERM or SIGHUP
    (the terminal closed) here is passed on: the first lets a training finish its epoch and
    save (then this run stops too), a second stops it at once; the child is never killed for
    the first. The child ends with this process (end_with_parent): a kill -9 of the batch
    ends its training too. Its own group keeps a terminal's Ctrl-C from reaching it twice."""
    parent = os.getpid()
    child = subprocess.Popen(command, process_group=0, preexec_fn=(
        (lambda: end_with_parent(parent)) if sys.platform.startswith("linux") else None))
    stops = []

    def forward(signum, frame):
        stops.append(signum)
        if len(stops) > 2:
            child.kill()
        else:  # SIGHUP as SIGTERM: the training's graceful stop knows that one
            child.send_signal(signal.SIGTERM if signum == signal.SIGHUP else signum)

    previous = {sig: signal.signal(sig, forward)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
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
           "method": "baseline" if config["variant"] == "baseline" else config["method"],
           "note": unfinished_notes(results, seeds),
           # a collapsed model or one training identity: flagged, the numbers kept
           "warnings": list(dict.fromkeys(w for r in results for w in r["warnings"]))}
    for key, _ in METRIC_COLUMNS:
        stats = result_stats.summarise_runs(results, key) or {}
        if len(results) == 1:  # the results file's own mean and std
            stats.update(mean=result["mean"].get(key), std=result["std"].get(key))
        for suffix, name in (("", "mean"), ("_std", "std"), ("_std_seeds_splits", "std_all"),
                             ("_ci_lo", "lo"), ("_ci_hi", "hi")):
            row[key + suffix] = stats.get(name)
    return row


def unfinished_notes(results, seeds):
    """'unfinished (epoch k of n)' for each evaluated checkpoint whose run has not finished
    (with seeds: per seed), '' when every run finished."""
    notes = [(seed, (result["checkpoint"] or {}).get("unfinished"))
             for seed, result in zip(seeds, results)]
    return "; ".join(("" if seed is None else f"seed {seed}: ") + f"unfinished ({note})"
                     for seed, note in notes if note)


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
    # The note column is there when a row has one (an unfinished run's checkpoint).
    noted = any(row["note"] for row in rows)
    lines = ["| config | method | model | dataset | variant | flip | rerank | splits | seeds | "
             + " | ".join(label for _, label in METRIC_COLUMNS) + (" | note" if noted else "")
             + " |", "|---" * (9 + len(METRIC_COLUMNS) + noted) + "|"]
    for row in rows:
        cells = [row["config"] + (" (warning)" if row["warnings"] else ""), row["method"],
                 row["model"], row["dataset"], row["variant"],
                 row["flip"], row["rerank"], str(row["splits"]), row["seeds"] or "-"]
        cells += [metric_cell(row, key) for key, _ in METRIC_COLUMNS]
        cells += [row["note"] or "-"] if noted else []
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
    if noted:
        text += ("\nunfinished (epoch k of n): the checkpoint of a run that stopped after k of "
                 "its n epochs (its resume state says so); the same train command resumes it.\n")
    for tuned, base in same_as_baseline(rows):
        text += (f"\nWarning: {tuned} evaluates exactly as the baseline {base} (every metric "
                 f"equal): its training did not change the features; check lr, warmup_epochs "
                 f"against epochs, and that save_path is the trained checkpoint.\n")
    for row in rows:
        text += "".join(f"\nWarning: {row['config']}: {warning}\n"
                        for warning in row["warnings"])
    if failures:
        text += "\nFailed:\n" + "".join(f"- {path}: {reason}\n" for path, reason in failures)
    return text


def csv_table(rows):
    fields = ["config", "method", "model", "dataset", "variant", "flip", "rerank", "splits",
              "seeds"]
    fields += [key + suffix for key, _ in METRIC_COLUMNS
               for suffix in ("", "_std", "_std_seeds_splits", "_ci_lo", "_ci_hi")]
    fields.append("note")
    fields.append("warnings")
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else round(v, 4) if isinstance(v, float) else
                      " | ".join(v) if isinstance(v, list) else v
                      for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def summary_rows(out):
    """How many rows the summary at `out` holds now: the larger count of its .md and .csv
    (0 for files that are not there or do not parse)."""
    counts = [0]
    try:
        lines = out.with_suffix(".md").read_text().splitlines()
        counts.append(max(0, sum(line.startswith("| ") for line in lines) - 1))  # - header
    except (OSError, UnicodeDecodeError):
        pass
    try:
        with out.with_suffix(".csv").open(newline="") as handle:
            counts.append(sum(1 for _ in csv.DictReader(handle)))
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return max(counts)


def write_summary(out, table, csv_text, rows):
    """Write the table as <out>.md and <out>.csv -> their paths. A summary there with more rows
    (an earlier, fuller run) is never replaced by this one: it goes beside it as
    <out>.<time>.md / .csv, and a warning says so."""
    md, csv_path = out.with_suffix(".md"), out.with_suffix(".csv")
    earlier = summary_rows(out)
    if rows < earlier:
        stamp, n = time.strftime("%Y%m%d-%H%M%S"), 0
        beside = [md.with_name(f"{md.stem}.{stamp}{suffix}") for suffix in (".md", ".csv")]
        while any(path.exists() for path in beside):
            n += 1
            beside = [md.with_name(f"{md.stem}.{stamp}-{n}{suffix}") for suffix in (".md", ".csv")]
        print(f"warning: {md} holds {earlier} rows and this run has {rows}: kept it, this "
              f"table goes to {beside[0]} and {beside[1]}", file=sys.stderr)
        md, csv_path = beside
    atomic_write_text(md, table)
    atomic_write_text(csv_path, csv_text)
    return md, csv_path


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
    md, csv_path = write_summary(Path(args.out), table, csv_table(rows), len(rows))
    print(f"summary: {md}, {csv_path}")
    if failures:
        print(f"{len(failures)} of {len(failures) + len(rows)} configs failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    run_cli(main)
