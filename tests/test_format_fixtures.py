"""Checkpoints and resume states written by an earlier version (tests/fixtures/format_v2, commit
82f156b, tiny model, Ctrl-C mid-run) still evaluate and resume with the current code."""
import json
import shutil

import pytest
import torch

from conftest import ONE_THREAD, ROOT, run_script

pytestmark = pytest.mark.slow  # end to end (make test-slow)
FIXTURES = ROOT / "tests/fixtures/format_v2"
TRAIN = {"stage1": "experiments/train_stage1_frozen_text.py",
         "stage2": "experiments/train_stage2_clipreid.py"}
# (epoch kept in the resume state, epochs in all) as the fixture runs were stopped.
STOPPED = {"stage1": (2, 3), "stage2": (4, 5)}


def copied_run(name, tmp_path):
    """The fixture's checkpoint and resume state copied into a fresh run folder."""
    run = tmp_path / name
    run.mkdir()
    for suffix in (".pth", ".resume.pth"):
        shutil.copy(FIXTURES / f"{name}{suffix}", run / f"{name}{suffix}")
    return run


def outputs(run, name, prepared_11k):
    return ["--set", f"data_dir={prepared_11k}", "--set", f"save_path={run / name}.pth",
            "--set", f"log_path={run / name}.log", "--set", f"results_dir={run / 'results'}"]


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_an_earlier_checkpoint_evaluates(name, prepared_11k, tmp_path):
    run = copied_run(name, tmp_path)
    run_script("experiments/run_eval_clip.py", "--config", FIXTURES / f"train_{name}.yml",
               "--set", "variant=finetuned", *outputs(run, name, prepared_11k))
    results = list((run / "results").rglob("*.json"))
    assert results, "no results file written"
    report = json.loads(results[0].read_text())
    assert report["checkpoint"]["epoch"] == STOPPED[name][0]


@pytest.mark.parametrize("name", ["stage1", "stage2"])
def test_an_earlier_resume_state_resumes_to_the_end(name, prepared_11k, tmp_path):
    run = copied_run(name, tmp_path)
    kept, total = STOPPED[name]
    proc = run_script(TRAIN[name], "--config", FIXTURES / f"train_{name}.yml",
                      *outputs(run, name, prepared_11k), env=ONE_THREAD)
    assert f"resuming after epoch {kept}" in proc.stdout + proc.stderr
    state = torch.load(run / f"{name}.resume.pth", weights_only=True)
    assert state["finished"] and state["epoch"] == total
    # The metrics file is written from the history the resume state carries.
    rows = [json.loads(line) for line in (run / f"{name}_metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == list(range(1, total + 1))
