"""The CLIP backbone (open_clip_torch), the identity heads, text-tower freezing, and the model
parts of each method (modules and retrieval features that evaluation rebuilds; each method is
declared in method_registry beside them). The checkpoint format is checkpoint_format.py.

`model:` names a backbone: the documents' short names (vitb16 -> ViT-B-16 with OpenAI weights,
...), any open_clip `architecture:pretrained_tag`, or `tiny`, a small random-initialised CLIP
registered from handid_tiny.json beside this file for tests and the demo. `pretrained:` overrides
the weights: an open_clip tag, a local file (OpenAI .pt TorchScript archive, open_clip
checkpoint or state dict), or `none` for random init.

HandIdModel.features() is the one function that turns images into identity features, for
training and for evaluation alike.
"""
import contextlib
import difflib
import functools
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.model import resize_pos_embed
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from handreid.core import registry
from handreid.core.errors import ConfigError, UserError

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

registry.declare("stage1",
                        "python experiments/train_stage1_frozen_text.py --config <train config>")


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


def _is_torchscript(path):
    # OpenAI's released .pt files are TorchScript archives (a zip holding constants.pkl); torch
    # refuses them with weights_only=True and hands them to torch.jit.load otherwise.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("constants.pkl") for name in archive.namelist())


def _torchscript_state_dict(path):
    """fp32 state dict of an OpenAI TorchScript archive (fp16 inside), the archive's
    non-weight entries dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still needed
        archive = torch.jit.load(str(path), map_location="cpu")
    return {k: v.float() for k, v in archive.state_dict().items()
            if k not in ("input_resolution", "context_length", "vocab_size")}


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
    jit_archive = weights is not None and _is_torchscript(weights)
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


# Retrieval feature definitions a checkpoint can name ({"kind": ..., **arguments}).
FEATURE_KINDS = {"embedding": _embedding, "bn": _bn_embedding}

# Modules a checkpoint can hold ({"kind": ..., **constructor arguments}); evaluation rebuilds
# them from the checkpoint alone, without the code of the method that trained them.
MODULE_KINDS = {"linear": lambda dim, num_classes: nn.Linear(dim, num_classes),
                "bnneck": BNNeck}


def build_module(spec):
    return MODULE_KINDS[spec["kind"]](**{k: v for k, v in spec.items() if k != "kind"})


def classifier_spec(head, dim, num_classes):
    return {"kind": head, "dim": int(dim), "num_classes": int(num_classes)}


def default_feature(classifier):
    """Stage 1's retrieval feature: the BN output for a bnneck head, else the embedding."""
    return ({"kind": "bn", "module": "classifier"} if isinstance(classifier, BNNeck)
            else {"kind": "embedding"})


class HandIdModel(nn.Module):
    """CLIP + the method's extra modules by name (`extras`: identity heads, prompts, ...) and
    the retrieval feature definition; what training, evaluation and export share.

    `classifier` is the Stage-1 shorthand for extras["classifier"]."""

    def __init__(self, clip_model, classifier=None, extras=None, feature=None):
        super().__init__()
        self.clip_model = clip_model
        self.extras = nn.ModuleDict(extras or {})
        if classifier is not None:
            self.extras["classifier"] = classifier
        self.feature = dict(feature or default_feature(classifier))

    @property
    def classifier(self):
        return self.extras["classifier"] if "classifier" in self.extras else None

    def features(self, images):
        """Identity features per the feature definition (embedding, BN output, ...).
        Gradients flow."""
        return FEATURE_KINDS[self.feature["kind"]](self, images)

    def forward(self, images):
        """-> (logits of the identity head or None, features)."""
        features = self.features(images)
        classifier = self.classifier
        if classifier is None:
            return None, features
        fc = classifier.fc if isinstance(classifier, BNNeck) else classifier
        return fc(features), features


# ---------------------------------------------------------------- stage 2 (CLIP-ReID)
# Stage 2 learns one set of text tokens per training identity ("A photo of a X X X X hand.",
# each X a learnable token) against the frozen encoders, then trains the image encoder with
# two BNNeck heads and an image-to-text loss against those identities' text features
# (Li et al., CLIP-ReID, AAAI 2023). Its modules and its retrieval feature live here so that
# evaluation rebuilds a Stage-2 checkpoint without importing the trainer.

PROMPT_PLACEHOLDER = re.compile(r"(?<![\w-])X(?![\w-])")


def template_tokens(arch, template):
    """-> (token ids of `template` [context_length], positions of its X placeholders).
    Each standalone upper-case X is one learnable token; ConfigError without any."""
    count = len(PROMPT_PLACEHOLDER.findall(template))
    if count == 0:
        raise ConfigError(f"prompt_template: {template!r} has no X placeholder; write each "
                          f"learnable token as a standalone X, e.g. 'A photo of a X X X X hand.'")
    tokenizer = open_clip.get_tokenizer(arch)
    tokens = tokenizer([template])[0]
    placeholder = tokenizer(["X"])[0][1]
    positions = (tokens == placeholder).nonzero().flatten()
    if len(positions) != count or tokens[-1] != 0:
        raise ConfigError(f"prompt_template: {template!r} does not tokenize into {count} "
                          f"placeholder tokens within the {len(tokens)}-token context (is it too "
                          f"long, or is a lower-case 'x' a word of it?); shorten or reword it")
    return tokens, positions


def check_text_tower(clip_model, config):
    """Stage 2 runs open_clip's built-in CLIP text tower on token embeddings directly."""
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final",
              "text_projection", "attn_mask")
    if not all(hasattr(clip_model, name) for name in needed):
        raise ConfigError(f"model: {config['model']} ({type(clip_model).__name__}) has no "
                          f"CLIP-style text tower that Stage 2 can feed learned tokens to; use "
                          f"an OpenAI-style CLIP backbone such as vitb16 or rn50")


class PromptLearner(nn.Module):
    """Per-identity learnable tokens in a text template, encoded by the CLIP text tower.

    Holds only the learned tokens (`context`: identities x placeholders x token width) and the
    tokenized template; the frozen text tower is passed in, so it is stored once (in the
    CLIP weights) and the prompts always meet the tower they were learned with."""

    def __init__(self, arch, template, num_classes, width):
        super().__init__()
        tokens, positions = template_tokens(arch, template)
        self.register_buffer("tokens", tokens)
        self.register_buffer("positions", positions)
        self.context = nn.Parameter(torch.empty(num_classes, len(positions), width))
        nn.init.normal_(self.context, std=0.02)  # CLIP-ReID's (and CoOp's) init

    def forward(self, clip_model, labels):
        """Text features (projected, not normalised) of the identities `labels`."""
        return encode_tokens_with(clip_model, self.tokens.expand(len(labels), -1),
                                  self.positions, self.context[labels])


def encode_tokens_with(clip_model, tokens, positions, inserted):
    """Text features (projected, not normalised) of the token ids `tokens` [B, context]
    whose embeddings at `positions` are replaced by `inserted` [B, len(positions), width];
    gradients flow into `inserted` through the (frozen) text tower."""
    cast_dtype = clip_model.transformer.get_cast_dtype()
    x = clip_model.token_embedding(tokens).to(cast_dtype)
    x = x.index_copy(1, positions, inserted.to(cast_dtype))
    x = x + clip_model.positional_embedding.to(cast_dtype)
    x = clip_model.ln_final(clip_model.transformer(x, attn_mask=clip_model.attn_mask))
    x = text_global_pool(x, tokens, clip_model.text_pool_type,
                         eos_token_id=getattr(clip_model, "text_eos_id", None))
    if isinstance(clip_model.text_projection, nn.Linear):
        return clip_model.text_projection(x)
    return x @ clip_model.text_projection


def _unsupported_encoder(visual):
    return ConfigError(f"Stage 2 needs an open_clip VisionTransformer or ModifiedResNet image "
                       f"encoder, got {type(visual).__name__}; use a CLIP backbone such as "
                       f"vitb16 or rn50")


def encode_image_pair(visual, images, intermediate=None):
    """-> (pre-projection feature, projected feature) of open_clip's image encoder, the two
    features CLIP-ReID puts its BNNecks on. ViT: the pooled class token after ln_post, and
    that times `proj`. ModifiedResNet: the spatial mean of layer4, and the attention pool.
    With `intermediate` (see check_intermediate_layer) a third feature, CLIP-ReID's extra
    triplet feature: ViT the class token after that many transformer blocks (before
    ln_post), ModifiedResNet the spatial mean of layer `intermediate`."""
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(images)
        maps = []
        for layer in (visual.layer1, visual.layer2, visual.layer3, visual.layer4):
            x = layer(x)
            maps.append(x)
        pair = (x.mean(dim=(2, 3)), visual.attnpool(x))
        return pair if intermediate is None else (*pair, maps[intermediate - 1].mean(dim=(2, 3)))
    if isinstance(visual, VisionTransformer):
        if intermediate is None:
            pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
            return pooled, pooled if visual.proj is None else pooled @ visual.proj
        transformer = visual.transformer
        x = visual._embeds(images)
        x = x if transformer.batch_first else x.transpose(0, 1)
        for index, block in enumerate(transformer.resblocks, 1):
            x = block(x)
            if index == intermediate:
                inner = (x if transformer.batch_first else x.transpose(0, 1))[:, 0]
        pooled, _ = visual._pool(x if transformer.batch_first else x.transpose(0, 1))
        return pooled, pooled if visual.proj is None else pooled @ visual.proj, inner
    raise _unsupported_encoder(visual)


def check_intermediate_layer(visual, layer):
    """ConfigError unless `layer` names an intermediate feature encode_image_pair can give:
    ViT 1 .. blocks - 1 (CLIP-ReID: blocks - 1), ModifiedResNet 1 .. 3 (CLIP-ReID: 3)."""
    if layer is None:
        return
    resnet = isinstance(visual, ModifiedResNet)
    if not resnet and not isinstance(visual, VisionTransformer):
        raise _unsupported_encoder(visual)
    top = 3 if resnet else len(visual.transformer.resblocks) - 1
    if not 1 <= layer <= top:
        what = "ResNet layer (layer1..layer3)" if resnet else \
            f"number of transformer blocks (this ViT has {top + 1})"
        raise ConfigError(f"triplet_intermediate_layer: {layer} is out of range; give a {what}: "
                          f"1 to {top} (CLIP-ReID: {top}), or leave it out")


def image_pair_dims(visual):
    """Widths of encode_image_pair's two features, without running the encoder."""
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool.k_proj.in_features, visual.attnpool.c_proj.out_features
    if isinstance(visual, VisionTransformer):
        width = visual.ln_post.normalized_shape[0]
        return width, width if visual.proj is None else visual.proj.shape[1]
    raise _unsupported_encoder(visual)


def clipreid_module_specs(config, clip_model, num_classes):
    """Stage 2's modules: the identities' prompts and a BNNeck head on each image feature."""
    check_text_tower(clip_model, config)
    pre_dim, proj_dim = image_pair_dims(clip_model.visual)
    return {"prompt_learner": {"kind": "prompt_learner", "arch": resolve_backbone(config)[0],
                               "template": config["prompt_template"],
                               "num_classes": int(num_classes),
                               "width": clip_model.token_embedding.embedding_dim},
            "neck": classifier_spec("bnneck", pre_dim, num_classes),
            "neck_proj": classifier_spec("bnneck", proj_dim, num_classes)}


def clipreid_feature(config):
    return {"kind": "clipreid", "neck_feat": config["neck_feat"], "modules": ["neck", "neck_proj"]}


def _clipreid_embedding(model, images):
    """CLIP-ReID's retrieval feature: both image features (neck_feat: before or after their
    BNNeck's BN), concatenated; raw, as every feature kind, so that a flip rule sums raw
    features; evaluation L2-normalises it."""
    pre, proj = encode_image_pair(model.clip_model.visual, images)
    if model.feature["neck_feat"] == "after":
        neck, neck_proj = (model.extras[name] for name in model.feature["modules"])
        pre, proj = neck.bn(pre), neck_proj.bn(proj)
    return torch.cat([pre, proj], dim=1)


registry.declare("clipreid",
                        "python experiments/train_stage2_clipreid.py --config <train config>")
MODULE_KINDS["prompt_learner"] = PromptLearner
FEATURE_KINDS["clipreid"] = _clipreid_embedding


# ---------------------------------------------------------------- CLIP-HandID
# CLIP-HandID (Baisa et al., IPTA 2025) maps each image's projected feature through an
# inversion network to a pseudo-word that replaces the placeholder of one fixed prompt. Its
# retrieval feature is the clipreid kind after the BN (with the interaction network: the
# clip_handid kind, which also runs the text tower); its modules live here so that a
# checkpoint is rebuilt without the trainer.

@functools.lru_cache(maxsize=8)
def placeholder_prompt(arch, template, placeholder):
    """-> (token ids of `template` [context_length], position of `placeholder` in it);
    ConfigError unless the placeholder is one token that occurs exactly once."""
    tokenizer = open_clip.get_tokenizer(arch)
    word = tokenizer([placeholder])[0]
    ids = word[(word != 0) & (word != word[0])][:-1]  # without start, end and padding
    if len(ids) != 1:
        raise ConfigError(f"placeholder: {placeholder!r} is {len(ids)} tokens for the "
                          f"{arch} tokenizer; choose a word that is one token, e.g. 'sks'")
    tokens = tokenizer([template])[0]
    positions = (tokens == ids[0]).nonzero().flatten()
    if len(positions) != 1 or tokens[-1] != 0:
        raise ConfigError(f"prompt_template: {template!r} holds the placeholder {placeholder!r} "
                          f"{len(positions)} times (as a token, within the context); write it "
                          f"once as a word, e.g. 'A photo of a {placeholder} hand'")
    return tokens, positions


class InversionNetwork(nn.Module):
    """Image feature -> one pseudo-word token: (Linear-LayerNorm-GELU-Dropout) twice with a
    hidden width of 4 x embed_dim, a Linear to the token width and a final LayerNorm."""

    def __init__(self, embed_dim, width, dropout=0.5):
        super().__init__()
        hidden = 4 * embed_dim
        layers = []
        for fan_in in (embed_dim, hidden):
            layers += [nn.Linear(fan_in, hidden), nn.LayerNorm(hidden), nn.GELU(),
                       nn.Dropout(dropout)]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, width), nn.LayerNorm(width))

    def forward(self, features):
        return self.net(features)


class InteractionNetwork(nn.Module):
    """CLIP-HandID's optional interaction network, per sample: cross-attention of the text
    feature over the image feature, then self-attention -> Linear -> self-attention ->
    Linear. Each sample is its own sequence (one token), so a sample's output never depends
    on the rest of its batch; over one key an attention is its value projection."""

    def __init__(self, dim, heads):
        super().__init__()
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self1 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc1 = nn.Linear(dim, dim)
        self.self2 = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, text, image):
        query, key = text[:, None], image[:, None].to(text.dtype)
        x = self.cross(query, key, key, need_weights=False)[0]
        x = self.fc1(self.self1(x, x, x, need_weights=False)[0])
        x = self.fc2(self.self2(x, x, x, need_weights=False)[0])
        return x[:, 0]


def pseudo_word_text(clip_model, inversion, image_features, prompt, mode):
    """CLIP-HandID's text feature per projected image feature. `prompt`: (token ids,
    placeholder position) of placeholder_prompt; mode learned: the inversion network's token
    in the placeholder, gradients flowing into it; released: the token's mean over its
    dimensions in every dimension, without gradient (the released code)."""
    tokens, positions = (t.to(image_features.device) for t in prompt)
    tokens = tokens.expand(len(image_features), -1)
    if mode == "learned":
        token = inversion(image_features)
        return encode_tokens_with(clip_model, tokens, positions, token[:, None])
    with torch.no_grad():
        token = inversion(image_features)
        mean = token.mean(dim=1, keepdim=True).expand_as(token)
        return encode_tokens_with(clip_model, tokens, positions, mean[:, None])


def clip_handid_module_specs(config, clip_model, num_classes):
    """CLIP-HandID's modules: the inversion network and a BNNeck on each image feature;
    with interaction_network, the interaction network and a third BNNeck on its output."""
    check_text_tower(clip_model, config)
    pre_dim, proj_dim = image_pair_dims(clip_model.visual)
    specs = {"inversion": {"kind": "inversion_network", "embed_dim": int(proj_dim),
                           "width": clip_model.token_embedding.embedding_dim},
             "neck": classifier_spec("bnneck", pre_dim, num_classes),
             "neck_proj": classifier_spec("bnneck", proj_dim, num_classes)}
    if config["interaction_network"]:
        specs["interaction"] = {"kind": "interaction_network", "dim": int(proj_dim),
                                "heads": max(1, int(proj_dim) // 64)}
        specs["neck_fused"] = classifier_spec("bnneck", proj_dim, num_classes)
    return specs


def clip_handid_feature(config):
    """The concatenated BN features of both heads (1280-d for ViT-B/16, 3072-d for RN50);
    with interaction_network also the third head's (the text feature of the prompt)."""
    if not config["interaction_network"]:
        return {"kind": "clipreid", "neck_feat": "after", "modules": ["neck", "neck_proj"]}
    return {"kind": "clip_handid", "arch": resolve_backbone(config)[0],
            "template": config["prompt_template"], "placeholder": config["placeholder"],
            "inversion": config["inversion"], "modules": ["neck", "neck_proj", "neck_fused"]}


def _clip_handid_embedding(model, images):
    """The three BN features of a CLIP-HandID model with its interaction network."""
    feature, extras = model.feature, model.extras
    pre, proj = encode_image_pair(model.clip_model.visual, images)
    prompt = placeholder_prompt(feature["arch"], feature["template"], feature["placeholder"])
    text = pseudo_word_text(model.clip_model, extras["inversion"], proj, prompt,
                            feature["inversion"])
    fused = extras["interaction"](text, proj)
    return torch.cat([extras["neck"].bn(pre), extras["neck_proj"].bn(proj),
                      extras["neck_fused"].bn(fused)], dim=1)


registry.declare("clip_handid",
                        "python experiments/train_clip_handid.py --config <train config>")
MODULE_KINDS["inversion_network"] = InversionNetwork
MODULE_KINDS["interaction_network"] = InteractionNetwork
FEATURE_KINDS["clip_handid"] = _clip_handid_embedding
