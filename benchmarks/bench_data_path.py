"""Loader throughput on full-size (1600x1200) JPEGs: the reference path (full decode of every
image on every pass, decoding workers) against the fast path (`cache_images: true`: one
draft-mode decode per image, then tensors in memory, augmented per image in the workers)
and the device path (`augment_on: device`: the loader hands over cached uint8 batches, the
augmentation runs batched on the device, here this CPU), measured side by side in one run on
the real training loader. Also reports how closely the reference and the cached path's
evaluation inputs and ViT-B/16 features agree.

    python benchmarks/bench_data_path.py [--epochs 8] [--out benchmarks/results/data_path.md]

The device path runs on this CPU's OpenMP threads; the script waits passively between
parallel regions (OMP_WAIT_POLICY=PASSIVE unless set).
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

from handreid.core.startup import start

start()

ROOT = Path(__file__).resolve().parents[1]

import torch
from PIL import Image

from handreid.data.device_augment import device_augment
from handreid.data.loaders import eval_loader, get_train_val_loaders, list_split, set_loader_epoch
from handreid.core.config_files import load_config
from handreid.core.atomic_files import atomic_write_text
from handreid.model.backbone import HandIdModel, build_model, preprocess_spec
from synthetic_data import prepare_synthetic_11k


def make_data(folder, subjects, per_aspect, config):
    """Synthetic raw 11k, prepared in place, whose dorsal_r train and val images are then
    upscaled to the real 1600x1200. Drawing at full size costs over 0.1 s an image; decoding
    cost depends on the pixel count, which this keeps. The split entries are hard links, so
    rewriting them in place rewrites the raw files too."""
    prepare_synthetic_11k(folder, subjects, 1, "--images-per-aspect", per_aspect)
    for path, _ in list_split(config, "train") + list_split(config, "val"):
        with Image.open(path) as image:
            image = image.resize((1600, 1200), Image.BICUBIC)
        image.save(path, quality=90)


def epoch_rates(config, epochs):
    """images/s of each epoch of the train loader, with the batched augmentation on this
    CPU as the device under augment_on: device; the first epoch includes building the
    loader (and the cache)."""
    start = time.perf_counter()
    loader, _, _ = get_train_val_loaders(config)
    augment = device_augment(config)
    generator = torch.Generator()
    rates = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        generator.manual_seed(epoch)
        seen = 0
        for images, _ in loader:
            if augment is not None:
                images = augment(images, generator)
            seen += len(images)
        rates.append(seen / (time.perf_counter() - start))
        start = time.perf_counter()
    return rates


def feature_agreement(config, paths):
    """Max and mean |pixel difference| (0-255) between the reference and the fast path's
    evaluation inputs, and how far apart their ViT-B/16 (random init) features are relative
    to the distance between different images (a random network's features all point much
    the same way, so a raw cosine near 1 would say little)."""
    inputs = {}
    for cached in (False, True):
        config = dict(config, cache_images=cached)
        inputs[cached] = torch.cat([x for x, _ in eval_loader(config, paths, batch_size=16)])
    std = torch.tensor(preprocess_spec(config)["std"]).view(1, 3, 1, 1)
    pixel = ((inputs[True] - inputs[False]) * std * 255).abs()
    torch.manual_seed(0)
    clip_model, _ = build_model(dict(config, pretrained="none"))
    model = HandIdModel(clip_model).eval()
    with torch.inference_mode():
        feats = {k: torch.nn.functional.normalize(model.features(v), dim=-1)
                 for k, v in inputs.items()}
    path_gap = (feats[True] - feats[False]).norm(dim=1)
    image_gap = torch.pdist(feats[False]).mean()
    return (pixel.max().item(), pixel.mean().item(), (path_gap.max() / image_gap).item(),
            (path_gap.mean() / image_gap).item())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--subjects", type=int, default=40)
    parser.add_argument("--images-per-aspect", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = load_config(None, [("model", "vitb16"), ("data_dir", tmp), ("batch_size", 32),
                                    ("num_workers", args.workers)])
        make_data(tmp, args.subjects, args.images_per_aspect, config)
        n = len(list_split(config, "train"))
        reference = epoch_rates(dict(config, cache_images=False, augment_on="loader"),
                                args.epochs)
        fast = epoch_rates(dict(config, cache_images=True, augment_on="loader"), args.epochs)
        device = epoch_rates(dict(config, cache_images=True, augment_on="device"), args.epochs)
        paths = [p for p, _ in list_split(config, "val")][:16]
        pix_max, pix_mean, gap_max, gap_mean = feature_agreement(config, paths)
    steady_ref = sum(reference[1:]) / max(1, len(reference) - 1)
    steady_fast = sum(fast[1:]) / max(1, len(fast) - 1)
    steady_device = sum(device[1:]) / max(1, len(device) - 1)
    lines = [
        f"Train loader on {n} synthetic 1600x1200 JPEGs -> 224x224 (ViT-B/16 input), batch 32, "
        f"{args.epochs} epochs, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}:",
        "",
        "| path | epoch 1 img/s (incl. setup) | later epochs img/s |",
        "|---|---|---|",
        f"| reference (decode every epoch, {args.workers} workers) | {reference[0]:.1f} | "
        f"{steady_ref:.1f} |",
        f"| fast (cache_images, augment_on: loader, {args.workers} workers) | {fast[0]:.1f} | "
        f"{steady_fast:.1f} |",
        f"| device (cache_images, augment_on: device, on this CPU) | {device[0]:.1f} | "
        f"{steady_device:.1f} |",
        "",
        f"Ratio, later epochs: fast {steady_fast / steady_ref:.1f}x the reference, device "
        f"{steady_device / steady_fast:.1f}x fast; first epoch: fast "
        f"{fast[0] / reference[0]:.1f}x the reference, device {device[0] / fast[0]:.1f}x fast.",
        f"Eval inputs fast vs reference on {len(paths)} images: max |pixel diff| "
        f"{pix_max:.1f}/255, mean {pix_mean:.2f}/255; ViT-B/16 (random init) feature distance "
        f"between the paths, relative to the mean distance between different images: max "
        f"{gap_max:.4f}, mean {gap_mean:.4f}.",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        atomic_write_text(args.out, text + "\n\n")


if __name__ == "__main__":
    main()
