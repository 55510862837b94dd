"""The CLIP backbone (open_clip_torch), the identity head, text-tower freezing, and the Stage-1
checkpoint format.

`model:` names a backbone: the documents' short names (vitb16 -> ViT-B-16 with OpenAI weights,
...), any open_clip `architecture:pretrained_tag`, or `tiny`, a small random-initialised CLIP
registered from configs/model/handid_tiny.json for tests and the demo. `pretrained:` overrides
the weights: an open_clip tag, a local file (OpenAI .pt TorchScript archive, open_clip
checkpoint or state dict), or `none` for random init.

HandIdModel.features() is the one function that turns images into identity features, for
training and for evaluation alike.
"""
import contextlib
import difflib
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path

import open_clip
import torch
from open_clip.model import resize_pos_embed
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn

from config import ConfigError, UserError, atomic_write

CHECKPOINT_FORMAT = "clip-handid-stage1"
CHECKPOINT_VERSION = 1
CHECKPOINT_KEYS = ("config", "backbone", "quick_gelu", "image_size", "embed_dim",
                   "clip_state_dict", "classifier_state_dict", "head", "identity_names", "epoch",
                   "val_accuracy")

# The project's small CLIP for tests and the demo, registered with open_clip by its file stem.
TINY_CONFIG = Path(__file__).resolve().parent / "configs/model/handid_tiny.json"
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
TRAIN_COMMAND = "python experiments/train_stage1_frozen_text.py --config <train config>"


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


def _quick_gelu(config):
    # OpenAI's weights were trained with QuickGELU; open_clip's plain configs use nn.GELU.
    return bool(_weights_cfg(config).get("quick_gelu", False))


def _image_size(config, arch):
    if config["image_size"] is not None:
        return config["image_size"]
    size = open_clip.get_model_config(arch)["vision_cfg"].get("image_size", 224)
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            raise ConfigError(f"model: {arch} takes non-square {tuple(size)} inputs; "
                              f"set image_size: <side> for square crops")
        size = size[0]
    return int(size)


def preprocess_spec(config):
    """Input side and normalisation of the backbone, without building it."""
    arch, _ = resolve_backbone(config)
    cfg = _weights_cfg(config)
    return {"image_size": _image_size(config, arch),
            "mean": tuple(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
            "std": tuple(cfg.get("std", open_clip.OPENAI_DATASET_STD))}


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


def make_classifier(head, dim, num_classes):
    """The identity head on `dim`-dimensional image embeddings: linear or bnneck."""
    if head == "bnneck":
        return BNNeck(dim, num_classes)
    return nn.Linear(dim, num_classes)


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


def _torchscript_state_dict(path, model):
    """fp32 state dict of an OpenAI TorchScript archive (fp16 inside), position embeddings
    resized to the model's image size, the archive's non-weight entries dropped."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still needed
        archive = torch.jit.load(str(path), map_location="cpu")
    state = {k: v.float() for k, v in archive.state_dict().items()
             if k not in ("input_resolution", "context_length", "vocab_size")}
    resize_pos_embed(state, model)
    return state


@contextlib.contextmanager
def _weights_follow():
    """Silence open_clip's 'initialized randomly' warning for a model whose weights we load next."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def _create(config, weights=None):
    """The architecture of `config` in fp32 on CPU, random-initialised or with the local file
    `weights` loaded strictly (position embeddings resized to image_size)."""
    arch, _ = resolve_backbone(config)
    if weights is not None and not Path(weights).is_file():
        raise UserError(f"pretrained: weights file not found: {weights} (give the path of a "
                        f"local {arch} weights file, an open_clip tag, or none)")
    jit_archive = weights is not None and _is_torchscript(weights)
    try:
        with _weights_follow() if jit_archive else contextlib.nullcontext():
            model = open_clip.create_model(
                arch, pretrained=None if jit_archive else weights, precision="fp32",
                device="cpu", jit=False, force_quick_gelu=_quick_gelu(config),
                force_image_size=_image_size(config, arch))
        if jit_archive:
            model.load_state_dict(_torchscript_state_dict(weights, model), strict=True)
        return model
    except Exception as err:
        if weights is None:
            raise
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"pretrained: cannot load {weights} into {arch} ({type(err).__name__}: "
                        f"{reason}); point pretrained: at {arch} weights (OpenAI .pt, open_clip "
                        f"checkpoint or state dict)") from None


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
        clip_model = _create(config, pretrained)
    elif pretrained.lower() != "none":
        clip_model = _create(config, _download(arch, pretrained))
    else:
        clip_model = _create(config)
    if freeze_text:
        freeze_text_tower(clip_model)
    classifier = None
    if num_classes is not None:
        classifier = make_classifier(config["head"], embed_dim(config), num_classes)
    return clip_model, classifier


class HandIdModel(nn.Module):
    """CLIP image encoder + identity head as one module (what DDP wraps)."""

    def __init__(self, clip_model, classifier=None):
        super().__init__()
        self.clip_model = clip_model
        self.classifier = classifier

    def features(self, images):
        """Identity features: encode_image, or its BN output for head=bnneck. Gradients flow."""
        features = self.clip_model.encode_image(images)
        if isinstance(self.classifier, BNNeck):
            features = self.classifier.bn(features)
        return features

    def forward(self, images):
        """-> (logits or None, features)."""
        features = self.features(images)
        if self.classifier is None:
            return None, features
        fc = self.classifier.fc if isinstance(self.classifier, BNNeck) else self.classifier
        return fc(features), features


# ---------------------------------------------------------------- checkpoints

def save_checkpoint(path, clip_model, classifier, config, identity_names, epoch, val_accuracy):
    """Write the Stage-1 checkpoint atomically (a kill mid-write leaves the old file)."""
    arch, pretrained = resolve_backbone(config)
    obj = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "config": dict(config),
        "backbone": f"{arch}/{pretrained}",
        "quick_gelu": _quick_gelu(config),
        "image_size": _image_size(config, arch),
        "embed_dim": embed_dim(config),
        "clip_state_dict": clip_model.state_dict(),
        "classifier_state_dict": None if classifier is None else classifier.state_dict(),
        "head": config["head"],
        "identity_names": list(identity_names),
        "epoch": int(epoch),
        "val_accuracy": None if val_accuracy is None else float(val_accuracy),
    }
    atomic_write(path, lambda f: torch.save(obj, f))


def _read_checkpoint(path):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}; train first: {TRAIN_COMMAND} "
                        f"(or set save_path: to an existing checkpoint)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"cannot read checkpoint {path}: corrupt, truncated or not a torch file "
                        f"({type(err).__name__}); delete it and train again: "
                        f"{TRAIN_COMMAND}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (found {found!r}); "
                        f"point save_path: at a checkpoint written by {TRAIN_COMMAND}")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise UserError(f"{path} has {CHECKPOINT_FORMAT} format version "
                        f"{ckpt.get('format_version')!r}, this code reads version "
                        f"{CHECKPOINT_VERSION}; retrain with this code: {TRAIN_COMMAND}")
    absent = [key for key in CHECKPOINT_KEYS if key not in ckpt]
    if absent:
        raise UserError(f"{path} is an incomplete {CHECKPOINT_FORMAT} checkpoint (no "
                        f"{', '.join(absent)}); retrain: {TRAIN_COMMAND}")
    return ckpt


def _check_matches_config(path, ckpt, config):
    trained = ckpt["config"]
    arch, pretrained = resolve_backbone(config)
    if ckpt["backbone"].split("/", 1)[0] != arch or ckpt["quick_gelu"] != _quick_gelu(config):
        raise UserError(f"{path} holds a {ckpt['backbone']} model (model: {trained['model']}) "
                        f"but the config says model: {config['model']} ({arch}/{pretrained}); "
                        f"set model: {trained['model']} or point save_path: at a matching "
                        f"checkpoint")
    for key in ("dataset", "aspect") if config["dataset"] == "11k" else ("dataset",):
        if trained.get(key) != config[key]:
            raise UserError(f"{path} was trained on {key} {trained.get(key)!r} but the config "
                            f"says {key}: {config[key]}; point save_path: at the checkpoint "
                            f"of {config[key]} or set {key}: {trained.get(key)}")
    if ckpt["image_size"] != _image_size(config, arch):
        raise UserError(f"{path} was trained at image_size {ckpt['image_size']} but the config "
                        f"gives {_image_size(config, arch)}; set image_size: "
                        f"{ckpt['image_size']}")
    if ckpt["head"] != config["head"]:
        raise UserError(f"{path} has a {ckpt['head']} head but the config says head: "
                        f"{config['head']}; set head: {ckpt['head']}")


def _load_strict(module, state_dict, path, what):
    expected = module.state_dict()
    missing = expected.keys() - state_dict.keys()
    unexpected = state_dict.keys() - expected.keys()
    resized = [k for k in expected.keys() & state_dict.keys()
               if expected[k].shape != state_dict[k].shape]
    if missing or unexpected or resized:
        example = sorted(missing or unexpected or resized)[0]
        raise UserError(f"{path}: {what} weights do not fit the configured model "
                        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(resized)} "
                        f"with another shape, e.g. '{example}'); use the config it was "
                        f"trained with or retrain: {TRAIN_COMMAND}")
    module.load_state_dict(state_dict, strict=True)


def load_checkpoint(path, config, device="cpu", freeze_text=True):
    """-> (clip_model, classifier, ckpt) from a Stage-1 checkpoint, checked against `config`
    (backbone, dataset, aspect, image size, head) and loaded strictly. No weights are
    downloaded: the architecture is built random-initialised, then overwritten."""
    ckpt = _read_checkpoint(path)
    _check_matches_config(path, ckpt, config)
    with _weights_follow():
        clip_model = _create(config)
    _load_strict(clip_model, ckpt["clip_state_dict"], path, "CLIP")
    if freeze_text:
        freeze_text_tower(clip_model)
    classifier = None
    if ckpt["classifier_state_dict"] is not None:
        classifier = make_classifier(ckpt["head"], ckpt["embed_dim"], len(ckpt["identity_names"]))
        _load_strict(classifier, ckpt["classifier_state_dict"], path, "classifier")
        classifier.to(device)
    return clip_model.to(device), classifier, ckpt


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
        cast_dtype = clip_model.transformer.get_cast_dtype()
        tokens = self.tokens.expand(len(labels), -1)
        x = clip_model.token_embedding(tokens).to(cast_dtype)
        x = x.index_copy(1, self.positions, self.context[labels].to(cast_dtype))
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


def encode_image_pair(visual, images):
    """-> (pre-projection feature, projected feature) of open_clip's image encoder, the two
    features CLIP-ReID puts its BNNecks on. ViT: the pooled class token after ln_post, and
    that times `proj`. ModifiedResNet: the spatial mean of layer4, and the attention pool."""
    if isinstance(visual, ModifiedResNet):
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        return x.mean(dim=(2, 3)), visual.attnpool(x)
    if isinstance(visual, VisionTransformer):
        pooled, _ = visual._pool(visual.transformer(visual._embeds(images)))
        return pooled, pooled if visual.proj is None else pooled @ visual.proj
    raise _unsupported_encoder(visual)


def image_pair_dims(visual):
    """Widths of encode_image_pair's two features, without running the encoder."""
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool.k_proj.in_features, visual.attnpool.c_proj.out_features
    if isinstance(visual, VisionTransformer):
        width = visual.ln_post.normalized_shape[0]
        return width, width if visual.proj is None else visual.proj.shape[1]
    raise _unsupported_encoder(visual)
