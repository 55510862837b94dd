"""What a training run shows while it runs, beside its human log and metrics JSONL: the
curves PNG (rewritten at every save point) and TensorBoard event files (one point per epoch).
The engine calls both from rank 0 with its per-epoch metric rows.
"""
from pathlib import Path

from matplotlib.figure import Figure

# Scalars written to TensorBoard per epoch, besides every loss_<term>; tag -> row key.
TENSORBOARD_SCALARS = {"loss/total": "train_loss", "accuracy/train": "train_acc",
                       "accuracy/val": "val_acc", "val/loss": "val_loss", "val/map": "val_map",
                       "lr": "lr", "speed/images_per_s": "images_per_s",
                       "speed/data_time_fraction": "data_time_fraction",
                       "speed/epoch_seconds": "epoch_time"}


def tensorboard_dir(log_path):
    """<log stem>_tensorboard/ beside the log: `tensorboard --logdir logs` finds every run."""
    path = Path(log_path)
    return path.with_name(f"{path.stem}_tensorboard")


class TensorBoardLog:
    """One scalar per metric per epoch (step = epoch). A resumed run continues the same folder;
    events of epochs after `first_epoch - 1` left by an interrupted run are purged."""

    def __init__(self, log_path, first_epoch):
        # Imported here: only a training run that writes events pays for it.
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(tensorboard_dir(log_path)), purge_step=first_epoch)

    def add(self, row):
        epoch = row["epoch"]
        for tag, key in TENSORBOARD_SCALARS.items():
            if row.get(key) is not None:
                self.writer.add_scalar(tag, row[key], epoch)
        for key, value in row.items():
            if key.startswith("loss_") and value is not None:
                self.writer.add_scalar(f"loss/{key[5:]}", value, epoch)
        self.writer.flush()

    def close(self):
        self.writer.close()


def plot_curves(handle, history, phases, best_epoch, selection, name):
    """Loss terms, accuracy and selection signals per epoch as a PNG written to `handle`.
    Every panel spans every epoch of the run; the selected (best) epoch and, for methods
    with several phases, where each phase starts are marked on every panel."""
    epochs = [row["epoch"] for row in history]
    total = sum(phase.epochs for phase in phases)
    figure = Figure(figsize=(15, 4))
    loss_axes, acc_axes, val_axes = figure.subplots(1, 3, sharex=True)
    terms = [k for k in history[-1] if k.startswith("loss_")] if history else []
    loss_axes.plot(epochs, [row["train_loss"] for row in history], marker="o", label="total")
    for term in terms if len(terms) > 1 else []:
        loss_axes.plot(epochs, [row.get(term) for row in history], marker=".", label=term[5:])
    loss_axes.set(xlabel="epoch", ylabel="loss", title="training loss")
    for key, label in (("train_acc", "train"), ("val_acc", "val")):
        if any(row.get(key) is not None for row in history):
            acc_axes.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    acc_axes.set(xlabel="epoch", ylabel="top-1 accuracy (%)", ylim=(0, 100),
                 title="identity accuracy")
    for key, label in (("val_loss", "val loss"), ("val_map", "val mAP (%)")):
        if any(row.get(key) is not None for row in history):
            val_axes.plot(epochs, [row.get(key) for row in history], marker="o", label=label)
    val_axes.set(xlabel="epoch", title=f"selection signals (selection: "
                                       f"{selection or 'last epoch'})")
    starts, first = [], 0
    for phase in phases[:-1]:
        first += phase.epochs
        starts.append((first + 0.5, phases[len(starts) + 1].name))
    for axes in (loss_axes, acc_axes, val_axes):
        for boundary, phase_name in starts:
            axes.axvline(boundary, color="grey", linestyle="--",
                         label=f"phase {phase_name} starts")
        if best_epoch is not None:
            axes.axvline(best_epoch, color="tab:red", linestyle=":",
                         label=f"selected epoch {best_epoch}")
        if axes.lines:
            axes.legend(fontsize="small")
    loss_axes.set_xlim(0.5, max(total, 1) + 0.5)
    figure.suptitle(name)
    figure.tight_layout()
    figure.savefig(handle, format="png", dpi=100)
