"""CLIP-HandID (Baisa, Pallam, Jayavel, IPTA 2025) for hands; a method of the training engine
(engine.py), in one phase.

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

interaction_network: true adds CLIP-HandID's interaction network (make_model.
InteractionNetwork, per sample) on the text and projected image features, a third BNNeck on
its output and a third cross-entropy term.

Train accuracy and model selection use the projected head's logits. Retrieval feature (in
the checkpoint, so evaluation needs no method code): both BN features concatenated (and the
third head's with interaction_network).
"""
from torch import nn

from handreid.model import losses
from handreid.model import backbone
from handreid.train.method import Method, Phase, encoder_and_head_groups

HEADS = ("neck", "neck_proj")


def check_config(config):
    """The CLIP-HandID settings that can be checked before any data is read."""
    backbone.placeholder_prompt(backbone.resolve_backbone(config)[0],
                                  config["prompt_template"], config["placeholder"])


class ClipHandId(Method):
    name = "clip_handid"

    check_config = staticmethod(check_config)

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, identity_names)
        self.prompt = backbone.placeholder_prompt(
            backbone.resolve_backbone(config)[0], config["prompt_template"],
            config["placeholder"])
        backbone.freeze_text_tower(clip_model)
        self.specs = backbone.clip_handid_module_specs(config, clip_model,
                                                         len(identity_names))
        extras = {name: backbone.build_module(spec) for name, spec in self.specs.items()}
        self.heads = HEADS + (("neck_fused",) if config["interaction_network"] else ())
        for head in self.heads:
            backbone.init_classifier(extras[head], config["classifier_init_std"])
        self.model = backbone.HandIdModel(clip_model, extras=extras,
                                            feature=backbone.clip_handid_feature(config))
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
        return backbone.pseudo_word_text(model.clip_model, model.extras["inversion"],
                                           image_features, self.prompt,
                                           self.config["inversion"])

    def forward(self, model, inputs):
        pre, proj = backbone.encode_image_pair(model.clip_model.visual, inputs)
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
            backbone.encode_image_pair(model.clip_model.visual, images)[1])
