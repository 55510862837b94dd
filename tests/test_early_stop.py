"""early_stop_patience: stops at the first epoch after N validated epochs without improvement
(ties improve, as the selection rule has them), keeps the best epoch's checkpoint, says why,
stops at the same epoch after a kill -9 and resume, and refuses what it cannot wait for."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from handreid.checkpoint import model_checkpoint
from handreid.core.errors import ConfigError
from conftest import ONE_THREAD, ROOT, run_torchrun, write_config
from handreid.data.loaders import get_train_val_loaders
from handreid.train import engine
from handreid.train.engine import Engine
from handreid.train.run_log import metrics_path
from handreid.train.checkpointing import resume_path
from handreid.methods.stage1 import Stage1
from handreid.train.entry import train_main
from toy_method import HeadThenAll, toy_engine


def main(argv):
    """The Stage1 train script's main()."""
    return train_main(Stage1, '', argv)


TRAIN = "experiments/train_stage1_frozen_text.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def test_stops_after_patience_epochs_without_improvement_and_keeps_the_best(make_config,
                                                                            monkeypatch):
    # Phase "head" (1 epoch, not validated) then 8 validated epochs with scripted val losses:
    # epoch 3 improves, epoch 4 ties (a tie improves), epochs 5 and 6 are worse -> stop after 6.
    losses = iter([1.0, 0.5, 0.5, 0.7, 0.9, 0.1, 0.1, 0.1])
    snapshots = {}

    def scripted_signals(method, model, *args):
        # Called after each validated epoch (2, 3, ...): keep that epoch's trained weights.
        snapshots[len(snapshots) + 2] = {k: v.clone() for k, v in model.state_dict().items()
                                         if not method.is_frozen(k)}
        return {"val_loss": next(losses), "val_accuracy": 0.0}

    monkeypatch.setattr(engine, "validation_signals", scripted_signals)
    config = make_config(method="toy_head_then_all", sampler="pk", num_instances=2,
                         batch_size=8, epochs=8, lr=1e-3, early_stop_patience=2, save_every=5)
    summary = toy_engine(config).train()

    assert [r["epoch"] for r in summary["history"]] == [1, 2, 3, 4, 5, 6]
    assert summary["best_epoch"] == 4 and summary["best_value"] == 0.5
    assert "has not improved for 2 epochs" in summary["early_stop"]
    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert rows[-1]["epoch"] == 6 and rows[-1]["early_stop"] == summary["early_stop"]
    assert "early stop after epoch 6" in Path(config["log_path"]).read_text()
    assert torch.load(resume_path(config), weights_only=True)["finished"]
    checkpoint = torch.load(config["save_path"], weights_only=True)
    assert checkpoint["epoch"] == 4
    model, _ = model_checkpoint.load_checkpoint(config["save_path"], config)
    kept = {k: v for k, v in model.state_dict().items() if k in snapshots[4]}
    assert kept.keys() == snapshots[4].keys()
    assert all(torch.equal(kept[k], snapshots[4][k]) for k in kept)
    assert not all(torch.equal(kept[k], snapshots[6][k]) for k in kept)


@pytest.mark.slow
def test_kill_9_before_the_early_stop_then_the_same_command_stops_at_the_same_epoch(
        make_config, tmp_path):
    # lr 0.05 overfits the tiny model fast: val loss rises within a few epochs.
    settings = {"batch_size": 4, "epochs": 12, "lr": 0.05, "warmup_epochs": 0,
                "early_stop_patience": 1, "save_every": 1}
    reference = make_config(save_path=str(tmp_path / "ref/model.pth"),
                            log_path=str(tmp_path / "ref/train.log"), **settings)
    main(["--config", write_config(reference, tmp_path / "ref.yml")])
    ref_rows = [json.loads(line) for line in metrics_path(reference).read_text().splitlines()]
    stop_epoch = ref_rows[-1]["epoch"]
    assert 2 <= stop_epoch < 12 and "early_stop" in ref_rows[-1]

    config = make_config(**settings)
    config_file = write_config(config, tmp_path / "run.yml")
    proc = subprocess.Popen([sys.executable, str(ROOT / TRAIN), "--config", config_file],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env=ONE_THREAD)
    deadline = time.monotonic() + 120
    while not resume_path(config).exists():  # epoch 1 saved, the stop is at least 1 epoch on
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.kill()
    proc.communicate(timeout=60)
    assert not torch.load(resume_path(config), weights_only=True)["finished"]

    main(["--config", config_file])
    assert "resuming after epoch" in Path(config["log_path"]).read_text()
    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert [(r["epoch"], r["train_loss"], r["val_loss"]) for r in rows] == \
        [(r["epoch"], r["train_loss"], r["val_loss"]) for r in ref_rows]
    assert rows[-1]["early_stop"] == ref_rows[-1]["early_stop"]
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert ours["epoch"] == theirs["epoch"] < stop_epoch
    assert all(torch.equal(ours["clip_state_dict"][k], theirs["clip_state_dict"][k])
               for k in ours["clip_state_dict"])


@pytest.mark.slow
def test_every_torchrun_process_stops_at_the_early_stop(make_config, tmp_path):
    # Rank 0 decides; the other rank must leave its epoch loop too, or the run would hang.
    # lr 0.3 makes the val loss of the tiny model rise within a few epochs.
    config = make_config(batch_size=4, epochs=8, lr=0.3, warmup_epochs=0,
                         early_stop_patience=1)
    run_torchrun(TRAIN, write_config(config, tmp_path / "ddp.yml"))
    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert rows[-1]["epoch"] < 8 and "early_stop" in rows[-1]
    assert torch.load(config["save_path"], weights_only=True)["epoch"] == rows[-1]["epoch"] - 1


def test_negative_patience_is_a_one_line_config_error(make_config, tmp_path):
    config_file = write_config(make_config(), tmp_path / "run.yml")
    with pytest.raises(ConfigError) as err:
        main(["--config", config_file, "--set", "early_stop_patience=-1"])
    assert "'early_stop_patience' must be >= 0, got -1" in str(err.value)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_patience_without_a_val_split_is_refused(make_config):
    config = make_config(early_stop_patience=2)
    with pytest.raises(ConfigError, match="early_stop_patience needs a selection signal"):
        toy_engine_without_val(config)


@pytest.mark.slow
def test_selection_last_with_early_stopping_is_one_line_exit_2(make_config, tmp_path):
    # Early stopping waits on a val signal; selection: last (CLIP-ReID's rule) selects none.
    config_file = write_config(make_config(selection="last", early_stop_patience=2),
                               tmp_path / "run.yml")
    proc = subprocess.run([sys.executable, str(ROOT / TRAIN), "--config", config_file],
                          cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "error: early_stop_patience needs a selection signal on val/ to wait for")


def toy_engine_without_val(config):
    train_loader, _, _ = get_train_val_loaders(config)
    return Engine(HeadThenAll.build(config, train_loader.dataset.classes), train_loader, config,
                  "cpu")
