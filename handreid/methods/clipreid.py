"""Stage 2: CLIP-ReID (Li et al., AAAI 2023) for hands; a method of the training engine
(train/engine.py), in two phases. This file is the whole method: its config keys, its model
parts (prompts, the two-feature image encoder, the retrieval feature) and its training.

Phase `prompts` (prompt_epochs): every training identity gets the learnable tokens of
prompt_template (each X one token). Image encoder and text tower stay frozen; only the tokens
learn, with the image-to-text and text-to-image supervised contrastive losses over each
batch (Adam, warmup from prompt_warmup_lr, cosine to prompt_min_lr). The frozen encoder's
projected feature of every train image (evaluation transform, no augmentation) is computed
once when the phase starts; the phase's batches are rows of that table, in an order a seeded
sampler draws per epoch.

Phase `image_encoder` (epochs): tokens and text tower frozen; every identity's text feature
is computed once when the phase starts. The image encoder and two BNNeck heads, one on the
pre-projection and one on the projected image feature, learn with
  id_loss_weight  x label-smoothed cross-entropy of both heads
+ triplet_weight  x batch-hard triplet on both features (before the BN), and on a third,
                    intermediate one with triplet_intermediate_layer (CLIP-ReID's)
+ i2t_loss_weight x label-smoothed cross-entropy of the projected feature against all text
                    features
(Adam as CLIP-ReID, warmup from warmup_factor x lr, then the step or cosine schedule), best
over pk batches (sampler: pk). Model selection (val/) runs in this phase only; the train
accuracy and the val accuracy / loss are those of the image-to-text logits.

Retrieval feature (in the checkpoint, so evaluation needs no Stage-2 code): the two image
features concatenated, before or after their BN (neck_feat); evaluation L2-normalises it.
The checkpoint holds the learned prompts as module `prompt_learner` (its `context` tensor).
prompt_epochs: 0 skips phase 1 and starts phase 2 from the prompts of prompt_checkpoint.
"""
import re

import open_clip
import torch
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import VisionTransformer, text_global_pool
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from handreid.checkpoint import model_checkpoint
from handreid.core import registry
from handreid.core.errors import ConfigError, UserError
from handreid.core.runtime import rank_and_world
from handreid.core.schema import option
from handreid.data.loaders import train_gallery_loader
from handreid.methods.base import Method, Phase, decay_groups, encoder_and_head_groups
from handreid.model import backbone, losses

# Stage 2's own config keys (prompt_template and warmup_factor, which CLIP-HandID reads too,
# are general: core/schema.py).
CONFIG_KEYS = {
    "prompt_epochs": option(int, 120, "Stage-2 phase 1: epochs that learn the prompts (0 = take "
                                       "them from prompt_checkpoint)", low=0),
    "prompt_checkpoint": option(str, None, "a Stage-2 checkpoint whose learned prompts phase 2 "
                                            "starts from when prompt_epochs is 0"),
    "prompt_batch_size": option(int, 64, "Stage-2 phase 1: image features per step (per process)",
                                 low=1),
    "prompt_lr": option(float, 3.5e-4, "Stage-2 phase 1: Adam learning rate of the prompts",
                         low=0.0),
    "prompt_weight_decay": option(float, 1e-4, "Stage-2 phase 1: weight decay of the prompts",
                                   low=0.0),
    "prompt_warmup_epochs": option(int, 5, "Stage-2 phase 1: linear warmup epochs", low=0),
    "prompt_warmup_lr": option(float, 1e-5, "Stage-2 phase 1: learning rate at the first warmup "
                                             "step", low=0.0),
    "prompt_min_lr": option(float, 1e-6, "Stage-2 phase 1: learning rate at the end of the "
                                          "cosine decay", low=0.0),
    "id_loss_weight": option(float, 0.25, "Stage-2 phase 2: weight of the identity "
                                           "cross-entropy (summed over both heads)", low=0.0),
    "i2t_loss_weight": option(float, 1.0, "Stage-2 phase 2: weight of the image-to-text "
                                           "cross-entropy", low=0.0),
    "neck_feat": option(str, "before", "Stage-2 retrieval feature: the two image features "
                                        "before or after their BNNeck BN, concatenated",
                         choices=("before", "after")),
    "triplet_intermediate_layer": option(int, None, "Stage 2: a third triplet feature, "
                                                     "CLIP-ReID's: ViT the class token after this "
                                                     "many blocks (before ln_post), ResNet the "
                                                     "mean of this layer; negative: counted back "
                                                     "from the last, -1 = the one before the "
                                                     "last (CLIP-ReID's: ViT-B/16 block 11, RN50 "
                                                     "layer3; any depth); default: off"),
}

# ---------------------------------------------------------------- model parts
# What evaluation rebuilds a Stage-2 checkpoint with (registered as the method's module and
# feature kinds), and the two-feature image encoder CLIP-HandID builds on.

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
    """The 1-based ViT block or ModifiedResNet layer that triplet_intermediate_layer `layer`
    names in `visual` (None for none): a positive value counts from the first block, a negative
    one back from the last (-1: the block before the last, CLIP-ReID's: block 11 of ViT-B/16's
    12, RN50's layer3), so a recipe fits any depth. ConfigError unless encode_image_pair can
    give it: ViT 1 .. blocks - 1, ModifiedResNet 1 .. 3."""
    if layer is None:
        return None
    resnet = isinstance(visual, ModifiedResNet)
    if not resnet and not isinstance(visual, VisionTransformer):
        raise _unsupported_encoder(visual)
    top = 3 if resnet else len(visual.transformer.resblocks) - 1
    if not (1 <= layer <= top or -top <= layer <= -1):
        what = "ResNet layer (layer1..layer3)" if resnet else \
            f"number of transformer blocks (this ViT has {top + 1})"
        raise ConfigError(f"triplet_intermediate_layer: {layer} is out of range; give a {what}: "
                          f"1 to {top} (CLIP-ReID: {top}), or counted back from the last, "
                          f"-1 to -{top} (-1: the one before the last), or leave it out")
    return layer if layer > 0 else top + 1 + layer


def image_pair_dims(visual):
    """Widths of encode_image_pair's two features, without running the encoder."""
    if isinstance(visual, ModifiedResNet):
        return visual.attnpool.k_proj.in_features, visual.attnpool.c_proj.out_features
    if isinstance(visual, VisionTransformer):
        width = visual.ln_post.normalized_shape[0]
        return width, width if visual.proj is None else visual.proj.shape[1]
    raise _unsupported_encoder(visual)


def extra_module_specs(config, clip_model, num_classes):
    """Stage 2's modules: the identities' prompts and a BNNeck head on each image feature."""
    check_text_tower(clip_model, config)
    pre_dim, proj_dim = image_pair_dims(clip_model.visual)
    return {"prompt_learner": {"kind": "prompt_learner",
                               "arch": backbone.resolve_backbone(config)[0],
                               "template": config["prompt_template"],
                               "num_classes": int(num_classes),
                               "width": clip_model.token_embedding.embedding_dim},
            "neck": backbone.classifier_spec("bnneck", pre_dim, num_classes),
            "neck_proj": backbone.classifier_spec("bnneck", proj_dim, num_classes)}


def retrieval_feature(config):
    """The two image features concatenated, before or after their BN (neck_feat)."""
    return {"kind": "clipreid", "neck_feat": config["neck_feat"], "modules": ["neck", "neck_proj"]}


def clipreid_embedding(model, images):
    """CLIP-ReID's retrieval feature: both image features (neck_feat: before or after their
    BNNeck's BN), concatenated; raw, as every feature kind, so that a flip rule sums raw
    features; evaluation L2-normalises it."""
    pre, proj = encode_image_pair(model.clip_model.visual, images)
    if model.feature["neck_feat"] == "after":
        neck, neck_proj = (model.extras[name] for name in model.feature["modules"])
        pre, proj = neck.bn(pre), neck_proj.bn(proj)
    return torch.cat([pre, proj], dim=1)


# ---------------------------------------------------------------- training

PROMPTS, IMAGE_ENCODER = "prompts", "image_encoder"
HEADS = ("neck", "neck_proj")


def check_config(config):
    """The Stage-2 settings that can be checked before any data is read."""
    template_tokens(backbone.resolve_backbone(config)[0], config["prompt_template"])
    if config["prompt_epochs"] == 0 and not config["prompt_checkpoint"]:
        raise ConfigError("prompt_epochs: 0 skips learning the prompts; set prompt_checkpoint: "
                          "to a clipreid checkpoint to take them from, or prompt_epochs: >= 1")


def read_prompts(path, identity_names):
    """-> (spec, state) of the learned prompts in the Stage-2 checkpoint `path`, which must
    have been trained on `identity_names` (what prompt_epochs: 0 starts phase 2 from)."""
    ckpt = model_checkpoint.read_checkpoint(path, registry.train_command(ClipReid.name))
    if "prompt_learner" not in ckpt["modules"]:
        raise UserError(f"prompt_checkpoint: {path} holds no learned prompts (it is a "
                        f"{ckpt['method']} checkpoint); point it at a clipreid checkpoint, or "
                        f"set prompt_epochs: to at least 1 to learn them")
    if ckpt["identity_names"] != list(identity_names):
        raise UserError(f"prompt_checkpoint: {path} learned prompts for other identities than "
                        f"train/ holds now; point it at a checkpoint of this dataset, or set "
                        f"prompt_epochs: to at least 1")
    return ckpt["module_specs"]["prompt_learner"], ckpt["modules"]["prompt_learner"]


def _ratio(value, lr):
    return value / lr if lr > 0 else 0.0


class ClipReid(Method):
    name = "clipreid"
    train_script = "experiments/train_stage2_clipreid.py"
    config_keys = CONFIG_KEYS
    module_kinds = {"prompt_learner": PromptLearner}
    feature_kinds = {"clipreid": clipreid_embedding}

    check_config = staticmethod(check_config)

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, clip_model, identity_names)
        check_config(config)
        backbone.freeze_text_tower(clip_model)
        self.intermediate_layer = check_intermediate_layer(
            clip_model.visual, config["triplet_intermediate_layer"])
        self.specs = extra_module_specs(config, clip_model, len(identity_names))
        extras = {name: backbone.build_module(spec) for name, spec in self.specs.items()}
        for head in HEADS:
            backbone.init_classifier(extras[head], config["classifier_init_std"])
        if config["prompt_epochs"] == 0:
            spec, state = read_prompts(config["prompt_checkpoint"], identity_names)
            if spec != self.specs["prompt_learner"]:
                raise ConfigError(f"prompt_checkpoint: {config['prompt_checkpoint']} learned "
                                  f"its prompts with template {spec['template']!r} on "
                                  f"{spec['arch']}; set prompt_template: and model: to match")
            extras["prompt_learner"].load_state_dict(state)
        self.model = backbone.HandIdModel(clip_model, extras=extras,
                                          feature=retrieval_feature(config))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])
        self.phase = None
        self.image_features = self.image_labels = None  # phase 1: the frozen encoder's table
        self.text_features = None                       # phase 2: every identity's text

    def module_specs(self):
        return self.specs

    def phases(self):
        config = self.config
        prompts = Phase(PROMPTS, config["prompt_epochs"], optimizer="adam",
                        warmup_epochs=config["prompt_warmup_epochs"],
                        warmup_start=_ratio(config["prompt_warmup_lr"], config["prompt_lr"]),
                        scheduler="cosine",
                        min_lr_factor=_ratio(config["prompt_min_lr"], config["prompt_lr"]),
                        lr_stepping=config["lr_stepping"], epoch_origin=config["lr_epoch_origin"],
                        selects=False, uses_images=False)
        image = Phase.from_config(config, IMAGE_ENCODER, optimizer="adam",
                                  warmup_start=config["warmup_factor"])
        return [phase for phase in (prompts, image) if phase.epochs > 0]

    def trains(self, phase, name):
        """Whether the parameter `name` of the model trains in `phase`."""
        if phase.name == PROMPTS:
            return name == "extras.prompt_learner.context"
        # The BNNecks' BN bias stays frozen (BNNeck, Luo et al. 2019).
        return name.startswith("clip_model.visual.") or (
            name.startswith(tuple(f"extras.{head}." for head in HEADS))
            and not name.endswith(".bn.bias"))

    def start_phase(self, phase, train_loader, device):
        self.phase = phase.name
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.trains(phase, name))
        if phase.name == PROMPTS:
            return self._feature_table_loader(train_loader, device)
        self.text_features = self._all_text_features(device)
        return train_loader

    @torch.no_grad()
    def _feature_table_loader(self, train_loader, device):
        """Encode every train image once with the frozen encoder (fp32, evaluation
        transform); -> a loader of (row indices, labels) over that table, shuffled per epoch
        by a DistributedSampler seeded with `seed` (one shard per process)."""
        visual = self.model.clip_model.visual
        visual.eval()
        features = [encode_image_pair(visual, images.to(device))[1].float()
                    for images, _ in train_gallery_loader(self.config, train_loader)]
        visual.train()
        self.image_features = torch.cat(features)
        targets = torch.as_tensor(train_loader.dataset.targets)
        self.image_labels = targets.to(device)
        table = TensorDataset(torch.arange(len(targets)), targets)
        rank, world = rank_and_world()
        sampler = DistributedSampler(table, num_replicas=world, rank=rank, shuffle=True,
                                     seed=self.config["seed"], drop_last=False)
        generator = torch.Generator()
        generator.manual_seed(self.config["seed"])
        return DataLoader(table, batch_size=self.config["prompt_batch_size"], sampler=sampler,
                          generator=generator)

    @torch.no_grad()
    def _all_text_features(self, device):
        learner, clip_model = self.model.extras["prompt_learner"], self.model.clip_model
        labels = torch.arange(len(self.identity_names), device=device)
        return torch.cat([learner(clip_model, chunk).float()
                          for chunk in labels.split(self.config["eval_batch_size"])])

    def param_groups(self, phase):
        config, extras = self.config, self.model.extras
        if phase.name == PROMPTS:
            return decay_groups("prompts", extras["prompt_learner"], config["prompt_lr"],
                                config["prompt_weight_decay"])
        return encoder_and_head_groups(config, self.model.clip_model.visual, "heads",
                                       nn.ModuleList([extras[head] for head in HEADS]))

    def forward(self, model, inputs):
        if self.phase == PROMPTS:  # inputs are rows of the feature table
            text = model.extras["prompt_learner"](model.clip_model, self.image_labels[inputs])
            return self.image_features[inputs], text
        pre, proj, *inner = encode_image_pair(model.clip_model.visual, inputs,
                                              self.intermediate_layer)
        neck, neck_proj = (model.extras[head] for head in HEADS)
        return (pre, proj, neck(pre), neck_proj(proj), proj @ self.text_features.T, inner)

    def loss(self, phase, outputs, labels):
        if phase.name == PROMPTS:
            image, text = outputs
            return {"i2t": losses.image_text_contrastive(image, text, labels, labels),
                    "t2i": losses.image_text_contrastive(text, image, labels, labels)}, None
        config = self.config
        pre, proj, logits, logits_proj, text_logits, inner = outputs
        terms = {"id": config["id_loss_weight"] * (self.criterion(logits, labels)
                                                   + self.criterion(logits_proj, labels))}
        if config["triplet_weight"] > 0:
            terms["triplet"] = config["triplet_weight"] * sum(
                losses.batch_hard_triplet(feature, labels, config["triplet_margin"],
                                          config["triplet_soft_margin"])
                for feature in (*inner, pre, proj))
        terms["i2t"] = config["i2t_loss_weight"] * self.criterion(text_logits, labels)
        return terms, text_logits

    def classify(self, model, images):
        """Identity logits: the projected image feature against every identity's text."""
        return encode_image_pair(model.clip_model.visual, images)[1] \
            @ self.text_features.T
