"""The documented front of the data loaders: `get_train_val_loaders(config)` gives the train
and val loaders of a config's prepared dataset. The code lives in handreid/data/loaders.py;
the project itself imports it from there."""
from handreid.data.loaders import get_train_val_loaders

__all__ = ["get_train_val_loaders"]
