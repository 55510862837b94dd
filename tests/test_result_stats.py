"""Training seeds, 95% intervals and paired comparisons: run_all_finetuned_stage1.py --seeds,
result_stats, experiments/compare_results.py."""
import csv
import json

import numpy as np
import pytest
import torch
from scipy import stats

from handreid.evaluation import result_stats
from handreid.core.errors import UserError
from conftest import run_script, write_experiment
from experiments import compare_results

COMPARE = "experiments/compare_results.py"
RUN_ALL = "run_all_finetuned_stage1.py"


@pytest.fixture(scope="module")
def seeded(prepared_11k, tmp_path_factory):
    """A batch with --train --seeds 0 1 (2 splits, 1 epoch): a fine-tuned config, a second
    eval config of the same checkpoints (flip: sum) and a baseline."""
    folder = tmp_path_factory.mktemp("seeds")
    write_experiment(folder, prepared_11k)
    for name in ("eval", "train"):
        text = (folder / f"{name}_tiny.yml").read_text()
        if name == "eval":
            text = text.replace("name: tiny\n", "name: tiny_flip\n") + "flip: sum\n"
        (folder / f"{name}_tiny_flip.yml").write_text(text)
    proc = run_script(RUN_ALL, "--configs", folder / "eval_*.yml", "--train", "--seeds", "0",
                      "1", "--set", "num_splits=2", "--set", "epochs=1", "--set",
                      f"results_dir={folder / 'results'}", "--out", folder / "summary")
    with (folder / "summary.csv").open() as handle:
        rows = {row["config"].split("/")[-1]: row for row in csv.DictReader(handle)}
    return folder, proc, rows


def results(folder, name):
    return json.loads((folder / "results" / f"{name}.json").read_text())


@pytest.mark.slow
def test_one_model_per_seed_trained_once_and_summarised(seeded):
    folder, proc, rows = seeded
    # Two seeds -> two checkpoints with different weights; the flip config reused them.
    assert proc.stdout.count("=== training") == 2
    assert "with seed 0" in proc.stdout and "with seed 1" in proc.stdout
    first, second = (torch.load(folder / f"tiny_seed{s}.pth", weights_only=True)
                     for s in (0, 1))
    assert any(not torch.equal(first["clip_state_dict"][k], second["clip_state_dict"][k])
               for k in first["clip_state_dict"])
    assert (folder / "logs/train_seed0.log").is_file() and not (folder / "tiny.pth").exists()
    runs = [results(folder, f"tiny_seed{s}_finetuned") for s in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1]
    row = rows["eval_tiny.yml"]
    assert row["seeds"] == "0 1" and rows["eval_baseline_tiny.yml"]["seeds"] == ""
    for key in ("rank1", "mAP", "mAP_trapezoid"):
        per_seed = [[s[key] for s in r["per_split"]] for r in runs]
        pooled = np.array(per_seed).ravel()
        assert float(row[key]) == pytest.approx(pooled.mean(), abs=1e-4)
        assert float(row[f"{key}_std"]) == pytest.approx(
            np.std([np.mean(v) for v in per_seed], ddof=1), abs=1e-4)
        assert float(row[f"{key}_std_seeds_splits"]) == pytest.approx(np.std(pooled, ddof=1),
                                                                      abs=1e-4)
        half = stats.t.ppf(0.975, 3) * np.std(pooled, ddof=1) / np.sqrt(4)
        assert float(row[f"{key}_ci_lo"]) == pytest.approx(pooled.mean() - half, abs=1e-4)
        assert float(row[f"{key}_ci_hi"]) == pytest.approx(pooled.mean() + half, abs=1e-4)
    # One model: the interval is over its splits.
    base, baseline = rows["eval_baseline_tiny.yml"], results(folder, "baseline_tiny_baseline")
    values = [s["rank1"] for s in baseline["per_split"]]
    half = stats.t.ppf(0.975, 1) * np.std(values, ddof=1) / np.sqrt(2)
    assert float(base["rank1_ci_lo"]) == pytest.approx(np.mean(values) - half, abs=1e-4)
    assert base["rank1_std_seeds_splits"] == ""
    table = (folder / "summary.md").read_text()
    assert "std of the seeds' means" in table and "| 0 1 |" in table
    assert f"{float(row['rank1']):.2f} ± {float(row['rank1_std']):.2f} (± " in table


@pytest.mark.slow
def test_paired_comparison_equals_scipy(seeded):
    folder, _, _ = seeded
    side_a = [folder / f"results/tiny_seed{s}_finetuned.json" for s in (0, 1)]
    side_b = folder / "results/baseline_tiny_baseline.json"
    out = folder / "compare.md"
    proc = run_script(COMPARE, *side_a, "--vs", side_b, "--out", out)
    a = [v for path in side_a for v in
         (s["mAP"] for s in json.loads(path.read_text())["per_split"])]
    b = [s["mAP"] for s in json.loads(side_b.read_text())["per_split"]] * 2
    line = next(line for line in proc.stdout.splitlines() if line.startswith("| mAP |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    diff = np.subtract(a, b)
    assert cells[1] == "4" and float(cells[2]) == pytest.approx(diff.mean(), abs=0.006)
    if np.all(diff == 0):
        assert cells[8] == "no difference"
    else:
        wilcoxon, ttest = stats.wilcoxon(a, b), stats.ttest_rel(a, b)
        assert float(cells[5]) == pytest.approx(wilcoxon.pvalue, rel=1e-3)
        assert float(cells[6]) == pytest.approx(ttest.statistic, abs=1e-3)
        assert float(cells[7]) == pytest.approx(ttest.pvalue, rel=1e-3)
    assert out.read_text() in proc.stdout


def test_result_stats_paired_test_is_scipys():
    a, b = [50.0, 61.0, 47.5, 70.0, 55.0], [48.0, 60.0, 49.0, 64.0, 51.5]
    report = result_stats.paired_test(a, b)
    assert report["pairs"] == 5
    assert report["wilcoxon"] == stats.wilcoxon(a, b).statistic
    assert report["wilcoxon_p"] == stats.wilcoxon(a, b).pvalue
    assert report["t"] == stats.ttest_rel(a, b).statistic
    assert report["t_p"] == stats.ttest_rel(a, b).pvalue
    low, high = stats.t.interval(0.95, 4, loc=np.mean(np.subtract(a, b)),
                                 scale=stats.sem(np.subtract(a, b)))
    assert (report["lo"], report["hi"]) == pytest.approx((low, high))


@pytest.mark.slow
def test_self_comparison_and_refused_protocols(seeded):
    folder, _, _ = seeded
    path = folder / "results/tiny_seed0_finetuned.json"
    proc = run_script(COMPARE, path, "--vs", path)
    for key in ("rank1", "mAP", "mAP_trapezoid"):
        line = next(l for l in proc.stdout.splitlines() if l.startswith(f"| {key} |"))
        assert "| +0.00 | [0.00, 0.00] |" in line and "no difference" in line
        assert "| 1 |" in line
    # The flip: sum config of the same checkpoint is another protocol.
    flipped = folder / "results/tiny_seed0_finetuned.json"
    other = folder / "results/tiny_flip_seed0_finetuned.json"
    proc = run_script(COMPARE, flipped, "--vs", other, check=False)
    assert proc.returncode == UserError.exit_code and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: cannot pair {flipped} with {other}: different protocols (flip: 'off' vs "
        f"'sum'); compare results of one protocol"]
    for key, value in (("ap_mode", "trapezoid"), ("dataset", "hd"), ("gallery", "x")):
        changed = json.loads(path.read_text())
        changed[key] = value
        (folder / "changed.json").write_text(json.dumps(changed))
        with pytest.raises(UserError, match=rf"different protocols \({key}: "):
            compare_results.main([str(path), "--vs", str(folder / "changed.json")])
    changed = json.loads(path.read_text())
    changed["config"]["data_dir"] = "/elsewhere"
    (folder / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(UserError, match=r"different protocols \(data_dir: "):
        compare_results.main([str(path), "--vs", str(folder / "changed.json")])
    with pytest.raises(UserError, match="cannot read results file"):
        compare_results.main([str(path), "--vs", str(folder / "summary.md")])
