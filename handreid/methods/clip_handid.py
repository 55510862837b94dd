"""CLIP-HandID (Baisa, Pallam, Jayavel, IPTA 2025) for hands; a method of the training engine
(train/engine.py), in one phase. This file is the whole method: its config keys, its model
parts (inversion and interaction networks, the pseudo-word prompt, the retrieval features)
and its training; the two-feature image encoder is Stage 2's (clipreid.py).

The text tower stays frozen. An inversion network maps each image's projected feature to one
pseudo-word token that replaces the embedding of the `placeholder` word of prompt_template
("A photo of a sks hand"); the frozen text tower encodes that prompt, one text feature per
image. The image encoder, the inversion network and two BNNeck heads (the pre-projection and
the projected image feature; BN bias frozen) learn with, all weights 1,
  label-smoothed cross-entropy of both heads
+ supervised contrastive image-to-text and text-to-image between the projected image feature
  and its own prompt's text feature (losses.image_text_contrastive: temperature 1, raw dot
  products).

inversion: learned (the paper's method) feeds the whole token into the prompt and back-
propagates through the frozen text tower into the inversion network. inversion: released is
the released code's behaviour: the token's mean over its dimensions, broadcast into every
dimension of the placeholder, without gradient; the inversion network then never trains and,
its final LayerNorm making that mean ~0, every image gets the same text feature.

interaction_network: true adds CLIP-HandID's interaction network (InteractionNetwork, per
sample) on the text and projected image features, a third BNNeck on
its output and a third cross-entropy term.

Train accuracy and model selection use the projected head's logits. Retrieval feature (in
the checkpoint, so evaluation needs no method code): both BN features concatenated (and the
third head's with interaction_network).
"""
import functools

import open_clip
import torch
from torch import nn

from handreid.core.errors import ConfigError
from handreid.core.schema import option
from handreid.methods.base import Method, Phase, encoder_and_head_groups
from handreid.methods.clipreid import (check_text_tower, clipreid_embedding, encode_image_pair,
                                       encode_tokens_with, image_pair_dims)
from handreid.model import backbone, losses

# CLIP-HandID's own config keys (prompt_template, which holds the placeholder word, and
# warmup_factor are general: core/schema.py).
CONFIG_KEYS = {
    "placeholder": option(str, "sks", "CLIP-HandID: the word of prompt_template (one token) "
                                       "whose embedding the image's pseudo-word replaces"),
    "inversion": option(str, "learned", "CLIP-HandID pseudo-word: learned (the paper: the "
                                         "inversion network's token, trained through the frozen "
                                         "text tower) or released (the released code: the token's "
                                         "mean over its dimensions, no gradient)",
                         choices=("learned", "released")),
    "interaction_network": option(bool, False, "CLIP-HandID: the interaction network (text over "
                                                "image attention, per sample) with a third head "
                                                "and a third part of the retrieval feature"),
}

# ---------------------------------------------------------------- model parts
# An inversion network maps each image's projected feature to a pseudo-word that replaces the
# placeholder of one fixed prompt. The retrieval feature is the clipreid kind after the BN
# (with the interaction network: the clip_handid kind, which also runs the text tower); both
# kinds and the modules are registered with the method, so that evaluation rebuilds a
# checkpoint without the training code.

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


def extra_module_specs(config, clip_model, num_classes):
    """CLIP-HandID's modules: the inversion network and a BNNeck on each image feature;
    with interaction_network, the interaction network and a third BNNeck on its output."""
    check_text_tower(clip_model, config)
    pre_dim, proj_dim = image_pair_dims(clip_model.visual)
    specs = {"inversion": {"kind": "inversion_network", "embed_dim": int(proj_dim),
                           "width": clip_model.token_embedding.embedding_dim},
             "neck": backbone.classifier_spec("bnneck", pre_dim, num_classes),
             "neck_proj": backbone.classifier_spec("bnneck", proj_dim, num_classes)}
    if config["interaction_network"]:
        specs["interaction"] = {"kind": "interaction_network", "dim": int(proj_dim),
                                "heads": max(1, int(proj_dim) // 64)}
        specs["neck_fused"] = backbone.classifier_spec("bnneck", proj_dim, num_classes)
    return specs


def retrieval_feature(config):
    """The concatenated BN features of both heads (1280-d for ViT-B/16, 3072-d for RN50);
    with interaction_network also the third head's (the text feature of the prompt)."""
    if not config["interaction_network"]:
        return {"kind": "clipreid", "neck_feat": "after", "modules": ["neck", "neck_proj"]}
    return {"kind": "clip_handid", "arch": backbone.resolve_backbone(config)[0],
            "template": config["prompt_template"], "placeholder": config["placeholder"],
            "inversion": config["inversion"], "modules": ["neck", "neck_proj", "neck_fused"]}


def clip_handid_embedding(model, images):
    """The three BN features of a CLIP-HandID model with its interaction network."""
    feature, extras = model.feature, model.extras
    pre, proj = encode_image_pair(model.clip_model.visual, images)
    prompt = placeholder_prompt(feature["arch"], feature["template"], feature["placeholder"])
    text = pseudo_word_text(model.clip_model, extras["inversion"], proj, prompt,
                            feature["inversion"])
    fused = extras["interaction"](text, proj)
    return torch.cat([extras["neck"].bn(pre), extras["neck_proj"].bn(proj),
                      extras["neck_fused"].bn(fused)], dim=1)


# ---------------------------------------------------------------- training

HEADS = ("neck", "neck_proj")


def check_config(config):
    """The CLIP-HandID settings that can be checked before any data is read."""
    placeholder_prompt(backbone.resolve_backbone(config)[0], config["prompt_template"],
                       config["placeholder"])


class ClipHandId(Method):
    name = "clip_handid"
    train_script = "experiments/train_clip_handid.py"
    config_keys = CONFIG_KEYS
    module_kinds = {"inversion_network": InversionNetwork,
                    "interaction_network": InteractionNetwork}
    # Without the interaction network its feature is Stage 2's kind.
    feature_kinds = {"clip_handid": clip_handid_embedding, "clipreid": clipreid_embedding}

    check_config = staticmethod(check_config)

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, clip_model, identity_names)
        self.prompt = placeholder_prompt(backbone.resolve_backbone(config)[0],
                                         config["prompt_template"], config["placeholder"])
        backbone.freeze_text_tower(clip_model)
        self.specs = extra_module_specs(config, clip_model, len(identity_names))
        extras = {name: backbone.build_module(spec) for name, spec in self.specs.items()}
        self.heads = HEADS + (("neck_fused",) if config["interaction_network"] else ())
        for head in self.heads:
            backbone.init_classifier(extras[head], config["classifier_init_std"])
        self.model = backbone.HandIdModel(clip_model, extras=extras,
                                          feature=retrieval_feature(config))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])

    def module_specs(self):
        return self.specs

    def phases(self):
        return [Phase.from_config(self.config, optimizer="adam",
                                  warmup_start=self.config["warmup_factor"])]

    def trains(self, name):
        if name.startswith("extras.inversion."):
            return self.config["inversion"] == "learned"
        # The BNNecks' BN bias stays frozen (BNNeck, Luo et al. 2019).
        return name.startswith(("clip_model.visual.", "extras.interaction.")) or (
            name.startswith(tuple(f"extras.{head}." for head in self.heads))
            and not name.endswith(".bn.bias"))

    def start_phase(self, phase, train_loader, device):
        for name, param in self.model.named_parameters():
            param.requires_grad_(self.trains(name))
        return train_loader

    def param_groups(self, phase):
        extras = self.model.extras
        return encoder_and_head_groups(self.config, self.model.clip_model.visual, "others",
                                       nn.ModuleList([extras[name] for name in extras]))

    def text_features(self, model, image_features):
        """The prompt's text feature for each projected image feature (see `inversion`)."""
        return pseudo_word_text(model.clip_model, model.extras["inversion"], image_features,
                                self.prompt, self.config["inversion"])

    def forward(self, model, inputs):
        pre, proj = encode_image_pair(model.clip_model.visual, inputs)
        text = self.text_features(model, proj)
        logits = [model.extras["neck"](pre), model.extras["neck_proj"](proj)]
        if "interaction" in model.extras:
            logits.append(model.extras["neck_fused"](model.extras["interaction"](text, proj)))
        return logits, proj, text

    def loss(self, phase, outputs, labels):
        logits, image, text = outputs
        return {"id": sum(self.criterion(head, labels) for head in logits),
                "i2t": losses.image_text_contrastive(image, text, labels, labels),
                "t2i": losses.image_text_contrastive(text, image, labels, labels)}, logits[1]

    def classify(self, model, images):
        """Identity logits of the projected feature's head (CLIP-HandID selects by them)."""
        return model.extras["neck_proj"](
            encode_image_pair(model.clip_model.visual, images)[1])
