"""CLIP-ReID's recipe mechanisms as general options (issue 15): per-epoch lr stepping of both
schedules against CLIP-ReID's reference numbers, the bias lr factor and weight decay on every
tensor, the classifiers' init, layer4 at stride 1 for a ModifiedResNet."""
import json
from types import SimpleNamespace

import pytest
import torch
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from handreid.checkpoint import model_checkpoint
from handreid.model import backbone
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError
from handreid.methods.base import Phase, decay_groups, lr_factor
from handreid.train.run_log import metrics_path
from finetune_trainer_stage1 import FinetuneTrainerStage1
from handreid.methods.clipreid import ClipReid
from handreid.methods.stage1 import Stage1
from conftest import build

CONFIGS = "configs/finetuning_stage2_clipreid/"


def shipped_lrs(config_file, iters_per_epoch=7):
    """-> {phase name: [lr of 1-based epoch 1, 2, ...]} of a shipped Stage-2 recipe, through
    the engine's own schedule, read at every step of each epoch (all must agree)."""
    config = load_config(CONFIGS + config_file, [])
    phases = ClipReid.phases(SimpleNamespace(config=config))
    base = {"prompts": config["prompt_lr"], "image_encoder": config["lr"]}
    lrs = {}
    for phase in phases:
        per_epoch = []
        for epoch in range(phase.epochs):
            steps = {base[phase.name] * lr_factor(epoch * iters_per_epoch + i, iters_per_epoch,
                                                  phase) for i in range(iters_per_epoch)}
            assert len(steps) == 1, f"{phase.name} epoch {epoch + 1}: lr changes within it"
            per_epoch.append(steps.pop())
        lrs[phase.name] = per_epoch
    return lrs


def test_vit_recipe_lr_per_epoch_is_clipreids():
    lrs = shipped_lrs("train_vitb16_hd.yml")
    image = {1: 9.5e-7, 2: 1.4e-6, 5: 2.75e-6, 10: 5.0e-6, **{e: 5.0e-6 for e in range(11, 30)},
             **{e: 5.0e-7 for e in range(30, 50)}, **{e: 5.0e-8 for e in range(50, 61)}}
    assert len(lrs["image_encoder"]) == 60
    for epoch, want in image.items():
        assert lrs["image_encoder"][epoch - 1] == pytest.approx(want, rel=1e-9), epoch
    prompts = {1: 7.8e-5, 2: 1.46e-4, 5: 3.4851e-4, 6: 3.4785e-4, 10: 3.4405e-4, 30: 2.9889e-4,
               60: 1.7550e-4, 90: 5.2110e-5, 119: 1.0598e-6, 120: 1.0e-6}
    assert len(lrs["prompts"]) == 120
    for epoch, want in prompts.items():  # to the printed digits
        assert lrs["prompts"][epoch - 1] == pytest.approx(want, rel=6e-5), epoch


def test_rn50_recipe_lr_per_epoch_is_cnn_clipreids():
    # cnn_clipreid.yml: STAGE2 3.5e-4, warmup 10 epochs from 0.01, steps [40, 70]; STAGE1
    # 60 epochs, 3.5e-4, warmup 5 from 1e-5, min 1e-6 (values printed by CLIP-ReID's own
    # WarmupMultiStepLR and create_scheduler, stepped as its processors step them).
    lrs = shipped_lrs("train_rn50_hd.yml")
    image = lrs["image_encoder"]
    assert len(image) == 120
    for epoch, want in {1: 3.815e-5, 2: 7.28e-5, 9: 3.1535e-4, 10: 3.5e-4, 39: 3.5e-4,
                        40: 3.5e-5, 69: 3.5e-5, 70: 3.5e-6, 120: 3.5e-6}.items():
        assert image[epoch - 1] == pytest.approx(want, rel=1e-9), epoch
    prompts = lrs["prompts"]
    assert len(prompts) == 60
    for epoch, want in {1: 7.8e-5, 5: 3.44054e-4, 6: 3.41459e-4, 30: 1.7550e-4,
                        59: 1.23915e-6, 60: 1.0e-6}.items():
        assert prompts[epoch - 1] == pytest.approx(want, rel=6e-5), epoch


def test_epoch_origin_0_is_clip_handids_schedule():
    # CLIP-HandID: 0-based epoch e at base x (0.01 + 0.99 e / 10) for e < 10, x0.5 from 40, 60.
    phase = Phase("main", 70, warmup_epochs=10, warmup_start=0.01, scheduler="step",
                  lr_steps=(40, 60), lr_gamma=0.5, lr_stepping="epoch", epoch_origin=0)
    factors = [lr_factor(e * 3, 3, phase) for e in range(70)]
    assert factors[:10] == pytest.approx([0.01 + 0.99 * e / 10 for e in range(10)])
    assert factors[10:40] == pytest.approx([1.0] * 30)
    assert factors[40:60] == pytest.approx([0.5] * 20)
    assert factors[60:] == pytest.approx([0.25] * 10)


def test_iteration_stepping_is_unchanged_by_default():
    phase = Phase.from_config(load_config(None, []))
    assert (phase.lr_stepping, phase.epoch_origin) == ("iteration", 1)
    assert lr_factor(0, 10, phase) != lr_factor(1, 10, phase)  # warmup moves every step


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.in_proj_bias = nn.Parameter(torch.zeros(4))
        self.frozen = nn.Parameter(torch.zeros(4), requires_grad=False)


def test_bias_lr_factor_and_weight_decay_on_every_tensor():
    net = _Net()
    default = decay_groups("enc", net, 1e-3, 1e-4)
    assert [(g["name"], g["lr"], g["weight_decay"], len(g["params"])) for g in default] == [
        ("enc", 1e-3, 1e-4, 1), ("enc_no_decay", 1e-3, 0.0, 4)]
    groups = decay_groups("enc", net, 1e-3, 1e-4, bias_lr_factor=2.0, decay_all=True)
    by_param = {id(p): g for g in groups for p in g["params"]}
    for name, param in net.named_parameters():
        if not param.requires_grad:
            assert id(param) not in by_param
            continue
        group = by_param[id(param)]
        assert group["weight_decay"] == 1e-4, name
        assert group["lr"] == (2e-3 if "bias" in name else 1e-3), name


def test_shipped_stage2_recipe_gives_biases_2x_lr_and_decays_everything(make_config):
    config = make_config(method="clipreid", prompt_epochs=1, epochs=1, bias_lr_factor=2.0,
                         weight_decay_all=True, classifier_init_std=0.001)
    clip_model, _ = backbone.build_model(config)
    method = ClipReid(config, clip_model, [f"id{i}" for i in range(40)])
    image_phase = method.phases()[1]
    for name, param in method.model.named_parameters():
        param.requires_grad_(method.trains(image_phase, name))
    groups = method.param_groups(image_phase)
    names = {id(p): n for n, p in method.model.named_parameters()}
    trained = [p for p in method.model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trained) > 0
    biases = 0
    for group in groups:
        assert group["weight_decay"] == config["weight_decay"] > 0
        for param in group["params"]:
            is_bias = "bias" in names[id(param)]
            biases += is_bias
            assert group["lr"] == config["lr"] * (2.0 if is_bias else 1.0)
    assert biases > 0
    for head in ("neck", "neck_proj"):  # classifiers N(0, 0.001), +-10%
        std = method.model.extras[head].fc.weight.std().item()
        assert 0.0009 < std < 0.0011


def test_classifier_init_std_of_a_stage1_head():
    head = backbone.make_classifier("linear", 256, 100, init_std=0.001)
    assert 0.0009 < head.weight.std().item() < 0.0011 and not head.bias.any()
    default = backbone.make_classifier("linear", 256, 100)
    assert default.weight.std().item() > 0.01


def test_resnet_last_stride_1_doubles_the_map_and_resizes_the_attnpool_grid():
    torch.manual_seed(0)
    visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=24, heads=2, image_size=64,
                            width=8)
    images = torch.randn(2, 3, 64, 64)
    stem = lambda v, x: v.layer4(v.layer3(v.layer2(v.layer1(v.stem(x)))))  # noqa: E731
    with torch.no_grad():
        assert stem(visual, images).shape[2:] == (2, 2)
        old = visual.attnpool.positional_embedding.detach().clone()
        backbone.set_resnet_last_stride_1(visual)
        assert stem(visual, images).shape[2:] == (4, 4)
        assert visual.layer4[0].avgpool.__class__ is nn.Identity
        assert visual.attnpool.positional_embedding.shape == (1 + 16, old.shape[1])
        assert torch.equal(visual.attnpool.positional_embedding[0], old[0])  # the class slot
        assert visual(images).shape == (2, 24)


def test_resnet_last_stride_needs_an_image_size_the_resnet_takes():
    visual = ModifiedResNet(layers=(1, 1, 1, 1), output_dim=24, heads=2, image_size=72,
                            width=8)
    with pytest.raises(ConfigError, match="image_size: 72 does not fit a ResNet"):
        backbone.set_resnet_last_stride_1(visual)


def test_resnet_last_stride_on_a_vit_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="resnet_last_stride: 1 needs a ResNet"):
        backbone.build_model(make_config(resnet_last_stride=1))


def test_selection_last_keeps_the_last_epoch_and_jsonl_lr_is_the_epochs(make_config):
    config = make_config(batch_size=8, epochs=3, warmup_epochs=2, selection="last",
                         lr_stepping="epoch", scheduler="step", lr_steps=[3], lr=1e-4)
    clip_model, classifier, train_loader, val_loader = build(config)
    summary = FinetuneTrainerStage1(clip_model, classifier, train_loader, config, "cpu",
                                    val_loader).train()
    assert summary["best_epoch"] == 3
    assert torch.load(config["save_path"], weights_only=False)["epoch"] == 3
    rows = [json.loads(line) for line in metrics_path(config).read_text().splitlines()]
    assert all(row["val_loss"] is not None for row in rows)  # val/ is still reported
    # Warmup from 0 (Stage 1's Phase), t = 1, 2 of 2, then x0.1 at epoch 3: as trained.
    assert [row["lr"] for row in rows] == pytest.approx([5e-5, 1e-4, 1e-5])


def test_third_triplet_feature_is_clipreids_and_each_feature_moves_the_loss(make_config):
    from handreid.model import losses
    from handreid.methods.clipreid import IMAGE_ENCODER, encode_image_pair

    config = make_config(method="clipreid", triplet_weight=1.0, triplet_intermediate_layer=1)
    torch.manual_seed(0)
    clip_model, _ = backbone.build_model(config)
    method = ClipReid(config, clip_model, [f"id{i}" for i in range(4)])
    method.phase, method.text_features = IMAGE_ENCODER, torch.randn(4, 64)
    images, labels = torch.randn(8, 3, 64, 64), torch.arange(4).repeat(2)
    visual = clip_model.visual
    with torch.no_grad():
        outputs = method.forward(method.model, images)
        pre, proj, *_, (inner,) = outputs
        # The class token after block 1 of 2, before ln_post, as CLIP-ReID's x11[:, 0]: the
        # tokens block 1 puts out when the ViT itself encodes the images.
        block_outputs = []
        hook = visual.transformer.resblocks[0].register_forward_hook(
            lambda block, inputs, output: block_outputs.append(output))
        visual(images)
        hook.remove()
        (tokens,) = block_outputs
        assert torch.allclose(inner, tokens[:, 0], atol=1e-5)
        two = encode_image_pair(visual, images)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(two, (pre, proj)))
        terms, _ = method.loss(Phase(IMAGE_ENCODER, 1), outputs, labels)
        parts = [losses.batch_hard_triplet(f, labels, 0.3, False) for f in (inner, pre, proj)]
    assert all(part > 0 for part in parts)
    assert terms["triplet"] == pytest.approx(sum(parts).item(), rel=1e-5)


def test_intermediate_layer_out_of_range_is_a_config_error(make_config, tmp_path):
    # A ConfigError: the entry script prints it as one line and exits 2 (errors.run_cli).
    from conftest import write_config
    from handreid.methods.clipreid import ClipReid
    from handreid.train.entry import train_main

    def main(argv):
        return train_main(ClipReid, '', argv)

    config = make_config(method="clipreid", triplet_intermediate_layer=2)
    with pytest.raises(ConfigError, match=r"triplet_intermediate_layer: 2 is out of range; "
                                          r".*this ViT has 2\): 1 to 1"):
        main(["--config", write_config(config, tmp_path / "c.yml")])


def test_normalize_chooses_the_statistics_and_evaluation_must_match(make_config, tmp_path,
                                                                    tiny_checkpoint):
    assert backbone.preprocess_spec(make_config())["mean"] == pytest.approx(
        (0.48145466, 0.4578275, 0.40821073))
    assert backbone.preprocess_spec(make_config(normalize="half"))["std"] == (0.5, 0.5, 0.5)
    assert backbone.preprocess_spec(make_config(normalize="imagenet"))["mean"] == (
        0.485, 0.456, 0.406)
    tiny_checkpoint(make_config(), tmp_path / "m.pth")
    with pytest.raises(backbone.UserError, match="trained with normalize: clip"):
        model_checkpoint.load_checkpoint(tmp_path / "m.pth", make_config(normalize="half"))


@pytest.mark.slow
def test_a_stride_1_resnet_checkpoint_is_rebuilt_with_its_own_stride(make_config, tmp_path):
    config = make_config(model="rn50", pretrained="none", image_size=64, resnet_last_stride=1)
    clip_model, _ = backbone.build_model(config)
    assert clip_model.visual.attnpool.positional_embedding.shape[0] == 1 + 4 * 4
    stage1 = Stage1(config, clip_model, ["a", "b", "c"])
    stage1.save_checkpoint(tmp_path / "rn.pth", epoch=1)
    # The eval config need not repeat the key: the network is the checkpoint's.
    model, _ = model_checkpoint.load_checkpoint(tmp_path / "rn.pth",
                                          make_config(model="rn50", image_size=64))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.eval().features(images),
                              stage1.model.eval().features(images), atol=1e-5)
