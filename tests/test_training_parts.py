"""The engine's collaborators alone, in milliseconds: the save-point rule, the selection rule
(ties, each signal, early stopping), pending best weights, the resume-state round trip, the
legacy conversions and the method registry. The end-to-end runs are in test_engine.py,
test_trainer.py, test_early_stop.py and test_format_fixtures.py."""
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from handreid.checkpoint import legacy
from handreid.core import registry
from handreid.train.checkpointing import (Checkpointer, ResumeState, SavePoints, load_resume_state,
                           settings_changed, sum_fingerprint)
from handreid.core.errors import ConfigError, UserError
from handreid.core.schema import option
from handreid.methods.base import Method, Phase, phase_of
from handreid.train.selection import Best, Selection


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# ---------------------------------------------------------------- save points

def test_save_points_every_n_epochs_at_the_last_epoch_and_on_a_stop():
    points = SavePoints(every_epochs=3, every_minutes=0, clock=Clock())
    due = [epoch for epoch in range(1, 8) if points.due(epoch, last=epoch == 7, stop=False)]
    assert due == [3, 6, 7]
    assert points.due(1, last=False, stop=True)


def test_save_points_by_minutes_count_from_the_last_save():
    clock = Clock()
    points = SavePoints(every_epochs=100, every_minutes=2, clock=clock)
    clock.now = 119.0
    assert not points.due(1, last=False, stop=False)
    clock.now = 120.0
    assert points.due(1, last=False, stop=False)
    points.saved()
    clock.now = 200.0
    assert not points.due(2, last=False, stop=False)
    clock.now = 240.0
    assert points.due(2, last=False, stop=False)


# ---------------------------------------------------------------- selection

def selection(rule="val_accuracy", has_val=True, patience=0):
    return Selection({"selection": rule, "early_stop_patience": patience}, has_val)


@pytest.mark.parametrize("rule, values, best_epoch", [
    ("val_accuracy", [50.0, 60.0, 60.0, 55.0], 3),    # higher is better; a tie goes later
    ("val_map", [10.0, 9.0, 12.0, 12.0], 4),
    ("val_loss", [1.0, 0.5, 0.5, 0.7], 3),            # lower is better; a tie goes later
])
def test_the_best_epoch_by_each_signal_with_ties_going_to_the_later_epoch(rule, values,
                                                                         best_epoch):
    rule_of = selection(rule)
    new_best = [rule_of.update(epoch, {rule: value, "other": -value})
                for epoch, value in enumerate(values, 1)]
    assert rule_of.best.epoch == best_epoch
    assert rule_of.best.value == values[best_epoch - 1]
    assert rule_of.best.signals["other"] == -values[best_epoch - 1]
    assert new_best[0] and new_best[best_epoch - 1]
    assert rule_of.best.record() == {"metric": rule, "value": values[best_epoch - 1],
                                     rule: values[best_epoch - 1],
                                     "other": -values[best_epoch - 1]}


def test_last_and_no_val_keep_every_newer_epoch_and_a_missing_signal_counts_as_better():
    for rule_of in (selection("last"), selection("val_accuracy", has_val=False)):
        assert all(rule_of.update(epoch, {"val_accuracy": 100.0 - epoch})
                   for epoch in range(1, 5))
        assert rule_of.best.epoch == 4
    rule_of = selection("val_map")
    rule_of.update(1, {"val_map": 50.0})
    assert rule_of.update(2, {"val_accuracy": 10.0})  # no val_map measured: cannot compare
    assert Best().describe() == "n/a" and Best(3, "last").describe() == "epoch 3"
    assert Best(3, "val_map", 12.345).describe() == "val_map 12.35 at epoch 3"


def test_early_stop_counts_only_selecting_epochs_since_the_best():
    rule_of = selection("val_loss", patience=2)
    history = []
    for epoch, (phase, loss) in enumerate([("head", None), ("all", 1.0), ("all", 0.5),
                                           ("all", 0.9), ("all", 0.8)], 1):
        history.append({"epoch": epoch, "phase": phase})
        if loss is not None:
            rule_of.update(epoch, {"val_loss": loss})
    selects = {"head": False, "all": True}
    assert rule_of.early_stop(4, history[:4], selects, total_epochs=9) is None
    reason = rule_of.early_stop(5, history, selects, total_epochs=9)
    assert reason.startswith("early stop after epoch 5: val_loss has not improved for 2 epochs")
    assert rule_of.early_stop(5, history, selects, total_epochs=5) is None  # the last epoch
    with pytest.raises(ConfigError, match="early_stop_patience needs a selection signal"):
        selection("last", patience=1)


def test_a_resumed_best_under_another_rule_is_replaced_by_the_next_measured_epoch():
    rule_of = selection("val_map")
    rule_of.restore(Best(2, "val_accuracy", 80.0, {"val_accuracy": 80.0}))
    assert rule_of.best.metric == "val_map" and rule_of.best.value is None
    assert rule_of.update(3, {"val_map": 1.0}) and rule_of.best.epoch == 3


# ---------------------------------------------------------------- pending best weights

class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.trained, self.frozen = nn.Linear(2, 2), nn.Linear(2, 2)


def test_pending_best_weights_are_copied_before_the_next_epoch_changes_them(tmp_path):
    model = Model()
    method = SimpleNamespace(is_frozen=lambda name: name.startswith("frozen"))
    config = {"save_path": str(tmp_path / "m.pth"), "save_every": 5, "save_every_minutes": 0}
    checkpoints = Checkpointer(config, method, model)
    assert set(checkpoints.trained_state()) == {"trained.weight", "trained.bias"}
    checkpoints.new_best(1)
    assert checkpoints.pending.epoch == 1 and checkpoints.pending.weights is None
    checkpoints.keep_pending_weights()
    kept = checkpoints.pending.weights
    with torch.no_grad():
        model.trained.weight.add_(1.0)  # the next epoch trains on
    assert not torch.equal(kept["trained.weight"], model.trained.weight)
    checkpoints.keep_pending_weights()  # a second call keeps the first copy
    assert checkpoints.pending.weights is kept
    with torch.no_grad():
        model.frozen.weight.add_(1.0)
    assert sum_fingerprint(checkpoints.frozen_state()) != checkpoints.frozen_digest


# ---------------------------------------------------------------- resume state

def resume_state(**changes):
    values = dict(method="stage1", config={"lr": 1e-3}, identity_names=["a", "b"],
                  world_size=1, iters_per_epoch=4, epoch=2, phase=0, finished=False,
                  best=Best(2, "val_accuracy", 50.0, {"val_accuracy": 50.0}), best_written=2,
                  history=[{"epoch": 1}, {"epoch": 2}], frozen_digest="abc",
                  trained={"w": torch.ones(2)}, optimizer={"state": {}}, scheduler={"s": 1},
                  scaler={"scale": 1.0})
    return ResumeState(**{**values, **changes})


def test_the_resume_state_round_trips_through_its_file(tmp_path):
    path = tmp_path / "m.resume.pth"
    state = resume_state()
    torch.save(state.to_dict(), path)
    loaded = load_resume_state(path)
    assert loaded.best == state.best and loaded.history == state.history
    assert torch.equal(loaded.trained["w"], state.trained["w"])
    assert (loaded.epoch, loaded.phase, loaded.optimizer, loaded.scaler) == (2, 0, {"state": {}},
                                                                            {"scale": 1.0})
    finished = resume_state(finished=True, trained=None, optimizer=None, scheduler=None,
                            scaler=None).to_dict()
    assert not {"trained", "optimizer", "scheduler", "scaler"} & finished.keys()
    assert finished["best"] == {"epoch": 2, "metric": "val_accuracy", "value": 50.0,
                                "signals": {"val_accuracy": 50.0}}


def test_foreign_or_corrupt_resume_files_are_one_line_errors(tmp_path):
    path = tmp_path / "m.resume.pth"
    torch.save({"format": "something", "format_version": 1}, path)
    with pytest.raises(UserError, match="is not a clip-handid-resume v2 file"):
        load_resume_state(path)
    path.write_bytes(b"not a torch file")
    with pytest.raises(UserError, match="corrupt or truncated"):
        load_resume_state(path)


def test_a_setting_the_saved_run_did_not_know_counts_with_its_default():
    config = {key: spec["default"] for key, spec in registry.config_keys().items()}
    saved = {k: v for k, v in config.items() if k != "bias_lr_factor"}
    assert settings_changed(saved, config) == []
    assert settings_changed(saved, {**config, "bias_lr_factor": 2.0}) == [
        "bias_lr_factor: 1.0 -> 2.0"]
    assert settings_changed(saved, {**config, "num_workers": 7}) == []  # not a training key
    # A method's own key is a training setting too.
    assert settings_changed(config, {**config, "prompt_lr": 1.0}) == ["prompt_lr: 0.00035 -> 1.0"]


# ---------------------------------------------------------------- legacy files

def test_a_first_release_resume_state_converts_to_todays_layout(tmp_path):
    v1 = {"format": "clip-handid-stage1-resume", "format_version": 1, "config": {},
          "identity_names": ["a"], "world_size": 1, "iters_per_epoch": 3, "epoch": 1,
          "finished": False, "best_epoch": 1, "best_val_accuracy": 40.0, "history": [],
          "clip_state_dict": {"visual.w": torch.zeros(1)},
          "classifier_state_dict": {"weight": torch.ones(1)}, "optimizer": {},
          "scheduler": {}, "scaler": {}}
    path = tmp_path / "old.resume.pth"
    torch.save(v1, path)
    state = load_resume_state(path)
    assert state.method == "stage1" and state.phase == 0 and state.frozen_digest is None
    assert state.best == Best(1, "val_accuracy", 40.0, {"val_accuracy": 40.0})
    assert state.best_written == 1
    assert set(state.trained) == {"clip_model.visual.w", "extras.classifier.weight"}
    # What the run writes next is today's layout only, not the old copies of the weights.
    assert not {"clip_state_dict", "classifier_state_dict", "best_epoch"} & \
        state.to_dict().keys()


@pytest.mark.parametrize("head, has_head, feature", [
    ("bnneck", True, {"kind": "bn", "module": "classifier"}),
    ("linear", True, {"kind": "embedding"}),
    ("linear", False, {"kind": "embedding"}),
])
def test_a_first_release_checkpoint_converts_by_its_head(head, has_head, feature):
    v1 = {"head": head, "embed_dim": 8, "identity_names": ["a", "b", "c"],
          "classifier_state_dict": {"w": torch.ones(1)} if has_head else None,
          "val_accuracy": 70.0}
    converted = legacy.checkpoint_from_v1(v1)
    assert converted["method"] == "stage1" and converted["feature"] == feature
    assert bool(converted["modules"]) == has_head == bool(converted["module_specs"])
    assert converted["selection"] == {"metric": "val_accuracy", "value": 70.0,
                                      "val_accuracy": 70.0}


# ---------------------------------------------------------------- methods and phases

def test_every_method_names_its_own_train_command():
    assert registry.train_command("clipreid").startswith(
        "python experiments/train_stage2_clipreid.py")
    assert registry.train_command("clip_handid").startswith(
        "python experiments/train_clip_handid.py")
    assert registry.train_command("stage1").startswith(
        "python experiments/train_stage1_frozen_text.py")
    assert registry.train_command("nobody", "?") == "?"


def test_a_method_cannot_take_a_built_in_name_or_a_general_key():
    with pytest.raises(ConfigError, match="'stage1' of test_training_parts has the name of a "
                                          "built-in method"):
        type("Stage1Again", (Method,), {"name": "stage1"})
    with pytest.raises(ConfigError, match="defines the config key 'lr', which the general "
                                          "config or another method defines"):
        type("Greedy", (Method,), {"name": "toy_greedy",
                                   "config_keys": {"lr": option(float, 1.0, "its own lr")}})
    assert "toy_greedy" not in registry.known()


def test_phase_of_an_epoch_counts_over_all_phases():
    phases = [Phase("prompts", 2), Phase("image_encoder", 3)]
    assert [phase_of(phases, epoch) for epoch in range(1, 7)] == [0, 0, 1, 1, 1, 1]


# ---------------------------------------------------------------- writing before the work

def test_a_read_only_folder_says_so_and_a_full_one_says_how_much_is_free(tmp_path, monkeypatch):
    import errno
    import os
    from handreid.core.errors import check_writable, write_error
    denied = write_error(tmp_path / "m.pth", PermissionError(errno.EACCES, "Permission denied"))
    assert "read-only or not yours to write, the disk is not full" in str(denied)
    assert "GiB free" not in str(denied)
    full = write_error(tmp_path / "m.pth", OSError(errno.ENOSPC, "No space left on device"))
    assert "GiB free on" in str(full)
    check_writable(tmp_path / "new/m.pth", room=1)
    with pytest.raises(UserError, match="less than the .* GiB it needs free"):
        check_writable(tmp_path / "m.pth", room=2 ** 62)
    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="read-only or not yours to write"):
        check_writable(tmp_path / "m.pth")


def test_a_truncated_checkpoint_names_the_train_command_of_its_own_method(make_config,
                                                                          tmp_path):
    from handreid.checkpoint import model_checkpoint
    path = tmp_path / "stage2.pth"
    path.write_bytes(b"PK\x03\x04 truncated")
    for method, script in (("clipreid", "train_stage2_clipreid.py"),
                           ("clip_handid", "train_clip_handid.py"),
                           ("stage1", "train_stage1_frozen_text.py")):
        with pytest.raises(UserError, match=f"corrupt, truncated .* train again: python "
                                            f"experiments/{script}"):
            model_checkpoint.load_checkpoint(path, make_config(method=method))
        with pytest.raises(UserError, match=f"train first: python experiments/{script}"):
            model_checkpoint.load_checkpoint(tmp_path / "none.pth", make_config(method=method))
