"""make_model: backbone names, preprocessing, text freezing, identity heads, feature function,
local and missing weights, and the checkpoint format with Stage 1's head (tiny model, CPU)."""
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch

from handreid.model import backbone
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from handreid.checkpoint.model_checkpoint import load_checkpoint, save_checkpoint
from handreid.methods.stage1 import Stage1
from handreid.model.backbone import BNNeck, HandIdModel, build_model, preprocess_spec, resolve_backbone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(**overrides):
    return load_config(None, [("model", "tiny"), *overrides.items()])


def images(n=4, side=64, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- names

@pytest.mark.parametrize("name, expected", [
    ("vitb16", ("ViT-B-16", "openai")), ("vitb32", ("ViT-B-32", "openai")),
    ("rn50", ("RN50", "openai")), ("rn101", ("RN101", "openai")),
    ("vitl14", ("ViT-L-14", "openai")), ("tiny", ("handid_tiny", "none")),
    ("ViT-B-16:laion2b_s34b_b88k", ("ViT-B-16", "laion2b_s34b_b88k")),
])
def test_model_names_map_to_open_clip(name, expected):
    assert resolve_backbone(load_config(None, [("model", name)])) == expected


def test_pretrained_overrides_the_weights_of_the_name(tmp_path):
    assert resolve_backbone(cfg(model="vitb16", pretrained="none")) == ("ViT-B-16", "none")
    assert resolve_backbone(cfg(model="vitb16", pretrained="laion2b_s34b_b88k")) == (
        "ViT-B-16", "laion2b_s34b_b88k")
    local = str(tmp_path / "ViT-B-16.pt")
    assert resolve_backbone(cfg(model="vitb16", pretrained=local)) == ("ViT-B-16", local)


def test_unknown_backbone_is_a_config_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown backbone 'vitb61'.*did you mean 'vitb16'"):
        resolve_backbone(cfg(model="vitb61"))
    with pytest.raises(ConfigError, match=r"unknown backbone 'ViT-B-61'.*'ViT-B-16'"):
        resolve_backbone(cfg(model="ViT-B-61:openai"))


def test_unknown_tag_or_missing_tag_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'opneai' is not an open_clip tag of ViT-B-16.*'openai'"):
        resolve_backbone(cfg(model="ViT-B-16:opneai"))
    with pytest.raises(ConfigError, match=r"'ViT-B-16' names no weights"):
        resolve_backbone(cfg(model="ViT-B-16"))


# ---------------------------------------------------------------- preprocessing

def test_preprocess_spec_reads_configs_without_building(monkeypatch):
    def no_build(*args, **kwargs):
        raise AssertionError("preprocess_spec must not build a model")
    monkeypatch.setattr(open_clip, "create_model", no_build)
    spec = preprocess_spec(cfg(model="vitb16"))
    assert spec == {"image_size": 224, "mean": open_clip.OPENAI_DATASET_MEAN,
                    "std": open_clip.OPENAI_DATASET_STD}
    assert preprocess_spec(cfg(model="vitb16", image_size=256))["image_size"] == 256
    assert preprocess_spec(cfg())["image_size"] == 64
    siglip = preprocess_spec(cfg(model="ViT-B-16-SigLIP:webli"))
    assert siglip["mean"] == siglip["std"] == (0.5, 0.5, 0.5)


# ---------------------------------------------------------------- building

def test_build_freezes_everything_outside_the_image_encoder():
    clip_model, classifier = build_model(cfg(), num_classes=5)
    params = dict(clip_model.named_parameters())
    for name in ("token_embedding.weight", "positional_embedding", "ln_final.weight",
                 "text_projection", "logit_scale", "transformer.resblocks.0.attn.in_proj_weight"):
        assert not params[name].requires_grad, name
    for name, param in params.items():
        assert param.requires_grad == name.startswith("visual."), name
        assert param.dtype == torch.float32, name
    assert all(p.requires_grad for p in classifier.parameters())

    unfrozen, _ = build_model(cfg(), freeze_text=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def stage1(config, clip_model, num_classes):
    """Stage 1's method on `clip_model` with `num_classes` identities."""
    return Stage1(config, clip_model, [f"{i:07d}" for i in range(1, num_classes + 1)])


def test_linear_head_and_features_are_encode_image():
    clip_model, classifier = build_model(cfg(), num_classes=7)
    assert isinstance(classifier, torch.nn.Linear)
    assert (classifier.in_features, classifier.out_features) == (64, 7)
    method = stage1(cfg(), clip_model, 7)
    model = method.model.eval()
    classifier = model.extras["classifier"]
    assert isinstance(classifier, torch.nn.Linear)
    x = images()
    logits, features = method.classify(model, x), model.features(x)
    assert torch.equal(features, clip_model.encode_image(x))
    assert torch.equal(logits, classifier(features))
    assert build_model(cfg())[1] is None
    headless = HandIdModel(clip_model)
    assert headless.feature == {"kind": "embedding"} and not headless.extras
    assert torch.equal(headless(x), clip_model.encode_image(x))


def test_features_train_the_image_encoder_only():
    clip_model, _ = build_model(cfg())
    method = stage1(cfg(), clip_model, 3)
    logits = method.classify(method.model, images())
    logits.sum().backward()
    assert clip_model.visual.conv1.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in clip_model.named_parameters()
               if not n.startswith("visual."))


def test_bnneck_features_are_taken_after_the_batch_norm():
    clip_model, classifier = build_model(cfg(head="bnneck"), num_classes=6)
    assert isinstance(classifier, BNNeck)
    assert classifier.fc.bias is None and not classifier.bn.bias.requires_grad
    method = stage1(cfg(head="bnneck"), clip_model, 6)
    model, classifier = method.model, method.model.extras["classifier"]
    assert isinstance(classifier, BNNeck) and not classifier.bn.bias.requires_grad
    x = images(8)
    method.forward(model, x)  # one training step moves the running statistics away from (0, 1)
    model.eval()
    logits, features = method.classify(model, x), model.features(x)
    raw = clip_model.encode_image(x)
    assert torch.allclose(features, classifier.bn(raw))
    assert not torch.allclose(features, raw)
    assert torch.allclose(logits, classifier.fc(features))


# ---------------------------------------------------------------- weights files

@pytest.mark.parametrize("layout", ["state_dict", "open_clip_training_checkpoint"])
def test_local_open_clip_weights_load_via_pretrained(tmp_path, layout):
    source, _ = build_model(cfg())
    path = tmp_path / "tiny_weights.pth"
    state = source.state_dict()
    if layout == "open_clip_training_checkpoint":  # open_clip's own DDP training output
        state = {"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v
                                                           for k, v in state.items()}}
    torch.save(state, path)
    loaded, _ = build_model(cfg(pretrained=str(path)))
    for name, tensor in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_openai_style_torchscript_archive_loads_as_fp32(tmp_path):
    # OpenAI's .pt files are fp16 TorchScript archives with the attention mask as a plain
    # attribute; script the tiny CLIP the same way.
    source = open_clip.create_model("handid_tiny")
    attn_mask = source.attn_mask
    delattr(source, "attn_mask")  # a buffer no longer, so the next line sets a plain attribute
    source.attn_mask = attn_mask
    path = tmp_path / "tiny-openai.pt"
    torch.jit.save(torch.jit.script(source.half()), str(path))
    loaded, _ = build_model(cfg(pretrained=str(path)))
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.visual.conv1.weight, source.visual.conv1.weight.float())
    resized, _ = build_model(cfg(pretrained=str(path), image_size=96))
    assert resized.visual.positional_embedding.shape[0] == (96 // 8) ** 2 + 1


def test_missing_or_wrong_local_weights_are_user_errors(tmp_path):
    missing = tmp_path / "nowhere" / "ViT-B-16.pt"
    with pytest.raises(UserError, match=f"weights file not found: {missing}"):
        build_model(cfg(model="vitb16", pretrained=str(missing)))
    other = tmp_path / "other.pth"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, other)
    with pytest.raises(UserError, match=f"cannot load {other} into handid_tiny"):
        build_model(cfg(pretrained=str(other)))


def test_unavailable_weights_fail_fast_with_how_to_fix(tmp_path):
    code = textwrap.dedent("""
        from handreid.core.config_files import load_config
        from handreid.core.errors import run_cli
        from handreid.model.backbone import build_model
        run_cli(lambda: build_model(load_config(None, [("model", "vitb16")])) and None)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith("error: pretrained weights 'openai' of ViT-B-16 could not be")
    assert "download ViT-B-16.pt" in error and "set pretrained: /path/to/ViT-B-16.pt" in error
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- checkpoints

@pytest.fixture
def saved(tmp_path):
    """(path, config, clip_model, classifier) of a saved tiny bnneck checkpoint."""
    config = cfg(head="bnneck")
    method = stage1(config, build_model(config)[0], 3)
    method.forward(method.model, images(8))  # non-trivial BN running statistics
    path = tmp_path / "model.pth"
    method.save_checkpoint(path, epoch=4, selection={"metric": "val_accuracy", "value": 66.7,
                                                     "val_accuracy": 66.7})
    return path, config, method.model.clip_model, method.model.extras["classifier"]


def test_checkpoint_round_trip_is_exact(saved):
    path, config, clip_model, classifier = saved
    loaded, ckpt = load_checkpoint(path, config)
    loaded_clip, loaded_head = loaded.clip_model, loaded.extras["classifier"]
    for source, loaded in ((clip_model, loaded_clip), (classifier, loaded_head)):
        expected = source.state_dict()
        assert expected.keys() == loaded.state_dict().keys()
        assert all(torch.equal(expected[k], v) for k, v in loaded.state_dict().items())
    assert {k: ckpt[k] for k in ("format", "format_version", "method", "backbone", "epoch",
                                 "identity_names", "embed_dim", "feature", "module_specs")} == {
        "format": "clip-handid", "format_version": 2, "method": "stage1",
        "backbone": "handid_tiny/none", "epoch": 4,
        "identity_names": ["0000001", "0000002", "0000003"], "embed_dim": 64,
        "feature": {"kind": "bn", "module": "classifier"},
        "module_specs": {"classifier": {"kind": "bnneck", "dim": 64, "num_classes": 3}}}
    assert ckpt["selection"]["val_accuracy"] == 66.7
    assert ckpt["config"] == config
    assert all(p.requires_grad == n.startswith("visual.")
               for n, p in loaded_clip.named_parameters())
    x = images()
    bn = {"kind": "bn", "module": "classifier"}
    assert torch.equal(
        HandIdModel(loaded_clip, {"classifier": loaded_head}, bn).eval().features(x),
        HandIdModel(clip_model, {"classifier": classifier}, bn).eval().features(x))


def test_missing_checkpoint_says_train_first(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found: .*train first: python "
                                        "experiments/train_stage1_frozen_text.py"):
        load_checkpoint(tmp_path / "absent.pth", cfg())


def test_corrupt_and_truncated_checkpoints_are_user_errors(saved):
    path = saved[0]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt, truncated or not a torch file"):
        load_checkpoint(path, saved[1])
    path.write_bytes(b"not a checkpoint at all\n" * 10)
    with pytest.raises(UserError, match="corrupt, truncated or not a torch file"):
        load_checkpoint(path, saved[1])


def test_other_format_or_version_is_refused(saved):
    path, config = saved[0], saved[1]
    torch.save({"state_dict": {}}, path)
    with pytest.raises(UserError, match="is not a clip-handid checkpoint"):
        load_checkpoint(path, config)
    torch.save({"format": "clip-handid", "format_version": 3}, path)
    with pytest.raises(UserError, match="format version 3, this code reads version 2"):
        load_checkpoint(path, config)
    torch.save({"format": "clip-handid", "format_version": 2, "method": "stage1",
                "config": config}, path)
    with pytest.raises(UserError, match="incomplete clip-handid checkpoint .*backbone"):
        load_checkpoint(path, config)


@pytest.mark.parametrize("overrides, message", [
    ({"model": "vitb16"}, r"holds a handid_tiny/none model .* config says model: vitb16"),
    ({"dataset": "hd"}, r"trained on dataset '11k' but the config says dataset: hd"),
    ({"aspect": "palmar_l"}, r"trained on aspect 'dorsal_r' but the config says aspect: palmar_l"),
    ({"image_size": 96}, r"trained at image_size 64 but the config gives 96"),
    ({"head": "linear"}, r"has a bnneck head but the config says head: linear"),
])
def test_checkpoint_of_another_setup_is_refused(saved, overrides, message):
    with pytest.raises(UserError, match=message):
        load_checkpoint(saved[0], cfg(**{"head": "bnneck", **overrides}))


def test_strict_load_reports_key_mismatches(saved):
    path, config = saved[0], saved[1]
    ckpt = torch.load(path, weights_only=True)
    del ckpt["clip_state_dict"]["visual.proj"]
    ckpt["clip_state_dict"]["visual.extra"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(UserError, match=r"CLIP weights do not fit .*1 missing, 1 unexpected"):
        load_checkpoint(path, config)


def test_save_is_atomic_and_keeps_the_old_file_on_failure(saved, monkeypatch):
    path, config, clip_model, classifier = saved
    before = path.read_bytes()

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(backbone.torch, "save", broken_save)
    with pytest.raises(UserError, match=r"cannot write .*model.pth: disk full \(.* GiB free "):
        save_checkpoint(path, HandIdModel(clip_model, {"classifier": classifier}), config,
                        ["a", "b", "c"], 5, "stage1", {})
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]
