"""What a method author reads: the `Method` contract, the `Phase` (epochs, optimizer, lr
schedule) and the parameter-group helpers. A method is one file of handreid/methods/ (or any
.py file that `method:` names): its Method subclass, its model modules, its retrieval
features and its config keys; stage1.py is the smallest. The engine (train/engine.py) runs it.

A method gives: its model (a backbone.HandIdModel: CLIP, extra modules by name, the
retrieval feature), its phases, the trainable parameter groups of each phase and the loss of a
batch as named terms. Everything else (precision, DDP, clipping, schedule stepping, validation
and selection, checkpoints, exact resume, logs) is the engine's.
"""
import math
import re
from dataclasses import dataclass

from handreid.checkpoint import model_checkpoint
from handreid.core import registry
from handreid.core.config_files import dataset_dir
from handreid.data.split_protocol import protocol_fingerprint
from handreid.model import backbone, losses

# Parameter names (split at '.' and '_') that get no weight decay even when not 1-D.
NO_DECAY_NAME = re.compile(r"(^|[._])(bias|norm|ln|bn|positional|\w*embedding)\w*", re.I)


def no_weight_decay(name, param):
    """Biases, norm scales, class token (all 1-D) and embeddings are not decayed."""
    return param.ndim <= 1 or bool(NO_DECAY_NAME.search(name))


def decay_groups(name, module, lr, weight_decay, bias_lr_factor=1.0, decay_all=False):
    """Optimizer groups of the trainable parameters of `module`: `name` (decayed) and
    `name`_no_decay (biases, norms, embeddings; decayed too when `decay_all`, as CLIP-ReID
    does); with bias_lr_factor != 1 every parameter whose name contains `bias` (CLIP-ReID's
    rule) goes to `name`_bias / `name`_bias_no_decay at lr x bias_lr_factor. Empty groups
    are left out."""
    groups = {}
    for param_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decays = decay_all or not no_weight_decay(param_name, param)
        bias = bias_lr_factor != 1.0 and "bias" in param_name
        key = name + ("_bias" if bias else "") + ("" if decays else "_no_decay")
        groups.setdefault(key, {"name": key, "params": [],
                                "lr": lr * (bias_lr_factor if bias else 1.0),
                                "weight_decay": weight_decay if decays else 0.0})
        groups[key]["params"].append(param)
    order = [name + suffix for suffix in ("", "_no_decay", "_bias", "_bias_no_decay")]
    return [groups[key] for key in order if key in groups]


def config_groups(config, name, module, lr, weight_decay):
    """decay_groups with the config's bias_lr_factor and weight_decay_all."""
    return decay_groups(name, module, lr, weight_decay, config["bias_lr_factor"],
                        config["weight_decay_all"])


def encoder_and_head_groups(config, visual, name, head):
    """The groups every shipped method trains its image phase with: `visual` (the image
    encoder) at lr and `head` (its extra modules) as `name` at lr x head_lr_mult, both with
    the config's weight decay and bias rules."""
    lr, decay = config["lr"], config["weight_decay"]
    return (config_groups(config, "image_encoder", visual, lr, decay)
            + config_groups(config, name, head, lr * config["head_lr_mult"], decay))


@dataclass
class Phase:
    """A stretch of epochs with its own optimizer and lr schedule: linear warmup from
    `warmup_start` x lr to lr over warmup_epochs, then cosine down to min_lr_factor x lr at
    the phase's end, or x lr_gamma at each epoch of lr_steps (counted from the phase's
    start). lr_stepping `iteration`: the factor changes at every optimizer step;
    `epoch`: once per epoch, at its start, from the epoch index t = (0-based epoch of the
    phase) + epoch_origin: warmup factor warmup_start + (1 - warmup_start) t / warmup_epochs
    while t < warmup_epochs; step: lr_gamma ** (milestones <= t); cosine: on t / epochs from
    t = 0, the warmup a prefix (CLIP-ReID: torch-style WarmupMultiStepLR and timm's
    CosineLRScheduler stepped with the 1-based epoch, origin 1)."""
    name: str
    epochs: int
    optimizer: str = "adamw"          # adamw | adam
    warmup_epochs: int = 0
    warmup_start: float = 0.0
    scheduler: str = "cosine"         # cosine | step
    lr_steps: tuple = ()
    lr_gamma: float = 0.1
    min_lr_factor: float = 0.0
    lr_stepping: str = "iteration"    # iteration | epoch
    epoch_origin: int = 1             # index of a phase's first epoch when stepping per epoch
    selects: bool = True              # validate and select the best epoch in this phase
    uses_images: bool = True          # batches are images (augmented, channels-last)

    @classmethod
    def from_config(cls, config, name="main", **overrides):
        settings = {"epochs": config["epochs"], "warmup_epochs": config["warmup_epochs"],
                    "scheduler": config["scheduler"], "lr_steps": tuple(config["lr_steps"]),
                    "lr_gamma": config["lr_gamma"], "lr_stepping": config["lr_stepping"],
                    "epoch_origin": config["lr_epoch_origin"]}
        return cls(name=name, **{**settings, **overrides})


def lr_factor(step, iters_per_epoch, phase):
    """Multiplier of the base lr at optimizer step `step` (0-based) of `phase`."""
    if phase.lr_stepping == "epoch":
        return epoch_lr_factor(step // iters_per_epoch + phase.epoch_origin, phase)
    warmup = phase.warmup_epochs * iters_per_epoch
    if step < warmup:
        return phase.warmup_start + (1.0 - phase.warmup_start) * (step + 1) / warmup
    if phase.scheduler == "cosine":
        total = phase.epochs * iters_per_epoch
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return phase.min_lr_factor + (1.0 - phase.min_lr_factor) * cosine
    epoch = step / iters_per_epoch
    return phase.lr_gamma ** sum(epoch >= milestone for milestone in phase.lr_steps)


def epoch_lr_factor(t, phase):
    """Multiplier of the base lr for the epoch of index t (lr_stepping: epoch)."""
    if t < phase.warmup_epochs:
        return phase.warmup_start + (1.0 - phase.warmup_start) * t / phase.warmup_epochs
    if phase.scheduler == "cosine":
        cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, t / phase.epochs)))
        return phase.min_lr_factor + (1.0 - phase.min_lr_factor) * cosine
    return phase.lr_gamma ** sum(t >= milestone for milestone in phase.lr_steps)


def phase_of(phases, epoch):
    """Index of the phase that epoch `epoch` (counted from 1 over all phases) belongs to."""
    last = 0
    for index, phase in enumerate(phases):
        last += phase.epochs
        if epoch <= last:
            return index
    return len(phases) - 1


def schedule_warnings(phases):
    """Schedules that cannot do what they say: a warmup as long as the phase (the lr never
    reaches its set value) or a step that lies beyond the phase's last epoch. -> [str]."""
    found = []
    for phase in phases:
        where = f"phase {phase.name}: " if len(phases) > 1 else ""
        if phase.epochs and phase.warmup_epochs >= phase.epochs:
            # The factor of each epoch's last step (one step an epoch): independent of the
            # steps per epoch, as the warmup is linear in steps.
            peak = max(lr_factor(step, 1, phase) for step in range(phase.epochs))
            outcome = ("the lr reaches its set value only at the last step and never decays"
                       if peak >= 1 else
                       f"the lr never reaches its set value (it peaks at {peak:.3g} x lr)")
            found.append(f"{where}warmup of {phase.warmup_epochs} epochs >= the "
                         f"{phase.epochs} training epochs: {outcome}; lower the warmup or "
                         f"train longer")
        late = [m for m in phase.lr_steps if m >= phase.epochs]
        if phase.scheduler == "step" and late:
            found.append(f"{where}lr step(s) at epoch {', '.join(map(str, late))} lie beyond "
                         f"the last epoch ({phase.epochs}) and never apply; move them "
                         f"below it")
    return found


class Method:
    """What a training method supplies; the engine does the rest. A subclass that sets `name`
    is registered (core/registry.py) with its train script, config keys and the module and
    feature kinds its checkpoints need; it builds `self.model` in __init__ and implements
    param_groups and loss."""
    name = None                  # kept in checkpoints; a built-in method's is its file stem
    # The script that trains it, quoted in every error about its checkpoints and resume states.
    train_script = "experiments/train.py"
    config_keys = {}             # its own config keys: {key: schema.option(...)}
    module_kinds = {}            # {kind: nn.Module class} of the extra modules it saves
    feature_kinds = {}           # {kind: function(model, images)} of its retrieval features

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):  # a subclass that keeps its parent's name is no new method
            registry.register(cls)

    @classmethod
    def build(cls, config, identity_names):
        """The method for a train script, once the data is loaded (train/entry.py):
        cls(config, clip_model, identity_names) with `config`'s CLIP (text tower frozen)."""
        clip_model, _ = backbone.build_model(config)
        return cls(config, clip_model, identity_names)

    @staticmethod
    def check_config(config):
        """ConfigError for settings this method cannot train with, before any data loads."""

    @staticmethod
    def check_checkpoint(path, trained, config):
        """UserError when a checkpoint of this method, trained with the config `trained`,
        cannot serve `config` (the checkpoint code checks backbone, data, image size and
        normalisation for every method)."""

    def __init__(self, config, clip_model, identity_names):
        """Default model: CLIP alone, retrieval on its image embedding."""
        self.config = config
        self.identity_names = list(identity_names)
        self.model = backbone.HandIdModel(clip_model)

    def phases(self):
        """[Phase]; default one phase from the config's epochs and schedule keys."""
        return [Phase.from_config(self.config)]

    def module_specs(self):
        """{extra module name: spec ({"kind": ..., **constructor arguments})} so evaluation
        rebuilds them without this method's training code."""
        return {}

    def save_checkpoint(self, path, epoch, selection=None, state=None):
        """Write this method's model as the checkpoint `path` (checkpoint/model_checkpoint.py)
        with the fingerprint of the prepared data it trains on and its planned epochs; `state`
        (a HandIdModel state_dict) replaces the model's weights now."""
        model_checkpoint.save_checkpoint(
            path, self.model, self.config, self.identity_names, epoch, self.name,
            self.module_specs(), selection, state,
            data=protocol_fingerprint(dataset_dir(self.config)),
            planned_epochs=sum(phase.epochs for phase in self.phases()))

    def is_frozen(self, state_name):
        """True for HandIdModel state entries that no phase trains (not kept in resume
        states): by default everything of CLIP outside the image encoder."""
        return state_name.startswith("clip_model.") and \
            not state_name.startswith("clip_model.visual.")

    def start_phase(self, phase, train_loader, device):
        """Set what trains in `phase` and precompute what stays fixed; -> the loader the
        phase iterates. Default: the image encoder and every extra module train."""
        for name, param in self.model.named_parameters():
            param.requires_grad_(not self.is_frozen(name))
        return train_loader

    def param_groups(self, phase):
        raise NotImplementedError

    def forward(self, model, inputs):
        """The training forward pass (runs inside DistributedDataParallel)."""
        return model(inputs)

    def loss(self, phase, outputs, labels):
        """-> ({term name: scalar tensor}, logits for the train accuracy or None)."""
        raise NotImplementedError

    def classify(self, model, images):
        """Identity logits for val accuracy / val loss, or None without an identity head."""
        return None

    def triplet_term(self, features, labels):
        """{"triplet": weighted batch-hard triplet loss} when triplet_weight > 0, else {}."""
        weight = self.config["triplet_weight"]
        if weight <= 0:
            return {}
        return {"triplet": weight * losses.batch_hard_triplet(
            features, labels, self.config["triplet_margin"], self.config["triplet_soft_margin"])}
