"""The documented object of Stage-1 training:
`FinetuneTrainerStage1(clip_model, classifier, train_loader, config, device).train()` trains
the CLIP image encoder and an identity head with cross-entropy (text tower frozen): the
training engine (handreid/train/engine.py) running the method Stage1
(handreid/methods/stage1.py) with the caller's head. The project's scripts train any method
through experiments/train.py instead."""
from handreid.methods.stage1 import Stage1
from handreid.train.engine import Engine

__all__ = ["FinetuneTrainerStage1"]


class FinetuneTrainerStage1(Engine):
    """The Stage-1 run as one object: trains `classifier` (from make_model.build_model(config,
    num_classes), as `head:` says) on top of `clip_model.visual` (text tower frozen) on
    `train_loader` batches (images, class indices); train() runs or resumes it."""

    def __init__(self, clip_model, classifier, train_loader, config, device, val_loader=None,
                 overwrite=False):
        if classifier is None:
            raise ValueError("Stage 1 trains an identity head: build_model(config, num_classes)")
        method = Stage1(config, clip_model, train_loader.dataset.classes)
        method.model.extras["classifier"] = classifier  # the caller's head, not a new one
        super().__init__(method, train_loader, config, device, val_loader, overwrite)
