"""Statistics over results files: 95% intervals over splits (and training seeds) and paired
comparisons of two methods on the same splits.

Intervals are Student-t intervals, mean +- t(0.975, n-1) * s / sqrt(n), over the per-split
values a results JSON holds (per_split): they can be recomputed from the JSON alone, which a
bootstrap over queries could not (the JSON keeps no per-query results). Over several seeds the
values of all seeds x splits are pooled.
"""
from collections import defaultdict

import numpy as np
from scipy import stats

from handreid.core.errors import UserError

LEVEL = 0.95
# Metrics a paired comparison reports: rank-1 and both AP rules.
COMPARED = ("rank1", "mAP", "mAP_trapezoid")


def split_values(result, key):
    """The per-split values of `key` in one results dict; None when n/a on any split."""
    values = [row.get(key) for row in result["per_split"]]
    return None if any(value is None for value in values) else values


def t_interval(values):
    """(mean, lo, hi) of the 95% Student-t interval of the mean; lo = hi = None below two
    values."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return mean, None, None
    half = stats.t.ppf(0.5 + LEVEL / 2, len(values) - 1) * stats.sem(values)
    return mean, float(mean - half), float(mean + half)


def summarise_runs(results, key):
    """One metric over the results of one model per seed (a single result: one model) ->
    dict mean, std (over splits for one model, over the seeds' means for several), std_all
    (over seeds x splits; None for one model), lo, hi (95% t interval over the pooled
    values), seeds; None when the metric is n/a."""
    per_run = [split_values(result, key) for result in results]
    if any(values is None for values in per_run):
        return None
    pooled = [value for values in per_run for value in values]
    mean, lo, hi = t_interval(pooled)
    sample_std = (lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else None)
    if len(results) == 1:
        std, std_all = sample_std(pooled), None
    else:
        std, std_all = sample_std([float(np.mean(v)) for v in per_run]), sample_std(pooled)
    return {"mean": mean, "std": std, "std_all": std_all, "lo": lo, "hi": hi,
            "seeds": len(results)}


def protocol(result):
    """What must be equal for two results to be paired: dataset (with aspect), gallery rule,
    splits (data_dir and each split's query/gallery folders), flip rule and AP rule."""
    return {"dataset": result["dataset"], "gallery": result["gallery"],
            "data_dir": result["config"]["data_dir"],
            "splits": [(row["query"], row["gallery"]) for row in result["per_split"]],
            "flip": result["flip"], "ap_mode": result["ap_mode"]}


def check_same_protocol(named_results):
    """UserError naming the first setting in which the (name, result) pairs differ."""
    (first_name, first), *rest = named_results
    reference = protocol(first)
    for name, result in rest:
        for key, value in protocol(result).items():
            if value != reference[key]:
                shown = (f"{len(reference[key])} vs {len(value)} splits or other split folders"
                         if key == "splits" else f"{reference[key]!r} vs {value!r}")
                raise UserError(f"cannot pair {first_name} with {name}: different protocols "
                                f"({key}: {shown}); compare results of one protocol")


def _by_seed(results):
    grouped = defaultdict(list)
    for result in results:
        grouped[result["config"]["seed"]].append(result)
    return grouped


def pair_results(a, b):
    """[(result of A, result of B)] to pair split by split: by training seed, or each of one
    side's models with the other side's single model (e.g. a baseline needs no seeds)."""
    if len(a) == 1 or len(b) == 1:
        return [(x, y) for x in a for y in b]
    seeds_a, seeds_b = _by_seed(a), _by_seed(b)
    if sorted(seeds_a) != sorted(seeds_b) or any(len(v) > 1 for v in (*seeds_a.values(),
                                                                      *seeds_b.values())):
        raise UserError(f"cannot pair the two sides by seed: seeds {sorted(seeds_a)} vs "
                        f"{sorted(seeds_b)} (each seed once on each side); give the same seeds, "
                        f"or one model on one side")
    return [(seeds_a[seed][0], seeds_b[seed][0]) for seed in sorted(seeds_a)]


def paired_test(a, b):
    """A - B over pairs -> dict pairs, mean_diff, lo, hi (95% t interval of the mean
    difference), wilcoxon / wilcoxon_p (signed-rank), t / t_p (paired t-test), note. All
    differences zero: p = 1 and note 'no difference' (scipy's tests are undefined there)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    diff = a - b
    mean, lo, hi = t_interval(diff)
    out = {"pairs": len(diff), "mean_diff": mean, "lo": lo, "hi": hi}
    if np.all(diff == 0):
        return {**out, "wilcoxon": None, "wilcoxon_p": 1.0, "t": None, "t_p": 1.0,
                "note": "no difference"}
    wilcoxon, ttest = stats.wilcoxon(a, b), stats.ttest_rel(a, b)
    return {**out, "wilcoxon": float(wilcoxon.statistic), "wilcoxon_p": float(wilcoxon.pvalue),
            "t": float(ttest.statistic), "t_p": float(ttest.pvalue), "note": ""}


def compare(named_a, named_b):
    """Paired comparison of two sides, each a list of (name, results dict) -> {metric:
    paired_test dict} for COMPARED; UserError for different protocols or unpairable seeds."""
    check_same_protocol(named_a + named_b)
    pairs = pair_results([r for _, r in named_a], [r for _, r in named_b])
    report = {}
    for key in COMPARED:
        values = [(split_values(x, key), split_values(y, key)) for x, y in pairs]
        if any(x is None or y is None for x, y in values):
            continue
        report[key] = paired_test([v for x, _ in values for v in x],
                                  [v for _, y in values for v in y])
    return report


def format_comparison(report, label_a, label_b):
    """The comparison as a markdown table."""
    fmt = (lambda v, spec=".2f": "n/a" if v is None else format(v, spec))
    lines = [f"A = {label_a}\nB = {label_b}\n",
             "| metric | pairs | mean A - B | 95% interval | Wilcoxon W | p | paired t | p | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key, r in report.items():
        lines.append(f"| {key} | {r['pairs']} | {r['mean_diff']:+.2f} | [{fmt(r['lo'])}, "
                     f"{fmt(r['hi'])}] | {fmt(r['wilcoxon'], '.1f')} | "
                     f"{fmt(r['wilcoxon_p'], '.4g')} | {fmt(r['t'], '.3f')} | {fmt(r['t_p'], '.4g')} | {r['note']} |")
    lines.append("\npairs: one per split (and seed); percent points; 95% t interval of the "
                 "mean difference; two-sided Wilcoxon signed-rank (zero differences dropped) "
                 "and paired t-test (scipy).")
    return "\n".join(lines) + "\n"
