"""Files of the first release (Stage 1 only), read by today's code: each is converted on load
into today's layout, here and nowhere else. Nothing writes these formats any more.
"""
from handreid.model.backbone import classifier_spec

# (format, format_version) of a first-release Stage-1 checkpoint and its keys.
CHECKPOINT_V1 = ("clip-handid-stage1", 1)
CHECKPOINT_V1_KEYS = ("config", "backbone", "quick_gelu", "image_size", "embed_dim",
                      "clip_state_dict", "classifier_state_dict", "head", "identity_names",
                      "epoch", "val_accuracy")
# (format, format_version) of a first-release Stage-1 resume state.
RESUME_V1 = ("clip-handid-stage1-resume", 1)


def checkpoint_from_v1(ckpt):
    """A first-release Stage-1 checkpoint as a clip-handid v2 checkpoint: the classifier
    becomes the module "classifier", the feature follows the head, val accuracy becomes the
    selection record."""
    head, state = ckpt["head"], ckpt["classifier_state_dict"]
    has_head = state is not None
    return {**ckpt, "method": "stage1",
            "modules": {"classifier": state} if has_head else {},
            "module_specs": {"classifier": classifier_spec(
                head, ckpt["embed_dim"], len(ckpt["identity_names"]))} if has_head else {},
            "feature": {"kind": "bn", "module": "classifier"} if head == "bnneck" and has_head
            else {"kind": "embedding"},
            "selection": {"metric": "val_accuracy", "value": ckpt["val_accuracy"],
                          "val_accuracy": ckpt["val_accuracy"]}}


def resume_state_from_v1(state):
    """A first-release Stage-1 resume state as a v2 resume-state dict: one phase, the best
    epoch selected by val accuracy, the trained weights under HandIdModel's names, no
    fingerprint of the frozen weights (it was not kept)."""
    accuracy = state["best_val_accuracy"]
    converted = {**state, "method": "stage1", "phase": 0, "frozen_digest": None,
                 "best": {"epoch": state["best_epoch"], "metric": "val_accuracy",
                          "value": accuracy, "signals": {"val_accuracy": accuracy}}}
    if not state["finished"]:
        trained = {f"clip_model.{k}": v for k, v in state["clip_state_dict"].items()}
        trained.update({f"extras.classifier.{k}": v
                        for k, v in state["classifier_state_dict"].items()})
        converted["trained"] = trained
    return converted
