"""A new method is one .py file that `method:` names: the toy method written here (its own
config key, extra module, retrieval feature and loss) trains, resumes after kill -9 to the
result of an uninterrupted run, evaluates and runs in run_all_finetuned_stage1.py --train,
through the scripts alone and with no other file changed. A bad `method:` is one line, exit
code 2."""
import csv
import json
from pathlib import Path

import pytest
import torch

from conftest import ONE_THREAD, kill_when, results_json, run_script, write_config
from handreid.train.checkpointing import resume_path
from handreid.train.run_log import metrics_path

TRAIN = "experiments/train.py"
EVAL = "experiments/run_eval_clip.py"

TOY_METHOD = '''
import torch
import torch.nn.functional as F
from torch import nn

from handreid.core.schema import option
from handreid.methods.base import Method, encoder_and_head_groups
from handreid.model.backbone import HandIdModel, embed_dim


class ScaledHead(nn.Module):
    """A learned scale per embedding dimension and a linear identity head."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.fc = nn.Linear(dim, num_classes)


def scaled_embedding(model, images):
    return model.extras["head"].scale * model.clip_model.encode_image(images)


class ScaledMargin(Method):
    name = "toy_scaled_margin"
    config_keys = {"toy_margin": option(float, 0.5, "logit margin of the true identity",
                                        low=0.0)}
    module_kinds = {"toy_scaled_head": ScaledHead}
    feature_kinds = {"toy_scaled": scaled_embedding}

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, clip_model, identity_names)
        self.spec = {"kind": "toy_scaled_head", "dim": embed_dim(config),
                     "num_classes": len(identity_names)}
        head = ScaledHead(self.spec["dim"], self.spec["num_classes"])
        self.model = HandIdModel(clip_model, {"head": head}, {"kind": "toy_scaled"})

    def module_specs(self):
        return {"head": self.spec}

    def param_groups(self, phase):
        return encoder_and_head_groups(self.config, self.model.clip_model.visual, "head",
                                       self.model.extras["head"])

    def forward(self, model, images):
        return model.extras["head"].fc(model.features(images))

    def loss(self, phase, logits, labels):
        margin = self.config["toy_margin"] * F.one_hot(labels, logits.shape[1])
        return {"margin_ce": F.cross_entropy(logits - margin, labels)}, logits

    def classify(self, model, images):
        return self.forward(model, images)
'''


def write_toy(folder):
    """The toy method's file, folder/my_methods/toy.py."""
    path = Path(folder) / "my_methods" / "toy.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(TOY_METHOD)
    return path


def metric_rows(config):
    path = metrics_path(config)
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def learned(config):
    """What must be identical between two runs (timings are not)."""
    return [(r["epoch"], r["train_loss"], r["loss_margin_ce"], r["train_acc"], r["val_loss"],
             r["lr"]) for r in metric_rows(config)]


@pytest.mark.slow
def test_a_method_file_trains_resumes_after_kill_9_and_evaluates(make_config, tmp_path):
    settings = dict(method=str(write_toy(tmp_path)), toy_margin=0.3, epochs=3, batch_size=8,
                    lr=1e-3, save_every=1, save_every_minutes=0)
    reference = make_config(save_path=str(tmp_path / "ref/model.pth"),
                            log_path=str(tmp_path / "ref/train.log"), **settings)
    run_script(TRAIN, "--config", write_config(reference, tmp_path / "ref.yml"), env=ONE_THREAD)

    config = make_config(**settings)
    config_file = write_config(config, tmp_path / "run.yml")
    kill_when(TRAIN, config_file, lambda: len(metric_rows(config)) >= 1, "the first epoch")
    state = torch.load(resume_path(config), weights_only=True)
    assert 1 <= state["epoch"] < 3 and not state["finished"], "killed after the last epoch"
    run_script(TRAIN, "--config", config_file, env=ONE_THREAD)

    assert "resuming after epoch" in Path(config["log_path"]).read_text()
    assert len(learned(config)) == 3 and learned(config) == learned(reference)
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert (ours["method"], ours["feature"], ours["config"]["toy_margin"]) == (
        "toy_scaled_margin", {"kind": "toy_scaled"}, 0.3)
    assert ours["module_specs"]["head"]["kind"] == "toy_scaled_head"
    assert ours["epoch"] == theirs["epoch"]
    for mine, other in ((ours["clip_state_dict"], theirs["clip_state_dict"]),
                        (ours["modules"]["head"], theirs["modules"]["head"])):
        assert mine.keys() == other.keys()
        assert all(torch.equal(mine[k], other[k]) for k in other)
    scale = ours["modules"]["head"]["scale"]
    assert not torch.equal(scale, torch.ones_like(scale))  # the method's own module trained

    run_script(EVAL, "--config", config_file)
    report = json.loads(results_json(config["results_dir"], config_file, []).read_text())
    assert report["checkpoint"]["method"] == "toy_scaled_margin"
    assert report["checkpoint"]["feature"] == {"kind": "toy_scaled"}
    assert 0 < report["mean"]["mAP"] <= 100


@pytest.mark.slow
def test_run_all_trains_a_method_file_with_the_generic_train_script(make_config, tmp_path):
    write_toy(tmp_path)
    common = (f"model: tiny\ndata_dir: {make_config()['data_dir']}\nnum_workers: 0\n"
              f"plots: false\nmethod: my_methods/toy.py\nsave_path: {tmp_path / 'toy.pth'}\n")
    (tmp_path / "eval_toy.yml").write_text(f"name: toy\n{common}")
    (tmp_path / "train_toy.yml").write_text(
        f"name: toy\n{common}epochs: 1\nbatch_size: 8\nlr: 1.0e-3\nwarmup_epochs: 0\n"
        f"toy_margin: 0.2\nlog_path: {tmp_path / 'logs/toy.log'}\n")
    out = tmp_path / "summary"
    # Run from tmp_path: the method file is found relative to the working directory.
    proc = run_script("run_all_finetuned_stage1.py", "--configs", tmp_path / "eval_*.yml",
                      "--train", "--set", "num_splits=1", "--set",
                      f"results_dir={tmp_path / 'results'}", "--out", out, cwd=tmp_path,
                      env=ONE_THREAD)
    assert proc.stdout.count("=== training") == 1
    assert torch.load(tmp_path / "toy.pth", weights_only=True)["method"] == "toy_scaled_margin"
    with out.with_suffix(".csv").open() as handle:
        rows = [(r["config"], r["method"], r["variant"]) for r in csv.DictReader(handle)]
    assert rows == [(str(tmp_path / "eval_toy.yml"), "my_methods/toy.py", "finetuned")]


@pytest.mark.slow
@pytest.mark.parametrize("method, file_text, message", [
    ("stage3", None, "method: 'stage3' is neither a built-in method (clip_handid, clipreid, "
                     "stage1) nor a .py file"),
    ("nowhere/toy.py", None, "method: nowhere/toy.py is no .py file"),
    ("empty.py", "LIMIT = 3\n", "method: empty.py must define one Method subclass with a name"),
    ("broken.py", "import no_such_module_here\n",
     "method: cannot import broken.py (ModuleNotFoundError: No module named"),
], ids=["unknown-name", "missing-file", "no-method", "import-error"])
def test_a_bad_method_is_one_line_exit_2(tmp_path, method, file_text, message):
    if file_text is not None:
        (tmp_path / method).write_text(file_text)
    config = tmp_path / "c.yml"
    config.write_text(f"method: {method}\n")
    for script in (TRAIN, EVAL):
        proc = run_script(script, "--config", config, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().count("\n") == 0
        assert message in proc.stderr, proc.stderr
