"""Stage-1 trainer on the tiny model and synthetic 11k: it learns, trains only the image encoder,
resumes exactly after SIGTERM and SIGKILL, refuses finished or mismatched runs, stops on a
NaN loss, runs under torchrun on gloo, and the train configs follow the recipe."""
import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from handreid.checkpoint import model_checkpoint
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from conftest import ONE_THREAD, ROOT, InterruptedLoader, build, run_torchrun, write_config
from handreid.methods.stage1 import Stage1
from handreid.train.entry import train_main
from handreid.methods.base import Phase, lr_factor
from handreid.train.run_log import metrics_path
from handreid.train.checkpointing import read_resume_state, resume_path
from finetune_trainer_stage1 import FinetuneTrainerStage1


def main(argv):
    """The Stage1 train script's main()."""
    return train_main(Stage1, '', argv)


TRAIN = "experiments/train_stage1_frozen_text.py"
METRIC_KEYS = {"epoch", "phase", "train_loss", "loss_ce", "train_acc", "val_acc", "val_loss",
               "val_map", "lr", "images_per_s", "data_time_fraction", "checkpoint_seconds",
               "epoch_time", "best"}
pytestmark = pytest.mark.usefixtures("one_thread")


def metrics(config):
    return [json.loads(line) for line in metrics_path(config).read_text().splitlines()]


def learned(rows):
    """What must be identical between two runs (timings are not)."""
    return [(r["epoch"], r["train_loss"], r["train_acc"], r["val_acc"], r["lr"]) for r in rows]


def test_training_learns_and_changes_only_the_image_encoder(make_config):
    config = make_config(batch_size=8, epochs=3, head_lr_mult=2.0, selection="val_accuracy")
    clip_model, classifier, train_loader, val_loader = build(config)
    before = {k: v.clone() for k, v in clip_model.state_dict().items()}
    trainer = FinetuneTrainerStage1(clip_model, classifier, train_loader, config, "cpu",
                                    val_loader)

    groups = trainer.method.param_groups(Phase.from_config(config))
    optimized = {id(p) for group in groups for p in group["params"]}
    assert optimized == {id(p) for p in [*clip_model.visual.parameters(),
                                         *classifier.parameters()]}
    undecayed = {id(p) for group in groups if group["weight_decay"] == 0 for p in group["params"]}
    for name, param in clip_model.visual.named_parameters():
        assert (id(param) in undecayed) == (param.ndim <= 1 or "embedding" in name), name
    head_lrs = {g["lr"] for g in groups if g["name"].startswith("head")}
    assert head_lrs == {config["lr"] * config["head_lr_mult"]}

    summary = trainer.train()
    losses = [row["train_loss"] for row in summary["history"]]
    assert losses[-1] < losses[0], losses

    after = clip_model.state_dict()
    text_side = [k for k in before if not k.startswith("visual.")]
    assert len(text_side) > 10
    assert all(torch.equal(before[k], after[k]) for k in text_side)
    unchanged = [n for n, _ in clip_model.visual.named_parameters()
                 if torch.equal(before[f"visual.{n}"], after[f"visual.{n}"])]
    assert not unchanged

    rows = metrics(config)
    assert [r["epoch"] for r in rows] == [1, 2, 3] and all(set(r) == METRIC_KEYS for r in rows)
    assert Path(summary["curve_path"]).read_bytes().startswith(b"\x89PNG")
    log_text = Path(config["log_path"]).read_text()
    assert "resolved config" in log_text and "epoch 3/3  loss" in log_text
    best = max(rows, key=lambda r: (r["val_acc"], r["epoch"]))  # ties: the later epoch
    _, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert (ckpt["epoch"], ckpt["selection"]["val_accuracy"]) == (best["epoch"], best["val_acc"])
    assert ckpt["identity_names"] == train_loader.dataset.classes
    finished = torch.load(resume_path(config), weights_only=True)
    assert finished["finished"] and "optimizer" not in finished


def test_lr_schedule_warms_up_then_decays(make_config):
    cosine = Phase.from_config(make_config(epochs=10, warmup_epochs=2, scheduler="cosine"))
    factors = [lr_factor(step, 5, cosine) for step in range(50)]
    assert factors[:10] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert factors[10] == 1.0 and all(a > b for a, b in zip(factors[10:], factors[11:]))
    assert factors[-1] < 0.01
    step = Phase.from_config(make_config(epochs=10, warmup_epochs=1, scheduler="step",
                                         lr_steps=[4, 7], lr_gamma=0.1))
    assert [lr_factor(e * 5, 5, step) for e in (1, 3, 4, 6, 7, 9)] == pytest.approx(
        [1, 1, 0.1, 0.1, 0.01, 0.01])


def wait_for(proc, condition, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"training exited ({proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def start_training(config_file):
    return subprocess.Popen([sys.executable, str(ROOT / TRAIN), "--config", config_file],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=ONE_THREAD)


@pytest.mark.slow
def test_resume_after_sigterm_and_sigkill_equals_an_uninterrupted_run(make_config, tmp_path):
    settings = {"batch_size": 4, "epochs": 4, "save_every": 1}
    reference = make_config(save_path=str(tmp_path / "ref/model.pth"),
                            log_path=str(tmp_path / "ref/train.log"), **settings)
    main(["--config", write_config(reference, tmp_path / "ref.yml")])

    config = make_config(**settings)
    config_file = write_config(config, tmp_path / "run.yml")
    state = resume_path(config)

    # SIGTERM (like Ctrl-C) once epoch 1 is saved: the running epoch ends and is saved, exit
    # 130, how to resume said.
    proc = start_training(config_file)
    wait_for(proc, state.exists, "the first resume state")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "run the same command again to resume" in stderr
    kept = torch.load(state, weights_only=True)
    assert not kept["finished"] and kept["epoch"] in (1, 2)

    # SIGKILL right after the resumed run saved its next epoch.
    inode = os.stat(state).st_ino
    proc = start_training(config_file)
    wait_for(proc, lambda: os.stat(state).st_ino != inode, "the next resume state")
    proc.kill()
    proc.communicate(timeout=60)
    assert not torch.load(state, weights_only=True)["finished"]

    main(["--config", config_file])
    assert "resuming after epoch" in Path(config["log_path"]).read_text()
    assert learned(metrics(config)) == learned(metrics(reference))
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    for get in (lambda c: c["clip_state_dict"], lambda c: c["modules"]["classifier"]):
        assert get(ours).keys() == get(theirs).keys()
        assert all(torch.equal(get(ours)[k], get(theirs)[k]) for k in get(ours))

    with pytest.raises(UserError, match="already finished .*pass --overwrite to train again"):
        main(["--config", config_file])


def test_corrupt_foreign_or_mismatched_state_is_a_clear_error(make_config):
    config = make_config(batch_size=8, epochs=2)
    clip_model, classifier, train_loader, val_loader = build(config)
    trainer = FinetuneTrainerStage1(clip_model, classifier, InterruptedLoader(train_loader, 2),
                                    config, "cpu", val_loader)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert read_resume_state(make_config(batch_size=8, epochs=2, num_workers=1)).epoch == 1

    with pytest.raises(UserError, match=r"other training settings \(lr: 0.001 -> 0.002\); "
                                        r"pass --overwrite"):
        read_resume_state(make_config(batch_size=8, epochs=2, lr=2e-3))
    with pytest.raises(UserError, match="trained on aspect 'dorsal_r'"):
        model_checkpoint.load_checkpoint(config["save_path"], make_config(aspect="palmar_l"))

    path = resume_path(config)
    data = path.read_bytes()
    Path(config["save_path"]).unlink()
    with pytest.raises(UserError, match="best checkpoint .* is missing"):
        FinetuneTrainerStage1(*build(config)[:3], config, "cpu").train()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read resume state .*corrupt or truncated"):
        read_resume_state(config)
    torch.save({"format": "something else"}, path)
    with pytest.raises(UserError, match="is not a clip-handid-resume v2 file"):
        read_resume_state(config)
    assert read_resume_state(config, overwrite=True) is None


def test_nan_loss_stops_naming_epoch_and_step_and_keeps_the_checkpoint(make_config, tmp_path):
    config = make_config(batch_size=8, epochs=1, warmup_epochs=0)
    config_file = write_config(config, tmp_path / "run.yml")
    main(["--config", config_file])
    checkpoint, state = Path(config["save_path"]).read_bytes(), resume_path(config).read_bytes()

    with pytest.raises(UserError, match=r"^epoch 1, step \d+/6: the training loss is not "
                                        r"finite \(nan or inf\); training stopped and no "
                                        r"checkpoint of this run was written to "):
        main(["--config", config_file, "--overwrite", "--set", "lr=1e30"])
    assert Path(config["save_path"]).read_bytes() == checkpoint
    assert resume_path(config).read_bytes() == state


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_writes_one_checkpoint(make_config, tmp_path):
    config = make_config(batch_size=4, epochs=1, warmup_epochs=0)
    run_torchrun(TRAIN, write_config(config, tmp_path / "ddp.yml"))
    _, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert ckpt["epoch"] == 1
    log_text = Path(config["log_path"]).read_text()
    # 52 train images: 26 per process, 6 full batches of 4 each.
    assert "2 process(es)" in log_text and "6 steps per epoch per process" in log_text
    assert log_text.count("epoch 1/1  loss") == 1 and len(metrics(config)) == 1


def test_bad_config_is_one_line_and_exit_2(make_config, tmp_path):
    # The documented script: the generic one with its own default config.
    script = ROOT / "experiments/train_stage1_frozen_text_vitb16_11k_dorsal_r.py"
    proc = subprocess.run([sys.executable, str(script), "--set", "amp=fp16", "--set",
                           "device=cpu"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: amp: fp16 needs a CUDA device; on CPU use amp: bf16 or fp32"]
    with pytest.raises(ConfigError, match="unknown key 'lrr' \\(did you mean 'lr'\\?\\)"):
        main(["--config", write_config(make_config(), tmp_path / "c.yml"), "--set", "lrr=1"])


# The default (CLIP-ReID) recipe's configs; the _seed and _clipfh recipes are checked in
# test_recipe_configs.py.
@pytest.mark.parametrize("path", sorted(
    glob.glob(str(ROOT / "configs/finetuning_stage1_frozen_text/train_*_[lr].yml"))
    + glob.glob(str(ROOT / "configs/finetuning_stage1_frozen_text/train_*_hd.yml"))))
def test_train_configs_name_their_outputs_and_recipe(path):
    config = load_config(path)
    model, _, dataset = Path(path).stem.removeprefix("train_").partition("_")
    assert config["model"] == model and config["name"] == f"stage1_{model}_{dataset}"
    assert config["dataset"] == ("hd" if dataset == "hd" else "11k")
    if dataset != "hd":
        assert f"11k_{config['aspect']}" == dataset
    assert config["save_path"] == f"saved_models/stage1_frozen_text/{model}_{dataset}.pth"
    assert config["log_path"] == f"logs/stage1_frozen_text/{model}_{dataset}.log"
    assert config["label_smoothing"] == 0.1 and config["warmup_epochs"] == 10
    assert (config["lr"], config["epochs"]) == ((5e-6, 60) if model == "vitb16" else (3.5e-4, 120))
    assert "CLIP-ReID" in Path(path).read_text()
