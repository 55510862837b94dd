"""Stage 1: fine-tune the CLIP image encoder and an identity head with cross-entropy while the
text tower stays frozen; a method (method.py) of the training engine (engine.py).

One phase of `epochs`: AdamW over the image encoder (lr) and the head (lr x head_lr_mult),
no weight decay on norms, biases and embeddings; identity cross-entropy with label smoothing,
plus the batch-hard triplet loss on the identity features when triplet_weight > 0 (best
with sampler: pk). The retrieval feature is the image embedding, or its BN output for
head: bnneck. Everything else (schedule, precision, DDP, selection, checkpoints, resume, logs)
is the engine's; see engine.py for the files a run writes.
"""
from torch import nn

from handreid.model import backbone
from handreid.train.engine import Engine
from handreid.train.method import Method, encoder_and_head_groups


class Stage1(Method):
    name = "stage1"

    @classmethod
    def build(cls, config, identity_names, num_classes):
        clip_model, classifier = backbone.build_model(config, num_classes)
        return cls(config, clip_model, identity_names, classifier)

    def __init__(self, config, clip_model, identity_names, classifier=None):
        super().__init__(config, identity_names)
        if classifier is None:
            classifier = backbone.make_classifier(config["head"], backbone.embed_dim(config),
                                                    len(identity_names),
                                                    config["classifier_init_std"])
        # Stage 1 trains the image encoder only, whatever the caller's model froze.
        backbone.freeze_text_tower(clip_model)
        self.model = backbone.HandIdModel(clip_model, classifier)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=config["label_smoothing"])

    def module_specs(self):
        return {"classifier": backbone.classifier_spec(
            self.config["head"], backbone.embed_dim(self.config), len(self.identity_names))}

    def param_groups(self, phase):
        return encoder_and_head_groups(self.config, self.model.clip_model.visual, "head",
                                       self.model.classifier)

    def forward(self, model, images):
        """-> (logits, identity features, embedding before the BNNeck's BN)."""
        embedding = model.clip_model.encode_image(images)
        classifier = model.classifier
        if isinstance(classifier, backbone.BNNeck):
            features = classifier.bn(embedding)
            return classifier.fc(features), features, embedding
        return classifier(embedding), embedding, embedding

    def loss(self, phase, outputs, labels):
        logits, _, embedding = outputs
        # The triplet loss works on the embedding before the BN (BNNeck, Luo et al. 2019).
        return {"ce": self.criterion(logits, labels), **self.triplet_term(embedding, labels)}, \
            logits


class FinetuneTrainerStage1(Engine):
    """The Stage-1 run as one object: trains `classifier` on top of `clip_model.visual`
    (text tower frozen) on `train_loader` batches (images, class indices); train() runs or
    resumes it."""

    def __init__(self, clip_model, classifier, train_loader, config, device, val_loader=None,
                 overwrite=False):
        if classifier is None:
            raise ValueError("Stage 1 trains an identity head: build_model(config, num_classes)")
        method = Stage1(config, clip_model, train_loader.dataset.classes, classifier)
        super().__init__(method, train_loader, config, device, val_loader, overwrite)
