"""Stage 2: CLIP-ReID (Li et al., AAAI 2023) for hands; a method of the training engine
(engine.py), in two phases.

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
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from handreid.checkpoint import model_checkpoint
from handreid.model import losses
from handreid.model import backbone
from handreid.core import registry
from handreid.data.loaders import train_gallery_loader
from handreid.core.errors import ConfigError, UserError
from handreid.train.method import Method, Phase, decay_groups, encoder_and_head_groups
from handreid.core.runtime import rank_and_world

PROMPTS, IMAGE_ENCODER = "prompts", "image_encoder"
HEADS = ("neck", "neck_proj")


def check_config(config):
    """The Stage-2 settings that can be checked before any data is read."""
    backbone.template_tokens(backbone.resolve_backbone(config)[0], config["prompt_template"])
    if config["prompt_epochs"] == 0 and not config["prompt_checkpoint"]:
        raise ConfigError("prompt_epochs: 0 skips learning the prompts; set prompt_checkpoint: "
                          "to a clipreid checkpoint to take them from, or prompt_epochs: >= 1")


def read_prompts(path, identity_names):
    """-> (spec, state) of the learned prompts in the Stage-2 checkpoint `path`, which must
    have been trained on `identity_names` (what prompt_epochs: 0 starts phase 2 from)."""
    ckpt = model_checkpoint.read_checkpoint(path, registry.train_command("clipreid"))
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

    check_config = staticmethod(check_config)

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, identity_names)
        check_config(config)
        backbone.freeze_text_tower(clip_model)
        backbone.check_intermediate_layer(clip_model.visual,
                                            config["triplet_intermediate_layer"])
        self.specs = backbone.clipreid_module_specs(config, clip_model, len(identity_names))
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
                                            feature=backbone.clipreid_feature(config))
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
        features = [backbone.encode_image_pair(visual, images.to(device))[1].float()
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
        pre, proj, *inner = backbone.encode_image_pair(
            model.clip_model.visual, inputs, self.config["triplet_intermediate_layer"])
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
        return backbone.encode_image_pair(model.clip_model.visual, images)[1] \
            @ self.text_features.T
