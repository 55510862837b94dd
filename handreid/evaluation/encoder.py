"""A model loaded from an eval config (refused when it was trained on the identities an
evaluation tests; noted when its run is unfinished), its fingerprint, and image paths ->
retrieval features.

Shared by the scripts that use a trained (or the baseline) model outside the protocol:
extract_features.py, search.py, export_onnx.py, calibrate.py and compare_photos.py. The
fingerprint changes with anything that changes a feature (weights, feature function,
preprocessing, flip): features and calibrations made by one model are refused for another by
comparing it.
"""
import hashlib
import json

import torch

from handreid.evaluation import protocol
from handreid.checkpoint import model_checkpoint
from handreid.model import backbone
from handreid.data.loaders import eval_loader
from handreid.core import registry
from handreid.core.config_files import dataset_dir
from handreid.core.errors import UserError
from handreid.core.runtime import resolve_device


def load_model(config, test_identities=None):
    """-> (HandIdModel, checkpoint info or None) for the config's variant. With
    `test_identities` (the evaluated protocol's: protocol_identities), a checkpoint trained on
    any of them is refused."""
    if config["variant"] == "baseline":
        # Random-initialised backbones (model: tiny, pretrained: none) then give the same
        # baseline on every run.
        torch.manual_seed(config["seed"])
        clip_model, _ = backbone.build_model(config)
        return backbone.HandIdModel(clip_model), None
    # The checkpoint's method is imported (registry) for the kinds of its modules and feature.
    model, ckpt = model_checkpoint.load_checkpoint(config["save_path"], config)
    if test_identities is not None:
        check_unseen(config, ckpt, test_identities)
    info = {"path": str(config["save_path"]), "method": ckpt["method"], "epoch": ckpt["epoch"],
            "selection": ckpt["selection"], "val_accuracy": ckpt["selection"].get("val_accuracy"),
            "feature": ckpt["feature"], "backbone": ckpt["backbone"],
            "num_train_identities": len(ckpt["identity_names"]),
            "data": ckpt.get("data"),
            "unfinished": model_checkpoint.unfinished_note(config["save_path"], ckpt),
            "train_config": ckpt["config"]}
    return model, info


def protocol_identities(config):
    """The identities of the evaluated protocol: every query and gallery folder of its
    num_splits splits (other 11k aspects' gallery images carry <aspect>__<id> names)."""
    root = dataset_dir(config)
    return {identity.name for pair in protocol.split_names(config) for split in pair
            if (root / split).is_dir() for identity in (root / split).iterdir()
            if identity.is_dir()}


def check_unseen(config, ckpt, test_identities):
    """UserError when the checkpoint was trained on identities the evaluation tests: its
    scores would count people it has learned (e.g. a checkpoint of another dataset)."""
    seen = sorted(set(ckpt["identity_names"]) & set(test_identities))
    if not seen:
        return
    trained_on = (ckpt.get("data") or {}).get("split_folder") or ckpt["config"]["data_dir"]
    shown = ", ".join(seen[:5]) + (", ..." if len(seen) > 5 else "")
    raise UserError(f"{config['save_path']} was trained on {len(seen)} of the identities this "
                    f"evaluation tests ({shown}; it was trained on {trained_on}, this evaluates "
                    f"{dataset_dir(config)}): its scores would count people it has learned; "
                    f"point save_path: at a checkpoint trained on this data's train split, or "
                    f"train one: {registry.train_command(config['method'])} with data_dir: "
                    f"{config['data_dir']}")


def weights_digest(model):
    """sha256 of every tensor of the model's state (names, shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def describe_model(config, model, checkpoint):
    """What makes the features: a JSON-ready dict whose 'fingerprint' changes with anything
    that changes a feature (weights, feature function, preprocessing, flip)."""
    spec = backbone.preprocess_spec(config)
    # The model's own definition (from its checkpoint: embedding, BNNeck output, CLIP-ReID's
    # concatenation ...), not the config's head, which Stage-2 checkpoints do not use.
    feature = {"definition": dict(model.feature), "flip": config["flip"],
               "l2_normalised": True}
    preprocessing = {"image_size": spec["image_size"], "mean": list(spec["mean"]),
                     "std": list(spec["std"]),
                     "resize": "RGB, squash-resized to image_size (a side, or height x "
                               "width; bicubic)",
                     "draft_decode": config["cache_images"]}
    weights = weights_digest(model)
    fingerprint = hashlib.sha256(json.dumps(
        [weights, feature, {k: preprocessing[k] for k in ("image_size", "mean", "std")}],
        sort_keys=True).encode()).hexdigest()
    return {"name": config["name"], "model": config["model"], "variant": config["variant"],
            "checkpoint": checkpoint and {k: v for k, v in checkpoint.items()
                                          if k != "train_config"},
            "feature": feature, "preprocessing": preprocessing, "weights_sha256": weights,
            "fingerprint": fingerprint}


class Encoder:
    """A model loaded from an eval config, ready to turn image paths into features."""

    def __init__(self, config):
        self.config = config
        self.device = resolve_device(config)
        model, checkpoint = load_model(config)
        self.description = describe_model(config, model, checkpoint)  # on CPU, before moving
        self.model = model.to(self.device)

    def encode(self, paths):
        """float32 numpy [N, D], L2-normalised, row i = paths[i]: the evaluation's own decode,
        batching, precision and feature function."""
        loader = eval_loader(self.config, list(paths))
        features = protocol.extract_features(self.model, loader, self.device,
                                               flip=self.config["flip"], amp=self.config["amp"])
        return features.float().cpu().numpy()
