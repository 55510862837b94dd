"""Stage 1: fine-tune the CLIP image encoder and an identity head with cross-entropy while the
text tower stays frozen; a method (base.py) of the training engine (train/engine.py).

One phase of `epochs`: AdamW over the image encoder (lr) and the head (lr x head_lr_mult),
no weight decay on norms, biases and embeddings; identity cross-entropy with label smoothing,
plus the batch-hard triplet loss on the identity features when triplet_weight > 0 (best
with sampler: pk). The head (`head:` linear or bnneck) is the module `classifier`; the
retrieval feature is the image embedding, or its BN output for head: bnneck. Everything else
(schedule, precision, DDP, selection, checkpoints, resume, logs) is the engine's.
"""
from torch import nn

from handreid.core.errors import UserError
from handreid.methods.base import Method, encoder_and_head_groups
from handreid.model import backbone


def retrieval_feature(head):
    """The BN output of a bnneck head, else the image embedding."""
    return {"kind": "bn", "module": "classifier"} if head == "bnneck" else {"kind": "embedding"}


class Stage1(Method):
    name = "stage1"
    train_script = "experiments/train_stage1_frozen_text.py"

    @staticmethod
    def check_checkpoint(path, trained, config):
        if trained.get("head", "linear") != config["head"]:
            raise UserError(f"{path} has a {trained.get('head')} head but the config says head: "
                            f"{config['head']}; set head: {trained.get('head')}")

    def __init__(self, config, clip_model, identity_names):
        super().__init__(config, clip_model, identity_names)
        classifier = backbone.make_classifier(config["head"], backbone.embed_dim(config),
                                              len(self.identity_names),
                                              config["classifier_init_std"])
        # Stage 1 trains the image encoder only, whatever the caller's model froze.
        backbone.freeze_text_tower(clip_model)
        self.model = backbone.HandIdModel(clip_model, extras={"classifier": classifier},
                                          feature=retrieval_feature(config["head"]))
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])

    def module_specs(self):
        return {"classifier": backbone.classifier_spec(
            self.config["head"], backbone.embed_dim(self.config), len(self.identity_names))}

    def param_groups(self, phase):
        return encoder_and_head_groups(self.config, self.model.clip_model.visual, "head",
                                       self.model.extras["classifier"])

    def forward(self, model, images):
        """-> (logits, identity features, embedding before the BNNeck's BN)."""
        embedding = model.clip_model.encode_image(images)
        classifier = model.extras["classifier"]
        if isinstance(classifier, backbone.BNNeck):
            features = classifier.bn(embedding)
            return classifier.fc(features), features, embedding
        return classifier(embedding), embedding, embedding

    def loss(self, phase, outputs, labels):
        logits, _, embedding = outputs
        # The triplet loss works on the embedding before the BN (BNNeck, Luo et al. 2019).
        return {"ce": self.criterion(logits, labels), **self.triplet_term(embedding, labels)}, \
            logits

    def classify(self, model, images):
        return self.forward(model, images)[0]
