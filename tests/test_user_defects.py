"""What a new user hit (issue 29), through the scripts' main() and the documented functions:
checkpoints of two datasets with one folder name never collide and a checkpoint is refused on
test identities it was trained on; runs that differ only in save_path never share a log, and a
log in use is refused; run_all never replaces a fuller summary; a finished run whose checkpoint
is gone or corrupt gets the same advice from evaluation and training; an unfinished run's
checkpoint is noted as such; degenerate training settings are warned about."""
import csv
import json
import os
from pathlib import Path

import pytest
import torch

import run_all_finetuned_stage1
from experiments import run_eval_clip
from handreid.checkpoint import model_checkpoint
from handreid.core.config_files import load_config
from handreid.core.errors import UserError
from handreid.core.runtime import run_lock
from handreid.methods.stage1 import Stage1
from handreid.train.checkpointing import needs_training, read_resume_state, resume_path
from handreid.train.entry import train_main
from conftest import (DEMO_TRAIN_CONFIG, ROOT, InterruptedLoader, build, run_script,
                      write_config, write_experiment)
from finetune_trainer_stage1 import FinetuneTrainerStage1

DEMO_EVAL_CONFIG = ROOT / "configs/demo/eval_tiny_11k_dorsal_r.yml"
SMALL = ["epochs=1", "warmup_epochs=0", "batch_size=16", "num_splits=1", "plots=false"]
pytestmark = pytest.mark.usefixtures("one_thread")


def sets(*items):
    return [word for item in items for word in ("--set", str(item))]


def train(*items):
    """The Stage-1 train script's main() on the demo train config with --set `items`."""
    return train_main(Stage1, "", ["--config", str(DEMO_TRAIN_CONFIG), *sets(*items)])


def evaluate(*items):
    run_eval_clip.main(["--config", str(DEMO_EVAL_CONFIG), *sets(*items)])


@pytest.fixture(scope="module")
def identity_tree(synthetic_11k_raw, tmp_path_factory):
    """The synthetic dorsal right images as <root>/<identity>/<images> (links)."""
    root = tmp_path_factory.mktemp("people") / "hands"
    with (synthetic_11k_raw / "HandInfo.csv").open() as handle:
        for row in csv.DictReader(handle):
            if row["aspectOfHand"] == "dorsal right" and row["accessories"] == "0":
                folder = root / row["id"].strip()
                folder.mkdir(parents=True, exist_ok=True)
                os.symlink(synthetic_11k_raw / "Hands" / row["imageName"],
                           folder / row["imageName"])
    return root


@pytest.fixture(scope="module")
def two_minis(identity_tree, tmp_path_factory):
    """Two datasets both called `mini` (/a/mini, /b/mini): the same people split with two
    seeds, so b's test identities include some of a's training identities."""
    base = tmp_path_factory.mktemp("two")
    for name, seed in (("a", 0), ("b", 1)):
        run_script("datasets/prepare_folder.py", "--raw", identity_tree, "--out",
                   base / name / "mini", "--seed", seed, "--num-splits", 1)
    return base / "a" / "mini", base / "b" / "mini"


def folder_data(data_dir):
    return ["dataset=folder", f"data_dir={data_dir}"]


def one_line(err):
    text = str(err.value)
    assert "\n" not in text
    return text


# ---------------------------------------------------------------- two datasets of one name

def test_two_datasets_of_one_folder_name_get_their_own_checkpoint_and_are_never_mixed(
        two_minis, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo config's relative outputs land here
    a, b = two_minis
    train_a = load_config(DEMO_TRAIN_CONFIG, folder_data(a) + SMALL)
    train_b = load_config(DEMO_TRAIN_CONFIG, folder_data(b) + SMALL)
    for key in ("name", "save_path", "log_path"):
        assert train_a[key] != train_b[key] and "mini" in train_a[key], key
    assert load_config(DEMO_EVAL_CONFIG, folder_data(a))["save_path"] == train_a["save_path"]

    assert train(*folder_data(a), *SMALL) == 0
    saved = torch.load(train_a["save_path"], weights_only=True)
    assert saved["data"]["split_folder"] == str((a / "train_val_test_split").resolve())
    assert saved["data"]["train_identities"] == len(saved["identity_names"])
    manifest = json.loads((a / "train_val_test_split/splits.json").read_text())
    assert sorted(saved["identity_names"]) == sorted(manifest["splits"]["train"])
    # b is another run: not "already finished" because a was trained
    assert needs_training(train_b) and read_resume_state(train_b) is None

    evaluate(*folder_data(a), "num_splits=1", "plots=false")  # its own test identities
    assert "rank-1" in capsys.readouterr().out
    overlap = sorted(set(saved["identity_names"]) & set(manifest_test(b)))
    assert overlap  # the two seeds' splits share people
    with pytest.raises(UserError) as err:
        evaluate(*folder_data(b), f"save_path={train_a['save_path']}", "num_splits=1",
                 "plots=false")
    assert one_line(err).startswith(f"{train_a['save_path']} was trained on {len(overlap)} of "
                                    f"the identities this evaluation tests ({overlap[0]}")


def manifest_test(data_dir):
    return json.loads((data_dir / "train_val_test_split/splits.json").read_text())["splits"][
        "test"]


def test_an_old_checkpoint_without_data_fingerprint_is_checked_by_its_identity_names(
        make_config, tiny_checkpoint, tmp_path):
    config = make_config(variant="finetuned", plots=False)
    tiny_checkpoint(config, config["save_path"])
    old = torch.load(config["save_path"], weights_only=True)
    for key in ("data", "planned_epochs"):  # as written before these existed
        del old[key]
    test_names = sorted(manifest_test_11k(config))
    old["identity_names"] = old["identity_names"][:-1] + [test_names[0]]
    torch.save(old, config["save_path"])
    with pytest.raises(UserError, match=r"was trained on 1 of the identities this evaluation "
                                        rf"tests \({test_names[0]}; it was trained on "):
        run_eval_clip.main(["--config", write_config(config, tmp_path / "eval.yml")])


def manifest_test_11k(config):
    folder = Path(config["data_dir"]) / f"train_val_test_split_{config['aspect']}"
    return json.loads((folder / "splits.json").read_text())["splits"]["test"]


# ---------------------------------------------------------------- logs

def test_the_log_follows_save_path_unless_given():
    named = load_config(DEMO_TRAIN_CONFIG, ["save_path=saved_models/mine/a.pth"])
    other = load_config(DEMO_TRAIN_CONFIG, ["save_path=saved_models/mine/b.pth"])
    assert (named["log_path"], other["log_path"]) == ("logs/mine/a.log", "logs/mine/b.log")
    assert load_config(DEMO_TRAIN_CONFIG, ["save_path=/runs/x/m.pth"])["log_path"] == \
        "/runs/x/m.log"
    assert load_config(DEMO_TRAIN_CONFIG, ["save_path=saved_models/mine/a.pth",
                                           "log_path=logs/kept.log"])["log_path"] == \
        "logs/kept.log"
    assert load_config(DEMO_TRAIN_CONFIG)["log_path"] == "logs/demo/train_tiny_11k_dorsal_r.log"


def test_a_log_in_use_by_another_run_is_refused(make_config, tmp_path, capsys):
    first = make_config()
    second = make_config(save_path=str(tmp_path / "other.pth"))
    assert first["log_path"] == second["log_path"]
    with run_lock(first["log_path"]):  # as a first run holds it while it trains
        with pytest.raises(UserError) as err:
            train_main(Stage1, "", ["--config", write_config(second, tmp_path / "b.yml")])
    assert one_line(err).startswith(f"log_path {first['log_path']} is written by another "
                                    f"training run (pid {os.getpid()}")
    assert "set another log_path" in str(err.value)
    assert not Path(second["save_path"]).exists()


# ---------------------------------------------------------------- run_all's summary

def test_run_all_never_replaces_a_fuller_summary(prepared_11k, tmp_path, capsys):
    write_experiment(tmp_path, prepared_11k)
    out = tmp_path / "summary"
    common = ["--out", out, "--set", "num_splits=1", "--set", f"results_dir={tmp_path}/results"]
    assert run_all_finetuned_stage1.main(
        [str(a) for a in ["--configs", tmp_path / "eval_baseline_tiny.yml", *common]]) == 0
    full = out.with_suffix(".md").read_text(), out.with_suffix(".csv").read_text()
    capsys.readouterr()
    # The fine-tuned config's checkpoint is missing: this run's table has no row.
    assert run_all_finetuned_stage1.main(
        [str(a) for a in ["--configs", tmp_path / "eval_tiny.yml", *common]]) == 1
    assert (out.with_suffix(".md").read_text(), out.with_suffix(".csv").read_text()) == full
    beside = sorted(tmp_path.glob("summary.*.md"))
    assert len(beside) == 1 and beside[0].with_suffix(".csv").is_file()
    assert "Failed:" in beside[0].read_text()
    err = capsys.readouterr().err
    assert f"warning: {out}.md holds 1 rows and this run has 0: kept it, this table goes to " \
           f"{beside[0]}" in err


# ---------------------------------------------------------------- a broken finished run

def test_a_finished_runs_missing_or_corrupt_checkpoint_gets_one_advice(make_config, tmp_path):
    config = make_config(epochs=1, warmup_epochs=0, batch_size=16, variant="finetuned",
                         num_splits=1, plots=False)
    config_file = write_config(config, tmp_path / "run.yml")
    assert train_main(Stage1, "", ["--config", config_file]) == 0
    checkpoint = Path(config["save_path"])
    data = checkpoint.read_bytes()

    checkpoint.unlink()
    with pytest.raises(UserError) as evaluation:
        run_eval_clip.main(["--config", config_file])
    assert one_line(evaluation).startswith(
        f"checkpoint not found: {checkpoint}, though {resume_path(config)} records that its "
        f"training finished; train first: python experiments/train_stage1_frozen_text.py")
    assert "--overwrite, or restore the file" in str(evaluation.value)
    with pytest.raises(UserError) as training:
        train_main(Stage1, "", ["--config", config_file])
    assert one_line(training).startswith(f"training of {checkpoint} already finished (1 epochs")
    assert str(training.value).endswith(f", but checkpoint not found: {checkpoint}; pass "
                                        f"--overwrite to train again, or restore the file")
    with pytest.raises(UserError, match="but checkpoint not found"):
        needs_training(config)  # run_all --train's check says it too

    checkpoint.write_bytes(data[: len(data) // 3])
    broken = f"cannot read checkpoint {checkpoint}: corrupt, truncated or not a torch file"
    with pytest.raises(UserError) as evaluation:
        run_eval_clip.main(["--config", config_file])
    assert one_line(evaluation).startswith(broken)
    assert str(evaluation.value).endswith("--overwrite, or restore the file")
    with pytest.raises(UserError) as training:
        train_main(Stage1, "", ["--config", config_file])
    assert "already finished (1 epochs" in one_line(training)
    assert f", but {broken}" in str(training.value)

    assert train_main(Stage1, "", ["--config", config_file, "--overwrite"]) == 0
    assert model_checkpoint.checkpoint_problem(checkpoint) is None


# ---------------------------------------------------------------- unfinished and degenerate runs

def test_an_unfinished_runs_checkpoint_is_noted_in_the_report_and_the_table(
        make_config, tmp_path, capsys):
    config = make_config(batch_size=8, epochs=3, warmup_epochs=0)
    clip_model, classifier, train_loader, val_loader = build(config)
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C before epoch 2
        FinetuneTrainerStage1(clip_model, classifier, InterruptedLoader(train_loader, 2),
                              config, "cpu", val_loader).train()
    evaluated = dict(config, variant="finetuned", num_splits=1, plots=False)
    eval_file = tmp_path / "eval_unfinished.yml"
    write_config(evaluated, eval_file)
    capsys.readouterr()
    assert run_all_finetuned_stage1.main(["--configs", str(eval_file), "--out",
                                          str(tmp_path / "summary")]) == 0
    out = capsys.readouterr().out
    assert f"checkpoint {config['save_path']} (epoch 1, " in out
    assert "unfinished (epoch 1 of 3)" in out.split("| config |")[0]  # the report
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0].endswith("| Cllr | note |")
    assert table[2].endswith("| unfinished (epoch 1 of 3) |")
    with (tmp_path / "summary.csv").open() as handle:
        assert next(csv.DictReader(handle))["note"] == "unfinished (epoch 1 of 3)"
    result = json.loads(next((tmp_path / "results").glob("*.json")).read_text())
    assert result["checkpoint"]["unfinished"] == "epoch 1 of 3"


def test_the_unfinished_rule_without_a_resume_state():
    last = {"planned_epochs": 40, "epoch": 12, "selection": {"metric": "last"}}
    best = {"planned_epochs": 40, "epoch": 12, "selection": {"metric": "val_accuracy"}}
    nowhere = "/nonexistent/model.pth"
    assert model_checkpoint.unfinished_note(nowhere, last) == "epoch 12 of 40"
    assert model_checkpoint.unfinished_note(nowhere, dict(last, epoch=40)) is None
    assert model_checkpoint.unfinished_note(nowhere, best) is None  # a best epoch tells nothing


def test_degenerate_training_settings_are_warned_about_and_the_run_goes_on(
        identity_tree, tmp_path, capsys):
    people = sorted(p.name for p in identity_tree.iterdir())
    (tmp_path / "test_ids.txt").write_text("\n".join(people[1:]) + "\n")
    run_script("datasets/prepare_folder.py", "--raw", identity_tree, "--out", tmp_path / "one",
               "--test-ids", tmp_path / "test_ids.txt", "--num-splits", 1)
    config = load_config(DEMO_TRAIN_CONFIG, folder_data(tmp_path / "one") + [
        "epochs=1", "warmup_epochs=0", "batch_size=64", "lr=0", f"save_path={tmp_path}/m.pth"])
    capsys.readouterr()
    assert train_main(Stage1, "", ["--config", write_config(config, tmp_path / "c.yml")]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if line.startswith("warning: ")]
    assert f"warning: train/ holds one identity ({people[0]}): there is nobody to tell apart" \
           in "\n".join(warnings)
    assert any(line.startswith("warning: batch_size 64 is larger than the training set (")
               for line in warnings)
    assert "warning: lr is 0: the weights it drives (the image encoder and its heads) never " \
           "change; set lr: to a positive value" in warnings
    assert Path(config["save_path"]).is_file()
