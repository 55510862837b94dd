"""Model selection: the signals measured on val/ after an epoch, the rule that says whether an
epoch is the best so far, and early stopping. The engine asks after every selecting epoch;
the `Best` record travels in resume states and checkpoints.
"""
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from tqdm import tqdm

from handreid.data.loaders import train_gallery_loader
from handreid.core.errors import ConfigError
from handreid.metrics.ranking import compute_reid_metrics
from handreid.core.runtime import autocast

# Higher is better for these selection signals; lower for val_loss.
HIGHER_IS_BETTER = {"val_accuracy": True, "val_map": True, "val_loss": False}


@dataclass
class Best:
    """The selected epoch: `metric` is the rule's signal (None: no val/, or last), `value` its
    value then, `signals` every signal measured at that epoch."""
    epoch: int = None
    metric: str = None
    value: float = None
    signals: dict = field(default_factory=dict)

    def as_dict(self):
        return asdict(self)

    def record(self):
        """The checkpoint's selection record: {"metric", "value", each signal}."""
        return {"metric": self.metric, "value": self.value, **self.signals}

    def describe(self):
        if self.epoch is None:
            return "n/a"
        if self.metric is None or self.value is None:
            return f"epoch {self.epoch}"
        return f"{self.metric} {self.value:.4g} at epoch {self.epoch}"


class Selection:
    """The best-epoch rule of `config` (selection:, early_stop_patience:) over the phases
    that select. Without val/ every epoch counts as the newest best."""

    def __init__(self, config, has_val):
        self.rule = config["selection"] if has_val else None
        self.patience = config["early_stop_patience"] or 0
        if self.patience and self.rule not in HIGHER_IS_BETTER:
            raise ConfigError(f"early_stop_patience needs a selection signal on val/ to wait "
                              f"for (selection: {', '.join(HIGHER_IS_BETTER)}, and a val/ "
                              f"split); set early_stop_patience: 0 or change selection")
        self.best = Best(metric=self.rule)

    def restore(self, best):
        """Continue from a resume state's Best."""
        self.best = best
        if best.metric != self.rule:
            # A run started under another selection rule (older code): the next epoch that
            # has the current rule's signal becomes the best.
            self.best = Best(best.epoch, self.rule, None, best.signals)

    def improves(self, signals):
        # selection: last keeps every newer epoch (CLIP-ReID evaluates the last one).
        if self.rule in (None, "last") or self.best.epoch is None:
            return True
        value, best = signals.get(self.rule), self.best.value
        if value is None or best is None:
            return True
        # Ties go to the later epoch: it has trained longer at a lower lr.
        return value >= best if HIGHER_IS_BETTER[self.rule] else value <= best

    def update(self, epoch, signals):
        """Whether `epoch` with `signals` is the new best (then it is recorded)."""
        if not self.improves(signals):
            return False
        self.best = Best(epoch, self.rule, signals.get(self.rule), signals)
        return True

    def early_stop(self, epoch, history, phase_selects, total_epochs):
        """Why the run stops after `epoch` (None: it goes on). Counts the validated epochs
        since the best one from `history` (rows with "epoch" and "phase"; phase_selects:
        {phase name: whether it selects}) alone, so a resumed run stops where an
        uninterrupted one does."""
        if not self.patience or self.best.epoch is None or epoch == total_epochs:
            return None
        stale = sum(1 for row in history
                    if row["epoch"] > self.best.epoch and phase_selects.get(row.get("phase"), True))
        if stale < self.patience:
            return None
        return (f"early stop after epoch {epoch}: {self.rule} has not improved for {stale} "
                f"epochs (early_stop_patience {self.patience}); best {self.best.describe()}")


@torch.no_grad()
def validation_signals(method, model, val_loader, train_loader, config, rule, device,
                       amp_dtype):
    """Selection signals on val/: val_accuracy and val_loss (%, cross-entropy) of the
    identity head, val_map (val images ranked against the train images) when `rule` is
    val_map. Runs the unwrapped model: DDP's collective calls would wait for the other
    ranks."""
    if val_loader is None:
        return {}
    model.eval()
    signals = {}
    logits, labels = [], []
    with autocast(device, amp_dtype):
        for images, targets in tqdm(val_loader, desc="val", unit="batch", leave=False,
                                    disable=None):
            out = method.classify(model, images.to(device, non_blocking=True))
            if out is None:
                break
            logits.append(out.float())
            labels.append(targets.to(device))
    if logits:
        logits, labels = torch.cat(logits), torch.cat(labels)
        signals["val_accuracy"] = 100.0 * (logits.argmax(1) == labels).float().mean().item()
        signals["val_loss"] = F.cross_entropy(logits, labels).item()
    if rule == "val_map":
        query, query_ids = _encode(model, val_loader, device, amp_dtype)
        gallery, gallery_ids = _encode(model, train_gallery_loader(config, train_loader),
                                       device, amp_dtype)
        signals["val_map"] = compute_reid_metrics(query @ gallery.T, query_ids,
                                                  gallery_ids)["mAP"]
    model.train()
    return signals


def _encode(model, loader, device, amp_dtype):
    features, labels = [], []
    with autocast(device, amp_dtype):
        for images, targets in loader:
            batch = model.features(images.to(device, non_blocking=True))
            features.append(F.normalize(batch.float(), dim=1))
            labels += targets.tolist()
    return torch.cat(features), labels
