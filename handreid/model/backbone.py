"""The CLIP backbone (open_clip_torch), the identity heads, text-tower freezing, and the model
every method trains and evaluation rebuilds: HandIdModel (CLIP, extra modules by name, the
retrieval feature) with the generic module and feature kinds; a method's own kinds live in its
file (handreid/methods/) and are found through the registry. The checkpoint format is
checkpoint/model_checkpoint.py.

`model:` names a backbone: the documents' short names (vitb16 -> ViT-B-16 with OpenAI weights,
...), any open_clip `architecture:pretrained_tag`, or `tiny`, a small random-initialised CLIP
registered from handid_tiny.json beside this file for tests and the demo. `pretrained:` overrides
the weights: an open_clip tag, a local file (OpenAI .pt TorchScript archive, its tensors read
without running its code; open_clip checkpoint or state dict, read with weights_only), or
`none` for random init.

HandIdModel.features() is the one function that turns images into identity features, for
training and for evaluation alike.
"""
import contextlib
import difflib
import logging
import os
from pathlib import Path

import open_clip
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.model import resize_pos_embed
from open_clip.modified_resnet import ModifiedResNet
from torch import nn

from handreid.core import registry
from handreid.core.errors import ConfigError, UserError
from handreid.model import torchscript_weights

# The project's small CLIP for tests and the demo, registered with open_clip by its file stem.
TINY_CONFIG = Path(__file__).resolve().parent / "handid_tiny.json"
TINY_ARCH = TINY_CONFIG.stem
if TINY_ARCH not in open_clip.list_models():
    open_clip.add_model_config(TINY_CONFIG)

SHORT_NAMES = {
    "vitb16": ("ViT-B-16", "openai"),
    "vitb32": ("ViT-B-32", "openai"),
    "rn50": ("RN50", "openai"),
    "rn101": ("RN101", "openai"),
    "vitl14": ("ViT-L-14", "openai"),
    "tiny": (TINY_ARCH, "none"),
}

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
# ---------------------------------------------------------------- names and preprocessing

def _is_path(pretrained):
    """A `pretrained:` value is a file when it looks like one; otherwise it is a tag or none."""
    return (os.sep in pretrained or "/" in pretrained
            or pretrained.lower().endswith(WEIGHT_SUFFIXES) or os.path.isfile(pretrained))


def _did_you_mean(name, candidates):
    by_lower = {c.lower(): c for c in candidates}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=3, cutoff=0.6)
    return f" (did you mean {', '.join(repr(by_lower[c]) for c in close)}?)" if close else ""


def _parse_model(name):
    """`model:` -> (architecture, tag from the name or None)."""
    if name.lower() in SHORT_NAMES:
        return SHORT_NAMES[name.lower()]
    arch, _, tag = name.partition(":")
    if arch not in open_clip.list_models():
        known = list(SHORT_NAMES) + open_clip.list_models()
        raise ConfigError(f"model: unknown backbone '{arch}'{_did_you_mean(arch, known)}; use "
                          f"{', '.join(SHORT_NAMES)} or an open_clip 'architecture:tag' "
                          f"(open_clip.list_pretrained())")
    return arch, tag or None


def _check_tag(arch, tag):
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag.lower() != "none" and not open_clip.is_pretrained_cfg(arch, tag):
        hint = f"known tags: {', '.join(tags)}" if tags else "it has no published weights"
        raise ConfigError(f"pretrained: '{tag}' is not an open_clip tag of {arch}"
                          f"{_did_you_mean(tag, tags)}; {hint}, or give a weights file path "
                          f"or 'none'")


def resolve_backbone(config):
    """-> (open_clip architecture, pretrained): a tag, a local file path, or 'none'.

    `model:` also names the weights family: with `pretrained: <file>` the file is taken as a
    local copy of the weights `model:` names (QuickGELU and mean/std follow that tag)."""
    arch, tag = _parse_model(config["model"])
    pretrained = config["pretrained"] or tag
    if pretrained is None:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        raise ConfigError(f"model: '{arch}' names no weights; write '{arch}:<tag>' "
                          f"(tags: {', '.join(tags) or 'none published'}) or set pretrained: "
                          f"<file> or none")
    if not _is_path(pretrained):
        _check_tag(arch, pretrained)
    return arch, pretrained


def _weights_cfg(config):
    """open_clip's pretrained cfg (mean/std, quick_gelu) of the weights family in use: the
    `pretrained:` tag, or for a local file / random init the tag that `model:` names."""
    arch, pretrained = resolve_backbone(config)
    if _is_path(pretrained) or pretrained.lower() == "none":
        pretrained = _parse_model(config["model"])[1] or "none"
    return open_clip.get_pretrained_cfg(arch, pretrained)


def quick_gelu(config):
    # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use nn.GELU.
    return bool(_weights_cfg(config).get("quick_gelu", False))


def image_size(config, arch):
    """The input size: one side (square) or (height, width); a ResNet takes square inputs
    only (its attention pool's grid is square here)."""
    if config["image_size"] is not None:
        size = config["image_size"]
        if isinstance(size, int):
            return size
        if isinstance(open_clip.get_model_config(arch)["vision_cfg"].get("layers"),
                      (list, tuple)):  # a ResNet's layers are a list of block counts
            raise ConfigError(f"image_size: {size} is not square, and model: {arch} is a "
                              f"ResNet, which takes square inputs here; set image_size: "
                              f"<side>, or use a ViT backbone for [height, width]")
        return tuple(size)
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model: {arch} takes non-square {tuple(size)} inputs; "
                              f"set image_size: <side> for square crops")
        size = size[0]
    return int(size)


# normalize: statistics other than the weights' own (CLIP-ReID's configs use these).
NORMALIZE_STATS = {"half": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
                   "imagenet": (IMAGENET_MEAN, IMAGENET_STD)}


def preprocess_spec(config):
    """Input side and normalisation (normalize: the backbone's own, or NORMALIZE_STATS)."""
    arch, _ = resolve_backbone(config)
    cfg = _weights_cfg(config)
    own = (cfg.get("mean", open_clip.OPENAI_DATASET_MEAN),
           cfg.get("std", open_clip.OPENAI_DATASET_STD))
    mean, std = NORMALIZE_STATS.get(config["normalize"], own)
    return {"image_size": image_size(config, arch), "mean": tuple(mean), "std": tuple(std)}


# ---------------------------------------------------------------- building

class BNNeck(nn.Module):
    """BatchNorm1d with a frozen bias, then a bias-free linear classifier (Luo et al., BNNeck).
    The identity features used for retrieval are the BN output."""

    def __init__(self, dim, num_classes):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        self.bn.bias.requires_grad_(False)
        self.fc = nn.Linear(dim, num_classes, bias=False)

    def forward(self, features):
        return self.fc(self.bn(features))


def make_classifier(head, dim, num_classes, init_std=None):
    """The identity head on `dim`-dimensional image embeddings: linear or bnneck, its
    weights N(0, init_std) when given (see init_classifier)."""
    classifier = BNNeck(dim, num_classes) if head == "bnneck" else nn.Linear(dim, num_classes)
    return init_classifier(classifier, init_std)


def init_classifier(head, std):
    """The classifier Linear of `head` (a Linear or a BNNeck): weights N(0, std), bias 0, as
    CLIP-ReID's weights_init_classifier; std None keeps PyTorch's init. -> head."""
    if std is not None:
        linear = head.fc if isinstance(head, BNNeck) else head
        nn.init.normal_(linear.weight, std=std)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    return head


def freeze_text_tower(clip_model):
    """Train only the image encoder: every parameter outside `.visual` (text transformer,
    token and positional embeddings, ln_final, text_projection, logit_scale/bias) is frozen."""
    for name, param in clip_model.named_parameters():
        param.requires_grad_(name.startswith("visual."))


def embed_dim(config):
    """Width of the backbone's image embedding (the identity feature size)."""
    return open_clip.get_model_config(resolve_backbone(config)[0])["embed_dim"]


def _torchscript_state_dict(path):
    """fp32 state dict of an OpenAI TorchScript archive (fp16 inside), read without running
    the archive's code (torchscript_weights), its non-weight entries dropped."""
    return {k: v.float() for k, v in torchscript_weights.read_state_dict(path).items()
            if k not in ("input_resolution", "context_length", "vocab_size")}


def _state_dict_source(arch):
    """Where the weights of `arch` come as a state dict: open_clip's converted files of its
    OpenAI weights on the hf-hub (for offline users handed a TorchScript archive)."""
    repo = open_clip.get_pretrained_cfg(arch, "openai").get("hf_hub", "").strip("/")
    where = f"the hf-hub repo {repo}" if repo else "open_clip's published weights"
    return (f"open_clip_model.safetensors or open_clip_pytorch_model.bin from {where} "
            f"(the same weights as a state dict)")


@contextlib.contextmanager
def weights_follow():
    """Silence open_clip's 'initialized randomly' warning for a model whose weights we load next."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def create_clip(config, weights=None):
    """The architecture of `config` in fp32 on CPU, random-initialised or with the local file
    `weights` loaded strictly (position embeddings resized to image_size)."""
    arch, _ = resolve_backbone(config)
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"pretrained: weights file not found: {weights} (give the path of a "
                        f"local {arch} weights file, an open_clip tag, or none)")
    jit_archive = weights is not None and torchscript_weights.is_torchscript(weights)
    # bilinear: the weights are read at their own size, then their position embedding is
    # resized as CLIP-ReID does (F.interpolate bilinear, no antialiasing).
    bilinear = config["pos_embed_interpolation"] == "bilinear"
    settings = dict(precision="fp32", device="cpu", jit=False,
                    force_quick_gelu=quick_gelu(config))
    try:
        state = None
        if jit_archive:
            state = _torchscript_state_dict(weights)
        elif weights is not None and bilinear:
            state = open_clip.create_model(arch, pretrained=weights, **settings).state_dict()
        with weights_follow() if state is not None else contextlib.nullcontext():
            model = open_clip.create_model(
                arch, pretrained=None if state is not None else weights,
                force_image_size=image_size(config, arch), **settings)
        if state is not None:
            resize_pos_embed(state, model, **({"interpolation": "bilinear", "antialias": False}
                                             if bilinear else {}))
            model.load_state_dict(state, strict=True)
    except torchscript_weights.ArchiveRefused as err:
        raise UserError(f"pretrained: {weights} is a TorchScript archive that holds more than "
                        f"weights ({err}); nothing of it was run. Use "
                        f"{_state_dict_source(arch)} and set pretrained: to that file") from None
    except Exception as err:
        if weights is None:
            raise
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"pretrained: cannot load {weights} into {arch} ({type(err).__name__}: "
                        f"{reason}); point pretrained: at {arch} weights (OpenAI .pt, open_clip "
                        f"checkpoint or state dict)") from None
    if config["resnet_last_stride"] == 1:
        set_resnet_last_stride_1(model.visual)
    return model


def set_resnet_last_stride_1(visual):
    """CLIP-ReID's ModifiedResNet: layer4 at stride 1 (its first block's anti-aliasing
    average pools removed), so the map is image_size / 16, and the attention pool's
    position embedding bilinearly resized to that map (as CLIP-ReID's resize_pos_embed)."""
    if not isinstance(visual, ModifiedResNet):
        raise ConfigError(f"resnet_last_stride: 1 needs a ResNet backbone (rn50, rn101, ...), "
                          f"got {type(visual).__name__}; remove the key or use model: rn50")
    side = visual.image_size
    if any(length % 32 for length in image_hw(side)):
        raise ConfigError(f"image_size: {side} does not fit a ResNet (the stride-2 network's "
                          f"map is image_size / 32); use a multiple of 32 such as 224")
    first = visual.layer4[0]
    first.avgpool = nn.Identity()
    first.stride = 1
    if first.downsample is not None:
        first.downsample[0] = nn.Identity()  # the AvgPool2d(2) before its 1x1 conv
    pool = visual.attnpool
    old = pool.positional_embedding.data
    grid = round((old.shape[0] - 1) ** 0.5)
    height, width = (side // 16 for side in image_hw(visual.image_size))
    spatial = old[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)
    spatial = nn.functional.interpolate(spatial, size=(height, width), mode="bilinear")
    pool.positional_embedding = nn.Parameter(
        torch.cat([old[:1], spatial.permute(0, 2, 3, 1).reshape(height * width, -1)]))


def image_hw(size):
    """(height, width) of an image size (one side or a pair)."""
    return (size, size) if isinstance(size, int) else tuple(size)


def size_text(size):
    """An image size as a config would write it: 224, or [256, 128]."""
    height, width = image_hw(size)
    return str(height) if height == width else f"[{height}, {width}]"


def _download(arch, tag):
    """Local path of an open_clip tag's weights (downloaded or cached); UserError offline."""
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    try:
        return open_clip.download_pretrained(cfg)
    except Exception as err:
        hub_repo, hub_file = os.path.split(cfg.get("hf_hub", "").rstrip("/"))
        hub_repo, hub_file = (hub_repo, hub_file) if "/" in hub_repo else (
            f"{hub_repo}/{hub_file}".strip("/"), "open_clip_model.safetensors")
        url = cfg.get("url", "")
        filename = os.path.basename(url) if url else hub_file
        source = f"{url} (or the hf-hub repo {hub_repo})" if url else f"the hf-hub repo {hub_repo}"
        raise UserError(f"pretrained weights '{tag}' of {arch} could not be downloaded "
                        f"({type(err).__name__}: no network and no cached copy); on a machine "
                        f"with network download {filename} from {source} and set pretrained: "
                        f"/path/to/{filename}") from None


def build_model(config, num_classes=None, freeze_text=True):
    """-> (clip_model, classifier): the open_clip model with its weights loaded, fp32 on CPU,
    and the identity head (None when num_classes is None, e.g. for the baseline)."""
    arch, pretrained = resolve_backbone(config)
    if _is_path(pretrained):
        clip_model = create_clip(config, pretrained)
    elif pretrained.lower() != "none":
        clip_model = create_clip(config, _download(arch, pretrained))
    else:
        clip_model = create_clip(config)
    if freeze_text:
        freeze_text_tower(clip_model)
    classifier = None
    if num_classes is not None:
        classifier = make_classifier(config["head"], embed_dim(config), num_classes,
                                     config["classifier_init_std"])
    return clip_model, classifier


def _embedding(model, images):
    return model.clip_model.encode_image(images)


def _bn_embedding(model, images):
    return model.extras[model.feature["module"]].bn(model.clip_model.encode_image(images))


# Retrieval feature definitions a checkpoint can name ({"kind": ..., **arguments}); a method
# registers its own (registry), which feature_function finds too.
FEATURE_KINDS = {"embedding": _embedding, "bn": _bn_embedding}

# Modules a checkpoint can hold ({"kind": ..., **constructor arguments}); evaluation rebuilds
# them from the checkpoint alone, without the training code of the method that wrote it. A
# method registers its own kinds (registry), which module_class finds too.
MODULE_KINDS = {"linear": lambda dim, num_classes: nn.Linear(dim, num_classes),
                "bnneck": BNNeck}


def module_class(kind):
    """What builds a module kind: a generic one, or a kind of a method imported so far; None
    for a kind nobody defines."""
    return MODULE_KINDS.get(kind) or registry.module_kind(kind)


def feature_function(kind):
    """The function(model, images) of a feature kind, generic or a method's; None if unknown."""
    return FEATURE_KINDS.get(kind) or registry.feature_kind(kind)


def build_module(spec):
    return module_class(spec["kind"])(**{k: v for k, v in spec.items() if k != "kind"})


def classifier_spec(head, dim, num_classes):
    return {"kind": head, "dim": int(dim), "num_classes": int(num_classes)}


class HandIdModel(nn.Module):
    """CLIP + the method's extra modules by name (`extras`: identity heads, prompts, ...) and
    the retrieval feature definition (default: the image embedding); what training,
    evaluation and export share."""

    def __init__(self, clip_model, extras=None, feature=None):
        super().__init__()
        self.clip_model = clip_model
        self.extras = nn.ModuleDict(extras or {})
        self.feature = dict(feature or {"kind": "embedding"})

    def features(self, images):
        """Identity features per the feature definition (embedding, BN output, ...).
        Gradients flow."""
        return feature_function(self.feature["kind"])(self, images)

    def forward(self, images):
        return self.features(images)
