"""run_all_finetuned_stage1.py: the batch runner over eval configs, --train, failures."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import run_all_finetuned_stage1
from handreid.core.config_files import load_config
from handreid.evaluation.evaluate import evaluate_config
from handreid.core.runtime import check_not_running
from conftest import ONE_THREAD, ROOT, run_script, write_config, write_experiment

SCRIPT = "run_all_finetuned_stage1.py"


def test_train_missing_checkpoint_and_continue_past_a_broken_config(prepared_11k, tmp_path):
    write_experiment(tmp_path, prepared_11k)
    (tmp_path / "eval_broken.yml").write_text("model: tiny\nnum_split: 2\n")
    results, out = tmp_path / "results", tmp_path / "summary"
    proc = run_script(SCRIPT, "--configs", tmp_path / "eval_*.yml", "--train", "--set",
                      "num_splits=2", "--set", "epochs=1", "--set", f"results_dir={results}",
                      "--out", out, check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{tmp_path / 'eval_broken.yml'}: " in proc.stderr
    assert "unknown key 'num_split'" in proc.stderr
    assert "1 of 3 configs failed" in proc.stderr
    # The checkpoint was trained (one epoch) from train_tiny.yml, then evaluated.
    assert f"=== training {tmp_path / 'train_tiny.yml'}" in proc.stdout
    assert (tmp_path / "tiny.pth").is_file()
    finetuned = json.loads((results / "tiny_finetuned.json").read_text())
    assert finetuned["checkpoint"]["epoch"] == 1 and finetuned["num_splits"] == 2
    # The table still holds the good configs, baseline before fine-tuned.
    table = out.with_suffix(".md").read_text()
    assert table in proc.stdout
    assert "eval_broken.yml: " in table.split("Failed:")[1]
    with out.with_suffix(".csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["variant"], r["dataset"], r["splits"]) for r in rows] == \
        [("baseline", "11k/dorsal_r", "2"), ("finetuned", "11k/dorsal_r", "2")]
    assert float(rows[1]["rank1"]) == round(finetuned["mean"]["rank1"], 4)
    assert float(rows[1]["mAP_std"]) == round(finetuned["std"]["mAP"], 4)


def test_existing_checkpoint_is_not_retrained(make_config, tmp_path, capsys, tiny_checkpoint):
    """--train leaves an existing checkpoint alone; a clean batch exits 0."""
    config = make_config()
    write_experiment(tmp_path, config["data_dir"])
    tiny_checkpoint(config, tmp_path / "tiny.pth")
    before = (tmp_path / "tiny.pth").stat().st_mtime_ns
    code = run_all_finetuned_stage1.main([
        "--configs", str(tmp_path / "eval_tiny.yml"), "--train", "--set", "num_splits=1",
        "--set", f"results_dir={tmp_path / 'results'}", "--out", str(tmp_path / "summary")])
    assert code == 0 and (tmp_path / "tiny.pth").stat().st_mtime_ns == before
    output = capsys.readouterr().out
    assert "=== training" not in output
    assert "| tiny | 11k/dorsal_r | finetuned | off | no | 1 |" in output


def test_shipped_eval_configs_match_their_train_and_baseline_twins():
    """--train maps eval_X.yml to train_X.yml: both must name the same model and checkpoint;
    every fine-tuned experiment has a baseline beside it."""
    # The default Stage-1 recipe's configs, which run_all_finetuned_stage1.py runs by default.
    stage1 = ("configs/finetuning_stage1_frozen_text/eval_*_[lr].yml",
              "configs/finetuning_stage1_frozen_text/eval_*_hd.yml")
    finetuned = sorted(path for pattern in stage1 for path in ROOT.glob(pattern))
    assert len(finetuned) == 10
    pairs = [(path, ROOT / "configs/baseline" / path.name) for path in finetuned]
    pairs.append((ROOT / "configs/demo/eval_tiny_11k_dorsal_r.yml",
                  ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"))
    data = ("dataset", "aspect", "data_dir", "model", "pretrained")
    model = data + ("name", "head", "image_size", "save_path")
    for path, baseline_path in pairs:
        config, baseline = load_config(path), load_config(baseline_path)
        train = load_config(path.with_name(path.name.replace("eval_", "train_", 1)))
        assert config["variant"] == "finetuned" and baseline["variant"] == "baseline"
        assert {k: config[k] for k in model} == {k: train[k] for k in model}, path.name
        assert {k: baseline[k] for k in data} == {k: config[k] for k in data}, path.name
        assert baseline["name"].startswith("baseline_")


def test_an_image_is_encoded_once_per_model_across_configs(prepared_11k, tmp_path):
    """Two baseline configs of one model on two 11k aspects: their gallery{i}_all share the
    test images of all aspects, so the second config encodes only what the first did not,
    and its metrics equal a standalone run's."""
    common = (f"variant: baseline\nmodel: tiny\ndata_dir: {prepared_11k}\nnum_workers: 0\n"
              f"plots: false\nnum_splits: 2\nflip: sum\nresults_dir: {tmp_path / 'results'}\n")
    for aspect in ("dorsal_r", "dorsal_l"):
        (tmp_path / f"eval_{aspect}.yml").write_text(f"name: {aspect}\naspect: {aspect}\n"
                                                     f"{common}")
    code = run_all_finetuned_stage1.main([
        "--configs", str(tmp_path / "eval_dorsal_r.yml"), str(tmp_path / "eval_dorsal_l.yml"),
        "--out", str(tmp_path / "summary")])
    assert code == 0
    first, second = (json.loads((tmp_path / f"results/{aspect}_baseline.json").read_text())
                     for aspect in ("dorsal_r", "dorsal_l"))
    assert first["counts"]["images_from_store"] == 0
    assert first["counts"]["images_encoded"] == 2 * first["counts"]["unique_images"]  # flip
    counts = second["counts"]
    assert counts["images_from_store"] > 0
    assert counts["images_from_store"] + counts["images_encoded"] // 2 == counts["unique_images"]
    alone = evaluate_config(load_config(
        tmp_path / "eval_dorsal_l.yml", [("results_dir", str(tmp_path / "alone"))]))
    assert alone["counts"]["images_from_store"] == 0
    for row, expected in zip(second["per_split"], alone["per_split"]):
        for key in ("rank1", "mAP", "mAP_trapezoid", "mINP", "eer"):
            assert row[key] == pytest.approx(expected[key], abs=1e-4), key
    table = (tmp_path / "summary.md").read_text()
    assert "| flip | rerank |" in table and "| sum | no |" in table
    assert "mAP (trapezoid) | EER | TAR@FAR=1e-3 |" in table


def start_batch(folder, *extra):
    """run_all --train --seeds 0 1 on the tiny experiment in `folder`, in its own process
    group (a terminal's Ctrl-C goes to the whole group), one thread."""
    command = [sys.executable, str(ROOT / SCRIPT), "--configs", str(folder / "eval_tiny.yml"),
               "--train", "--seeds", "0", "1", "--set", "num_splits=1", "--set", "epochs=3",
               "--set", "save_every=1", "--set", f"results_dir={folder / 'results'}",
               "--out", str(folder / "summary"), *extra]
    log = open(folder / f"batch{len(list(folder.glob('batch*.out')))}.out", "w")
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            text=True, env=ONE_THREAD, start_new_session=True), Path(log.name)


def wait_for_epoch(folder, seed, epochs, proc):
    metrics = folder / f"logs/train_seed{seed}_metrics.jsonl"
    deadline = time.monotonic() + 240
    while not metrics.is_file() or len(metrics.read_text().splitlines()) < epochs:
        assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


@pytest.mark.slow
def test_ctrl_c_under_train_saves_and_the_same_command_resumes(prepared_11k, tmp_path):
    """SIGINT to the runner's process group mid-training: the child finishes its epoch and
    saves, seed 1 is not started; the same command resumes seed 0 (it says so; its resume
    state is checked against train_tiny.yml, whose lr and warmup differ from the eval
    config's), then trains seed 1, and seed 0 ends with the checkpoint of an uninterrupted
    run."""
    write_experiment(tmp_path, prepared_11k)
    proc, out = start_batch(tmp_path)
    wait_for_epoch(tmp_path, 0, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=240) == 130
    text = out.read_text()
    assert "interrupted" in text
    state = torch.load(tmp_path / "tiny_seed0.resume.pth", weights_only=True)
    assert not state["finished"] and 1 <= state["epoch"] < 3
    assert not (tmp_path / "tiny_seed1.pth").exists()

    proc, out = start_batch(tmp_path)
    assert proc.wait(timeout=400) == 0, out.read_text()[-3000:]
    text = out.read_text()
    assert f"resuming after epoch {state['epoch']}" in text
    assert text.count("=== training") == 2 and "with seed 1" in text
    reference = tmp_path / "reference.pth"
    subprocess.run([sys.executable, str(ROOT / "experiments/train_stage1_frozen_text.py"),
                    "--config", str(tmp_path / "train_tiny.yml"), "--set", "epochs=3",
                    "--set", "seed=0", "--set", f"save_path={reference}", "--set",
                    f"log_path={tmp_path / 'logs/reference.log'}"], cwd=ROOT, env=ONE_THREAD,
                   check=True, capture_output=True)
    ours = torch.load(tmp_path / "tiny_seed0.pth", weights_only=True)
    theirs = torch.load(reference, weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    assert all(torch.equal(ours["clip_state_dict"][k], theirs["clip_state_dict"][k])
               for k in theirs["clip_state_dict"])


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once(prepared_11k, tmp_path):
    write_experiment(tmp_path, prepared_11k)
    proc, out = start_batch(tmp_path, "--set", "epochs=40")
    wait_for_epoch(tmp_path, 0, 1, proc)
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + 60
    while "stopping after this epoch" not in out.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, out.read_text()[-2000:]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=20) == 130
    check_not_running(tmp_path / "tiny_seed0.pth")  # the training child is gone too
    assert not torch.load(tmp_path / "tiny_seed0.resume.pth", weights_only=True)["finished"]


def test_a_configs_pattern_that_matches_nothing_is_an_error(tmp_path):
    proc = run_script(SCRIPT, "--configs", "configs/nosuch.yml", "--out", tmp_path / "s",
                      check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: no config matches configs/nosuch.yml; check the path or glob pattern given to "
        "--configs"]
    assert not (tmp_path / "s.md").exists()


def test_a_fine_tuned_model_that_ranks_as_the_baseline_is_flagged(make_config, tmp_path, capsys,
                                                                  tiny_checkpoint):
    # The "checkpoint" holds the same random-init weights as the seed-1 baseline: every metric
    # is equal, which a real fine-tuning never gives.
    config = make_config(seed=1, num_splits=2, plots=False, results_dir=str(tmp_path / "r"))
    tiny_checkpoint(config, config["save_path"])
    write_config(config, tmp_path / "eval_tuned.yml")
    write_config({**config, "variant": "baseline"}, tmp_path / "eval_base.yml")
    code = run_all_finetuned_stage1.main(["--configs", str(tmp_path / "eval_*.yml"),
                                          "--out", str(tmp_path / "summary")])
    assert code == 0
    table = (tmp_path / "summary.md").read_text()
    assert f"Warning: {tmp_path / 'eval_tuned.yml'} evaluates exactly as the baseline" in table
    assert "evaluates exactly as the baseline" in capsys.readouterr().err
