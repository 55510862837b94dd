"""The documented front of Stage-1 training:
`FinetuneTrainerStage1(clip_model, classifier, train_loader, config, device).train()` trains
the CLIP image encoder and an identity head with cross-entropy (text tower frozen). The code
lives in handreid/methods/stage1.py; the project itself imports it from there."""
from handreid.methods.stage1 import FinetuneTrainerStage1

__all__ = ["FinetuneTrainerStage1"]
