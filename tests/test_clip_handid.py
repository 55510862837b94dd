"""CLIP-HandID on the tiny model and synthetic 11k: what trains in each inversion mode, the
prompt's text features, the shipped recipe's per-epoch lr, the checkpoint and its evaluation,
run_all with all four methods, exact resume after kill -9, torchrun on gloo, and bad input."""
import csv
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from handreid.checkpoint import model_checkpoint
from handreid.model import backbone
import run_all_finetuned_stage1
from handreid.data.loaders import get_train_val_loaders
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from handreid.evaluation.evaluate import evaluate_config
from conftest import (ROOT, changed, clone, kill_when, learned, metric_lines, run_script,
                      run_torchrun, write_config)
from handreid.train.engine import Engine
from handreid.methods.base import lr_factor
from handreid.train.run_log import metrics_path
from handreid.train.checkpointing import resume_path
from handreid.methods import clip_handid, clipreid
from handreid.methods.clip_handid import ClipHandId
from handreid.train.entry import train_main
from handreid.core.runtime import seed_everything


def main(argv):
    """The ClipHandId train script's main()."""
    return train_main(ClipHandId, '', argv)


TRAIN = "experiments/train_clip_handid.py"
pytestmark = pytest.mark.usefixtures("one_thread")


def handid_config(make_config, **overrides):
    """A small one-phase CLIP-HandID run on the synthetic 11k (13 training identities)."""
    values = dict(method="clip_handid", prompt_template="A photo of a sks hand",
                  placeholder="sks", epochs=2, batch_size=16, sampler="random", lr=1e-3,
                  head_lr_mult=10.0, warmup_epochs=1, warmup_factor=0.01,
                  lr_stepping="epoch", lr_epoch_origin=0, weight_decay_all=True,
                  classifier_init_std=0.001, aug_random_erasing=0.0,
                  selection="val_accuracy", save_every=1, plots=False)
    values.update(overrides)
    return make_config(**values)


def train_in_process(config):
    """-> (method, state before training, state after) of an in-process Engine run."""
    seed_everything(config["seed"])
    train_loader, val_loader, _ = get_train_val_loaders(config)
    method = ClipHandId(config, backbone.build_model(config)[0], train_loader.dataset.classes)
    initial = clone(method.model.state_dict())
    Engine(method, train_loader, config, "cpu", val_loader).train()
    return method, initial, method.model.state_dict()


def text_of_two_images(method):
    method.model.eval()
    with torch.no_grad():
        torch.manual_seed(1)
        proj = clipreid.encode_image_pair(method.model.clip_model.visual,
                                            torch.randn(2, 3, 64, 64))[1]
        return method.text_features(method.model, proj)


@pytest.mark.parametrize("inversion", ["learned", "released"])
def test_what_trains_and_the_text_features_of_each_inversion(make_config, inversion):
    config = handid_config(make_config, inversion=inversion)
    method, initial, final = train_in_process(config)
    text_tower = [k for k in final if k.startswith("clip_model.")
                  and not k.startswith("clip_model.visual.")]
    assert len(text_tower) > 10
    assert all(torch.equal(initial[k], final[k]) for k in text_tower)  # bit-identical
    visual = [k for k in final if k.startswith("clip_model.visual.")]
    assert changed(initial, final, "clip_model.visual.") == set(visual)
    for head in ("extras.neck.", "extras.neck_proj."):
        assert changed(initial, final, head) >= {head + "fc.weight", head + "bn.weight"}
        assert not changed(initial, final, head + "bn.bias")  # BNNeck: BN bias frozen
    text = text_of_two_images(method)
    if inversion == "learned":
        assert changed(initial, final, "extras.inversion.")
        assert not torch.allclose(text[0], text[1], atol=1e-4)
    else:  # the released code: the inversion network stays as initialised ...
        assert not changed(initial, final, "extras.inversion.")
        # ... and every image gets the same text feature (the token's mean is ~0 after LN).
        assert torch.allclose(text[0], text[1], atol=1e-5)
    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert {"loss_id", "loss_i2t", "loss_t2i"} <= set(rows[0]) and "loss_triplet" not in rows[0]

    # The checkpoint rebuilds without method code: both BN features concatenated.
    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert ckpt["method"] == "clip_handid" and set(ckpt["modules"]) == {
        "inversion", "neck", "neck_proj"}
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        pre, proj = clipreid.encode_image_pair(model.clip_model.visual, images)
        want = torch.cat([model.extras["neck"].bn(pre), model.extras["neck_proj"].bn(proj)], 1)
        assert torch.allclose(model.features(images), want, atol=1e-6)
    assert want.shape == (3, 128 + 64)


def test_inversion_network_is_the_papers_shape():
    net = clip_handid.InversionNetwork(512, 512)
    kinds = [type(layer).__name__ for layer in net.net]
    assert kinds == ["Linear", "LayerNorm", "GELU", "Dropout"] * 2 + ["Linear", "LayerNorm"]
    assert (net.net[0].out_features, net.net[3].p, net.net[8].out_features) == (2048, 0.5, 512)


def test_learned_pseudo_word_is_the_prompt_with_that_token():
    """With the placeholder's own embedding, the learned path encodes the literal prompt."""
    torch.manual_seed(0)
    clip_model = backbone.build_model(load_config(None, [("model", "tiny")]))[0].eval()
    tokens, positions = clip_handid.placeholder_prompt(backbone.TINY_ARCH,
                                                      "A photo of a sks hand", "sks")
    word = clip_model.token_embedding(tokens[None])[:, positions]
    with torch.no_grad():
        text = clipreid.encode_tokens_with(clip_model, tokens[None], positions, word)
        assert torch.allclose(text, clip_model.encode_text(tokens[None]), atol=1e-5)


def shipped_lrs(config_file, iters_per_epoch=7):
    """-> [image encoder lr of 1-based epoch 1, 2, ...] of a shipped recipe, read through the
    engine's schedule at every step of each epoch (all must agree)."""
    config = load_config(f"configs/finetuning_clip_handid/{config_file}", [])
    (phase,) = ClipHandId.phases(SimpleNamespace(config=config))
    lrs = []
    for epoch in range(phase.epochs):
        steps = {config["lr"] * lr_factor(epoch * iters_per_epoch + i, iters_per_epoch, phase)
                 for i in range(iters_per_epoch)}
        assert len(steps) == 1, f"epoch {epoch + 1}: lr changes within it"
        lrs.append(steps.pop())
    return lrs, config


@pytest.mark.parametrize("config_file", ["train_vitb16_11k_dorsal_r.yml", "train_rn50_hd.yml"])
def test_recipe_lr_per_epoch_is_clip_handids(config_file):
    lrs, config = shipped_lrs(config_file)
    want = {1: 5.0e-8, 2: 5.45e-7, 5: 2.03e-6, 10: 4.505e-6, **{e: 5e-6 for e in range(11, 41)},
            **{e: 2.5e-6 for e in range(41, 61)}, **{e: 1.25e-6 for e in range(61, 71)}}
    assert len(lrs) == 70
    for epoch, value in want.items():
        assert lrs[epoch - 1] == pytest.approx(value, rel=1e-9), epoch
    assert config["head_lr_mult"] == 10.0 and config["weight_decay"] == 5e-4
    assert config["batch_size"] == (20 if "vitb16" in config_file else 4)


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/finetuning_clip_handid/*.yml")))
def test_shipped_configs_name_their_outputs(path):
    config = load_config(path)
    kind, model, dataset = path.stem.split("_", 2)
    assert (config["method"], config["model"], config["name"], config["normalize"]) == (
        "clip_handid", model, f"clip_handid_{model}_{dataset}", "imagenet")
    assert config["save_path"] == f"saved_models/clip_handid/{model}_{dataset}.pth"
    if kind == "train":
        assert config["resnet_last_stride"] == (1 if model == "rn50" else 2)
        assert (config["inversion"], config["seed"], config["aug_random_erasing"]) == (
            "learned", 42, 0.0)


def test_run_all_trains_it_and_tables_all_four_methods(make_config, tmp_path, capsys,
                                                       tiny_checkpoint):
    common = f"model: tiny\ndata_dir: {make_config()['data_dir']}\nnum_workers: 0\nplots: false\n"
    (tmp_path / "eval_baseline.yml").write_text(f"name: baseline\nvariant: baseline\n{common}")
    for name, method in (("one", "stage1"), ("two", "clipreid"), ("three", "clip_handid")):
        save = f"save_path: {tmp_path / name}.pth\nmethod: {method}\n"
        (tmp_path / f"eval_{name}.yml").write_text(f"name: {name}\n{common}{save}")
    tiny_checkpoint(make_config(), tmp_path / "one.pth")  # Stage 1: already trained
    stage2 = make_config(method="clipreid", prompt_epochs=1, epochs=1, batch_size=16,
                         sampler="pk", name="two", save_path=str(tmp_path / "two.pth"))
    write_config(stage2, tmp_path / "train_two.yml")
    train = handid_config(make_config, name="three", epochs=1,
                          save_path=str(tmp_path / "three.pth"))
    write_config(train, tmp_path / "train_three.yml")
    out = tmp_path / "summary"
    code = run_all_finetuned_stage1.main([
        "--configs", str(tmp_path / "eval_*.yml"), "--train", "--set", "num_splits=1",
        "--set", f"results_dir={tmp_path / 'results'}", "--out", str(out)])
    assert code == 0 and capsys.readouterr().out.count("=== training") == 2
    with out.with_suffix(".csv").open() as handle:
        rows = sorted(r["method"] for r in csv.DictReader(handle))
    assert rows == ["baseline", "clip_handid", "clipreid", "stage1"]
    result = json.loads((tmp_path / "results/three_finetuned.json").read_text())
    assert result["checkpoint"]["method"] == "clip_handid"

    # An eval config of another method on this checkpoint, and the reverse: one line each.
    for config, other, found in (("two", "three", "clip_handid"), ("three", "two", "clipreid")):
        wrong = load_config(tmp_path / f"eval_{config}.yml",
                            [("save_path", str(tmp_path / f"{other}.pth")), ("num_splits", 1)])
        with pytest.raises(UserError, match=f"trained by method '{found}'"):
            evaluate_config(wrong)


@pytest.mark.slow
def test_kill_9_resumes_bit_identically(make_config, tmp_path):
    reference = handid_config(make_config, epochs=4, save_path=str(tmp_path / "ref/m.pth"),
                              log_path=str(tmp_path / "ref/train.log"))
    main(["--config", write_config(reference, tmp_path / "ref.yml")])
    config = handid_config(make_config, epochs=4)
    config_file = write_config(config, tmp_path / "run.yml")
    kill_when(TRAIN, config_file, lambda: metric_lines(config) >= 1, "an epoch")
    state = torch.load(resume_path(config), weights_only=True)
    assert 1 <= state["epoch"] < 4 and not state["finished"]
    main(["--config", config_file])
    assert Path(config["log_path"]).read_text().count("resuming after epoch") == 1
    assert learned(config) == learned(reference)
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    assert all(torch.equal(ours["clip_state_dict"][k], v)
               for k, v in theirs["clip_state_dict"].items())
    for name, module in theirs["modules"].items():
        assert all(torch.equal(ours["modules"][name][k], v) for k, v in module.items()), name


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes(make_config, tmp_path):
    config = handid_config(make_config, epochs=1, batch_size=8)
    run_torchrun(TRAIN, write_config(config, tmp_path / "ddp.yml"))
    assert "2 process(es)" in Path(config["log_path"]).read_text()
    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert ckpt["epoch"] == 1 and ckpt["method"] == "clip_handid"


@pytest.mark.parametrize("overrides, message", [
    ({"placeholder": "handprint"}, "placeholder: 'handprint' is 2 tokens for the"),
    ({"prompt_template": "A photo of a hand"},
     "prompt_template: 'A photo of a hand' holds the placeholder 'sks' 0 times"),
    ({"prompt_template": "sks sks"}, "holds the placeholder 'sks' 2 times"),
    ({"inversion": "mean"}, "inversion"),
    ({"method": "clipreid"}, "this script trains method clip_handid but the config says "
                             "method: clipreid"),
])
def test_bad_settings_are_one_line_errors(make_config, tmp_path, overrides, message):
    config = handid_config(make_config, **{k: v for k, v in overrides.items()
                                           if k != "inversion"})
    path = write_config(config, tmp_path / "bad.yml")
    if "inversion" in overrides:
        proc = run_script(TRAIN, "--config", path, "--set", "inversion=mean", check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "inversion" in proc.stderr and "Traceback" not in proc.stderr
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--config", path])


def test_interaction_network_is_per_sample_and_its_feature_evaluates(make_config):
    config = handid_config(make_config, interaction_network=True, epochs=1)
    method, initial, final = train_in_process(config)
    assert changed(initial, final, "extras.interaction.")
    assert changed(initial, final, "extras.neck_fused.") >= {"extras.neck_fused.fc.weight"}
    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    model.eval()
    assert ckpt["feature"]["kind"] == "clip_handid"
    torch.manual_seed(2)
    batch, others = torch.randn(4, 3, 64, 64), torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        features = model.features(batch)
        mixed = model.features(torch.cat([batch[:1], others[1:]]))
        alone = model.features(batch[:1])
    assert features.shape == (4, 128 + 64 + 64)
    # A sample's feature never depends on the rest of its batch.
    assert torch.allclose(features[0], mixed[0], atol=1e-5)
    assert torch.allclose(features[0], alone[0], atol=1e-5)
    with torch.no_grad():
        pre, proj = clipreid.encode_image_pair(model.clip_model.visual, batch)
    assert torch.allclose(features[:, :128], model.extras["neck"].bn(pre), atol=1e-5)
    result = evaluate_config({**config, "variant": "finetuned", "num_splits": 1})
    assert result["checkpoint"]["feature"]["kind"] == "clip_handid"
