"""Paired comparison of two methods on the same splits (and training seeds).

    python experiments/compare_results.py A.json --vs B.json
    python experiments/compare_results.py A_seed0.json A_seed1.json --vs B_seed0.json B_seed1.json

A and B are results files of experiments/run_eval_clip.py (or run_all_finetuned_stage1.py):
one per trained model. For rank-1, mAP and mAP (trapezoid) it prints the mean difference
A - B over the pairs (one per split, and per seed), its 95% t interval, the Wilcoxon
signed-rank test and the paired t-test (scipy) with their p-values and the number of pairs.
Results are paired by split and by the config's seed; a side with a single model (e.g. the
baseline) is paired with every model of the other. Results of different protocols (dataset,
aspect, gallery rule, splits, flip rule, AP rule) are refused.
"""
import json
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import ArgumentParser
from handreid.core.errors import run_cli, UserError
from handreid.core.atomic_files import atomic_write_text
from handreid.evaluation import result_stats


def read_result(path):
    """A results JSON -> dict; UserError when it is missing or not a results file."""
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read results file {path} ({type(err).__name__}); give the "
                        f"<name>_<variant>.json an evaluation wrote") from None
    if not isinstance(result, dict) or "per_split" not in result or "config" not in result:
        raise UserError(f"{path} is not a results file (no per_split / config); give the "
                        f"<name>_<variant>.json an evaluation wrote")
    return result


def main(argv=None):
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", nargs="+", metavar="A.json", help="results files of method A")
    parser.add_argument("--vs", nargs="+", required=True, metavar="B.json",
                        help="results files of method B")
    parser.add_argument("--out", help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    side_a = [(path, read_result(path)) for path in args.a]
    side_b = [(path, read_result(path)) for path in args.vs]
    report = result_stats.compare(side_a, side_b)
    table = result_stats.format_comparison(report, " ".join(args.a), " ".join(args.vs))
    print(table)
    if args.out:
        atomic_write_text(Path(args.out), table)
    return 0


if __name__ == "__main__":
    run_cli(main)
