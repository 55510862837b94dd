"""A training method in a few lines that is not Stage 1, which the engine and early-stopping
tests train. Apart from both: a test module imports no other test module, and conftest.py
cannot define a Method without importing torch."""
import torch.nn.functional as F

from conftest import InterruptedLoader
from handreid.data.loaders import get_train_val_loaders
from handreid.model import backbone
from handreid.train.engine import Engine
from handreid.methods.base import Method, Phase
from handreid.core.runtime import seed_everything


class HeadThenAll(Method):
    """A toy method: phase 1 trains only a BNNeck head, phase 2 the image encoder too, with
    cross-entropy + batch-hard triplet over pk batches; retrieval uses the BN feature."""
    name = "toy_head_then_all"

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, clip_model, identity_names)
        self.spec = {"kind": "bnneck", "dim": backbone.embed_dim(config),
                     "num_classes": len(identity_names)}
        self.model = backbone.HandIdModel(clip_model, extras={"neck": backbone.build_module(
            self.spec)}, feature={"kind": "bn", "module": "neck"})

    def phases(self):
        return [Phase("head", 1, selects=False), Phase.from_config(self.config, "all")]

    def module_specs(self):
        return {"neck": self.spec}

    def start_phase(self, phase, train_loader, device):
        super().start_phase(phase, train_loader, device)
        if phase.name == "head":
            self.model.clip_model.visual.requires_grad_(False)
        return train_loader

    def param_groups(self, phase):
        return [{"name": "trained", "lr": self.config["lr"], "weight_decay": 0.0,
                 "params": [p for p in self.model.parameters() if p.requires_grad]}]

    def forward(self, model, images):
        embedding = model.clip_model.encode_image(images)
        neck = model.extras["neck"]
        return neck.fc(neck.bn(embedding)), embedding

    def loss(self, phase, outputs, labels):
        logits, embedding = outputs
        return {"ce": F.cross_entropy(logits, labels),
                **self.triplet_term(embedding, labels)}, logits

    def classify(self, model, images):
        return self.forward(model, images)[0]


def toy_engine(config, stop_at=None):
    seed_everything(config["seed"])
    train_loader, val_loader, _ = get_train_val_loaders(config)
    method = HeadThenAll.build(config, train_loader.dataset.classes)
    if stop_at:
        train_loader = InterruptedLoader(train_loader, stop_at)
    return Engine(method, train_loader, config, "cpu", val_loader)
