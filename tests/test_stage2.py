"""Stage 2 (CLIP-ReID for hands) on the tiny model and synthetic 11k: the model pieces (prompt
learner, two-feature image encoder), what each phase trains, the checkpoint and its evaluation,
exact resume after kill -9 in either phase, torchrun on gloo, the run_all table with all three
methods, and bad input."""
import csv
import functools
import json
import re
from pathlib import Path

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet

from handreid.checkpoint import model_checkpoint
from handreid.model import backbone
from handreid.data.loaders import get_train_val_loaders
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from conftest import (ROOT, changed, clone, kill_when, learned, metric_lines, run_torchrun,
                      write_config)
from handreid.train.engine import Engine
from handreid.train.run_log import metrics_path
from handreid.train.checkpointing import resume_path
from handreid.evaluation.evaluate import evaluate_config
import run_all_finetuned_stage1
from handreid.methods import clipreid
from handreid.methods.clipreid import ClipReid
from handreid.train.entry import train_main
from handreid.core.runtime import seed_everything


def main(argv):
    """The ClipReid train script's main()."""
    return train_main(ClipReid, '', argv)


TEMPLATE = "A photo of a X X X X hand."
TRAIN = "experiments/train_stage2_clipreid.py"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    clip_model, _ = backbone.build_model(load_config(None, [("model", "tiny")]))
    return clip_model.eval()


def test_prompt_learner_is_the_text_tower_on_its_tokens(tiny):
    learner = clipreid.PromptLearner(backbone.TINY_ARCH, TEMPLATE, num_classes=3,
                                       width=tiny.token_embedding.embedding_dim)
    assert learner.context.shape == (3, 4, tiny.token_embedding.embedding_dim)
    literal = backbone.open_clip.get_tokenizer(backbone.TINY_ARCH)([TEMPLATE])
    with torch.no_grad():
        # Learned tokens equal to the embedding of the word X give the literal template.
        learner.context[1] = tiny.token_embedding(literal)[0, learner.positions]
        assert torch.allclose(learner(tiny, torch.tensor([1])), tiny.encode_text(literal),
                              atol=1e-5)
        other = learner(tiny, torch.tensor([0, 2]))
    assert other.shape == (2, tiny.text_projection.shape[1])
    assert not torch.allclose(other[0], other[1])


@pytest.mark.parametrize("template", ["A photo of a hand.", "A photo of a x x hand.",
                                      "A photo of an Xray hand."])
def test_template_without_placeholder_is_a_config_error(template):
    with pytest.raises(ConfigError, match="no X placeholder"):
        clipreid.template_tokens(backbone.TINY_ARCH, template)


def test_template_that_does_not_fit_the_context_is_a_config_error():
    with pytest.raises(ConfigError, match="shorten or reword"):
        clipreid.template_tokens(backbone.TINY_ARCH, "a hand " * 40 + "X.")


def test_image_pair_vit_projects_the_pre_projection_feature(tiny):
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre, proj = clipreid.encode_image_pair(tiny.visual, images)
        assert torch.allclose(proj, tiny.encode_image(images), atol=1e-5)
    assert (pre.shape[1], proj.shape[1]) == clipreid.image_pair_dims(tiny.visual) == (128, 64)


def test_image_pair_modified_resnet_pools_layer4_and_attention():
    # A narrow ModifiedResNet (the RN50 class) keeps this fast; widths as in RN50: 32x width.
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=24, heads=2, image_size=64,
                            width=8).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        pre, proj = clipreid.encode_image_pair(visual, images)
        assert torch.allclose(proj, visual(images), atol=1e-5)
    assert (pre.shape[1], proj.shape[1]) == clipreid.image_pair_dims(visual) == (256, 24)


# ---------------------------------------------------------------- training (engine method)

def stage2_config(make_config, tmp_path, **overrides):
    """A small two-phase Stage-2 run on the synthetic 11k (13 training identities)."""
    values = dict(method="clipreid", prompt_epochs=2, prompt_batch_size=16, prompt_lr=1e-2,
                  prompt_warmup_epochs=1, epochs=2, batch_size=16, sampler="pk",
                  num_instances=4, lr=1e-3, head_lr_mult=1.0, warmup_epochs=1,
                  triplet_weight=1.0, save_every=1, plots=False)
    values.update(overrides)
    return make_config(**values)


class Recording(ClipReid):
    """ClipReid that keeps a copy of the model's state when each phase starts."""

    def start_phase(self, phase, train_loader, device):
        self.at_start = getattr(self, "at_start", {})
        self.at_start[phase.name] = clone(self.model.state_dict())
        return super().start_phase(phase, train_loader, device)


def test_phases_train_only_their_parts_and_the_checkpoint_holds_the_prompts(make_config,
                                                                             tmp_path):
    config = stage2_config(make_config, tmp_path)
    seed_everything(config["seed"])
    train_loader, val_loader, _ = get_train_val_loaders(config)
    clip_model, _ = backbone.build_model(config)
    method = Recording(config, clip_model, train_loader.dataset.classes)
    initial = clone(method.model.state_dict())
    summary = Engine(method, train_loader, config, "cpu", val_loader).train()
    prompts_done, final = method.at_start["image_encoder"], method.model.state_dict()

    # Phase 1: the prompt tokens and nothing else.
    assert changed(initial, prompts_done, "extras.prompt_learner.") == {
        "extras.prompt_learner.context"}
    for prefix in ("clip_model.", "extras.neck.", "extras.neck_proj."):
        assert not changed(initial, prompts_done, prefix), prefix
    # Phase 2: image encoder and both heads; prompts and text tower bit-identical.
    visual = changed(prompts_done, final, "clip_model.visual.")
    assert len(visual) == len([k for k in final if k.startswith("clip_model.visual.")])
    assert changed(prompts_done, final, "extras.neck.") and \
        changed(prompts_done, final, "extras.neck_proj.")
    assert not changed(prompts_done, final, "extras.prompt_learner.")
    text_tower = [k for k in final if k.startswith("clip_model.")
                  and not k.startswith("clip_model.visual.")]
    assert len(text_tower) > 10 and not changed(prompts_done, final, "clip_model.") - visual

    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert [(r["phase"], r["epoch"]) for r in rows] == [
        ("prompts", 1), ("prompts", 2), ("image_encoder", 3), ("image_encoder", 4)]
    assert {"loss_i2t", "loss_t2i"} <= set(rows[0]) and rows[0]["val_loss"] is None
    assert {"loss_id", "loss_triplet", "loss_i2t"} <= set(rows[2])
    assert rows[2]["val_loss"] is not None and summary["best_epoch"] in (3, 4)

    ckpt = torch.load(config["save_path"], weights_only=True)
    assert ckpt["method"] == "clipreid" and ckpt["feature"]["kind"] == "clipreid"
    prompt_keys = [f"modules.{m}.{k}" for m, state in ckpt["modules"].items() for k in state
                   if "prompt" in f"{m}.{k}"]
    assert "modules.prompt_learner.context" in prompt_keys
    assert torch.equal(ckpt["modules"]["prompt_learner"]["context"],
                       prompts_done["extras.prompt_learner.context"])

    # Evaluation rebuilds the model from the checkpoint alone: the concatenated feature.
    model, _ = model_checkpoint.load_checkpoint(config["save_path"], config)
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        features = model.features(images)
        pre, proj = clipreid.encode_image_pair(model.clip_model.visual, images)
    assert features.shape == (3, 128 + 64)
    assert torch.allclose(features, torch.cat([pre, proj], 1))
    model.feature["neck_feat"] = "after"  # the features after each head's BN
    with torch.no_grad():
        after = torch.cat([model.extras["neck"].bn(pre), model.extras["neck_proj"].bn(proj)], 1)
        assert torch.allclose(model.features(images), after, atol=1e-6)

    # prompt_epochs: 0 starts phase 2 from these prompts.
    again = stage2_config(make_config, tmp_path, prompt_epochs=0,
                          prompt_checkpoint=config["save_path"])
    reused = ClipReid(again, backbone.build_model(again)[0], train_loader.dataset.classes)
    assert [phase.name for phase in reused.phases()] == ["image_encoder"]
    assert torch.equal(reused.model.extras["prompt_learner"].context,
                       ckpt["modules"]["prompt_learner"]["context"])


@pytest.mark.slow
def test_kill_9_in_each_phase_resumes_bit_identically(make_config, tmp_path):
    # Under the shipped recipe's CLIP-ReID mechanisms (per-epoch lr, bias lr x2, decay on all
    # tensors, classifier init, pixel erasing, the last epoch kept, three triplet features).
    settings = dict(prompt_epochs=4, epochs=3, lr_stepping="epoch", bias_lr_factor=2.0,
                    weight_decay_all=True, classifier_init_std=0.001, aug_erasing_fill="pixel",
                    selection="last", triplet_intermediate_layer=1)
    reference = stage2_config(make_config, tmp_path, save_path=str(tmp_path / "ref/m.pth"),
                              log_path=str(tmp_path / "ref/train.log"), **settings)
    main(["--config", write_config(reference, tmp_path / "ref.yml")])

    config = stage2_config(make_config, tmp_path, **settings)
    config_file = write_config(config, tmp_path / "run.yml")
    kill_when(TRAIN, config_file, lambda: metric_lines(config) >= 1, "a phase-1 epoch")
    state = torch.load(resume_path(config), weights_only=True)
    assert state["phase"] == 0 and 1 <= state["epoch"] < 4, "killed outside phase 1"
    kill_when(TRAIN, config_file, lambda: metric_lines(config) >= 5, "a phase-2 epoch")
    state = torch.load(resume_path(config), weights_only=True)
    assert state["phase"] == 1 and 5 <= state["epoch"] < 7 and not state["finished"]

    main(["--config", config_file])
    assert Path(config["log_path"]).read_text().count("resuming after epoch") == 2
    assert learned(config) == learned(reference)
    ours = torch.load(config["save_path"], weights_only=True)
    theirs = torch.load(reference["save_path"], weights_only=True)
    assert ours["epoch"] == theirs["epoch"]
    assert all(torch.equal(ours["clip_state_dict"][k], theirs["clip_state_dict"][k])
               for k in theirs["clip_state_dict"])
    for name, module in theirs["modules"].items():
        assert all(torch.equal(ours["modules"][name][k], v) for k, v in module.items()), name


@pytest.mark.slow
def test_torchrun_with_two_gloo_processes_runs_both_phases(make_config, tmp_path):
    config = stage2_config(make_config, tmp_path, prompt_epochs=1, epochs=1, batch_size=8,
                           prompt_batch_size=8)
    run_torchrun(TRAIN, write_config(config, tmp_path / "ddp.yml"))
    log_text = Path(config["log_path"]).read_text()
    assert "2 process(es)" in log_text
    # 52 train images: 26 rows of the feature table per process, 4 batches of up to 8.
    assert "phase prompts: 1 epochs, 4 steps per epoch" in log_text
    assert [phase for _, phase, *_ in learned(config)] == ["prompts", "image_encoder"]
    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    assert ckpt["epoch"] == 2 and ckpt["method"] == "clipreid"


def test_run_all_trains_stage2_and_tables_all_three_methods(make_config, tmp_path, capsys,
                                                             tiny_checkpoint):
    common = f"model: tiny\ndata_dir: {make_config()['data_dir']}\nnum_workers: 0\nplots: false\n"
    (tmp_path / "eval_baseline.yml").write_text(f"name: baseline\nvariant: baseline\n{common}")
    for name, method in (("one", "stage1"), ("two", "clipreid")):
        save = f"save_path: {tmp_path / name}.pth\nmethod: {method}\n"
        (tmp_path / f"eval_{name}.yml").write_text(f"name: {name}\n{common}{save}")
    tiny_checkpoint(make_config(), tmp_path / "one.pth")  # Stage 1: already trained
    train = stage2_config(make_config, tmp_path, name="two", prompt_epochs=1, epochs=1,
                          save_path=str(tmp_path / "two.pth"))
    write_config(train, tmp_path / "train_two.yml")
    out = tmp_path / "summary"
    code = run_all_finetuned_stage1.main([
        "--configs", str(tmp_path / "eval_*.yml"), "--train", "--set", "num_splits=1",
        "--set", f"results_dir={tmp_path / 'results'}", "--out", str(out)])
    assert code == 0 and capsys.readouterr().out.count("=== training") == 1
    with out.with_suffix(".csv").open() as handle:
        rows = [(r["method"], r["variant"]) for r in csv.DictReader(handle)]
    assert rows == [("baseline", "baseline"), ("stage1", "finetuned"),
                    ("clipreid", "finetuned")]
    assert "| config | method | model |" in out.with_suffix(".md").read_text()
    result = json.loads((tmp_path / "results/two_finetuned.json").read_text())
    assert result["checkpoint"]["method"] == "clipreid"
    assert result["checkpoint"]["feature"]["kind"] == "clipreid"

    # An eval config of one method pointed at the other's checkpoint: one line naming it.
    for config, other, found in (("two", "one", "stage1"), ("one", "two", "clipreid")):
        wrong = load_config(tmp_path / f"eval_{config}.yml",
                            [("save_path", str(tmp_path / f"{other}.pth")), ("num_splits", 1)])
        with pytest.raises(UserError, match=f"trained by method '{found}'"):
            evaluate_config(wrong)


@pytest.mark.parametrize("overrides, message", [
    ({"prompt_template": "A photo of a hand."},
     "prompt_template: 'A photo of a hand.' has no X placeholder"),
    ({"num_instances": 5}, "num_instances: 5 must be at least 1 and divide batch_size"),
    ({"batch_size": 64}, "sampler: pk needs 16 distinct identities per step"),
    ({"prompt_epochs": 0}, "prompt_epochs: 0 skips learning the prompts; set "
                           "prompt_checkpoint:"),
    ({"method": "stage1"}, "this script trains method clipreid but the config says method: "
                           "stage1"),
])
def test_bad_settings_are_one_line_errors(make_config, tmp_path, overrides, message):
    config = stage2_config(make_config, tmp_path, **overrides)
    with pytest.raises(ConfigError, match=re.escape(message)):
        main(["--config", write_config(config, tmp_path / "bad.yml")])


def test_prompts_from_a_checkpoint_without_prompts_is_an_error(make_config, tmp_path,
                                                               tiny_checkpoint):
    tiny_checkpoint(make_config(), tmp_path / "s1.pth")
    config = stage2_config(make_config, tmp_path, prompt_epochs=0,
                           prompt_checkpoint=str(tmp_path / "s1.pth"))
    with pytest.raises(UserError, match=re.escape(
            f"prompt_checkpoint: {tmp_path / 's1.pth'} holds no learned prompts (it is a "
            f"stage1 checkpoint); point it at a clipreid checkpoint")):
        main(["--config", write_config(config, tmp_path / "s2.yml")])


@functools.cache
def image_encoder(arch):
    """An untrained open_clip image encoder of `arch`: the depth a recipe's layer resolves in."""
    import open_clip

    return open_clip.create_model(arch).visual


@pytest.mark.parametrize("path", sorted(
    ROOT.glob("configs/finetuning_stage2_clipreid/train_*.yml")))
def test_train_configs_name_their_outputs_and_follow_clipreid(path):
    config = load_config(path)
    model, _, dataset = path.stem.removeprefix("train_").partition("_")
    assert (config["method"], config["model"], config["name"]) == (
        "clipreid", model, f"stage2_{model}_{dataset}")
    assert config["save_path"] == f"saved_models/stage2_clipreid/{model}_{dataset}.pth"
    assert config["log_path"] == f"logs/stage2_clipreid/{model}_{dataset}.log"
    assert (config["sampler"], config["num_instances"], config["batch_size"]) == ("pk", 4, 64)
    assert (config["prompt_lr"], config["prompt_batch_size"], config["prompt_warmup_epochs"],
            config["prompt_warmup_lr"], config["prompt_min_lr"]) == (3.5e-4, 64, 5, 1e-5, 1e-6)
    assert (config["triplet_weight"], config["i2t_loss_weight"], config["neck_feat"]) == (
        1.0, 1.0, "before")
    assert (config["prompt_epochs"], config["epochs"], config["lr"], config["id_loss_weight"],
            config["lr_steps"], config["warmup_factor"]) == (
        (120, 60, 5e-6, 0.25, [30, 50], 0.1) if model == "vitb16" else
        (60, 120, 3.5e-4, 1.0, [40, 70], 0.01))
    assert (config["lr_stepping"], config["lr_epoch_origin"], config["bias_lr_factor"],
            config["weight_decay_all"], config["classifier_init_std"],
            config["aug_erasing_fill"], config["selection"]) == (
        "epoch", 1, 2.0, True, 0.001, "pixel", "last")
    # The recipe's depth-free value (-1) names CLIP-ReID's block 11 of ViT-B/16, layer3 of RN50.
    layer = clipreid.check_intermediate_layer(
        image_encoder("ViT-B-16" if model == "vitb16" else "RN50"),
        config["triplet_intermediate_layer"])
    assert (layer, config["resnet_last_stride"]) == ((11, 2) if model == "vitb16" else (3, 1))
    assert config["prompt_template"] == TEMPLATE and "CLIP-ReID" in path.read_text()
