"""The documented front of the model: `build_model(config, num_classes=None, freeze_text=True)`
gives the config's CLIP (text tower frozen) and, with num_classes, its identity head. The code
lives in handreid/model/backbone.py; the project itself imports it from there."""
from handreid.model.backbone import build_model

__all__ = ["build_model"]
