"""Feature extraction and the multi-split re-identification protocol.

Split i ranks the images of query{i} against a gallery: gallery{i}_all on 11k (the published
protocol: the four aspects' galleries, other aspects as distractors), gallery{i} on 11k with
`gallery: aspect`, gallery{i} on HD (which holds the 502-712 distractors). Labels are identity
NAMES, so query and gallery folders with different identity sets line up.

The splits only re-draw which image of each identity sits in the gallery, so every split shows
(nearly) the same images. The union of all splits is encoded once - a unique image is its
source file, identified by the (device, inode) of the resolved path, which the prepare scripts
make one per source image - and each split's metrics index that feature cache. Ten splits cost
one encoding pass plus ten small rankings.

Spread over splits is the sample standard deviation (ddof=1): the splits are random draws and
the std estimates how much a new split would move the numbers. One split has no std (None).
"""
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from build_dataloader import eval_loader, list_split
from config import UserError, dataset_dir, prepare_command
from reid_metrics import compute_reid_metrics
from runtime import resolve_precision

METRICS = ("rank1", "rank5", "rank10", "mAP", "mINP")
STD_DDOF = 1


def extract_features(model, loader, device, flip=False, amp="auto"):
    """L2-normalised identity features [N, D] (float32, on `device`) of a loader that yields
    (images, index) batches; row i is the image with index i, whatever the batch order.

    `model` is a make_model.HandIdModel: `model.features` is the one feature function shared
    with training. `amp` is the config's precision (auto: bf16 autocast on CUDA where
    supported, else fp16; fp32 on CPU). With `flip`, the image and its horizontal mirror are
    each encoded and L2-normalised, and the mean of the two unit vectors is normalised again,
    so both views weigh the same whatever their raw feature norms.
    """
    dtype = resolve_precision(amp, device)
    was_training = model.training
    model.eval()
    features = None
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            for images, index in tqdm(loader, desc="encoding images", unit="batch",
                                      disable=None, leave=False):
                images = images.to(device, non_blocking=True)
                batch = F.normalize(model.features(images).float(), dim=1)
                if flip:
                    mirrored = F.normalize(model.features(images.flip(3)).float(), dim=1)
                    batch = F.normalize(batch + mirrored, dim=1)
                if features is None:
                    features = torch.zeros(len(loader.dataset), batch.shape[1], device=device)
                features[index.to(device)] = batch
    finally:
        model.train(was_training)
    if features is None:
        raise UserError("no images to encode: the evaluation splits are empty; re-run the "
                        "prepare script")
    return features


def gallery_template(config):
    """The gallery folder name of split {i} for this config."""
    return "gallery{i}_all" if config["dataset"] == "11k" and config["gallery"] == "all" \
        else "gallery{i}"


def split_names(config):
    """[(query folder, gallery folder)] of splits 0..num_splits-1 for this config."""
    gallery = gallery_template(config)
    return [(f"query{i}", gallery.format(i=i)) for i in range(config["num_splits"])]


def check_data(config):
    """Fail fast, before a model is loaded: the dataset is prepared and has num_splits splits."""
    root = dataset_dir(config)
    if not (root / "query0").is_dir():
        list_split(config, "query0")  # raises the missing-dataset error with the prepare command
    last = f"query{config['num_splits'] - 1}"
    if not (root / last).is_dir():
        prepared = sum((root / f"query{i}").is_dir() for i in range(config["num_splits"]))
        raise UserError(f"num_splits is {config['num_splits']} but {root} has {prepared} "
                        f"prepared splits; set num_splits: {prepared} (e.g. --set "
                        f"num_splits={prepared}) or re-prepare with --num-splits "
                        f"{config['num_splits']}: {prepare_command(config)}")


@dataclass
class Split:
    """One query/gallery split: listed paths and names, and rows of the unique-image cache."""
    query: str
    gallery: str
    query_paths: list
    query_ids: list
    query_rows: torch.Tensor
    gallery_paths: list
    gallery_ids: list
    gallery_rows: torch.Tensor


def collect_splits(config):
    """-> (unique image paths, [Split], number of images listed over all splits).

    A unique image is keyed by os.stat(realpath) (st_dev, st_ino); its first listed path
    stands for it."""
    check_data(config)
    row_of, paths, splits, listed = {}, [], [], 0

    def rows(items):
        out = []
        for path, _ in items:
            stat = os.stat(os.path.realpath(path))
            key = (stat.st_dev, stat.st_ino)
            if key not in row_of:
                row_of[key] = len(paths)
                paths.append(path)
            out.append(row_of[key])
        return torch.tensor(out, dtype=torch.long)

    for query_name, gallery_name in split_names(config):
        query, gallery = list_split(config, query_name), list_split(config, gallery_name)
        listed += len(query) + len(gallery)
        splits.append(Split(query_name, gallery_name,
                            [p for p, _ in query], [n for _, n in query], rows(query),
                            [p for p, _ in gallery], [n for _, n in gallery], rows(gallery)))
    return paths, splits, listed


def split_similarity(features, split):
    """Cosine similarity [queries, gallery] of one split from the unique-image features."""
    device = features.device
    return features[split.query_rows.to(device)] @ features[split.gallery_rows.to(device)].T


def summarise(per_split):
    """Mean and sample std (ddof=1; None for one split) of each metric and the CMC curve."""
    mean, std = {}, {}
    for key in METRICS + ("cmc",):
        values = np.array([split[key] for split in per_split], dtype=np.float64)
        mean[key] = values.mean(0).tolist()
        std[key] = values.std(0, ddof=STD_DDOF).tolist() if len(values) > 1 else None
    return mean, std


@dataclass
class Evaluation:
    """The JSON-ready report plus what plots need: the features and the splits."""
    report: dict
    features: torch.Tensor
    splits: list


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def evaluate(model, config, device):
    """Run the multi-split protocol with `model` (a HandIdModel already on `device`).

    report: per_split (metrics of each split with its folder names and sizes), mean, std
    (ddof=1), counts (images_listed, unique_images, images_encoded = unique images x views),
    timings (seconds: list, load, encode, metrics, total) and the protocol settings."""
    start = time.perf_counter()
    paths, splits, listed = collect_splits(config)
    listed_at = time.perf_counter()
    loader = eval_loader(config, paths)
    loaded_at = time.perf_counter()
    features = extract_features(model, loader, device, flip=config["flip"], amp=config["amp"])
    _sync(device)
    encoded_at = time.perf_counter()

    per_split = []
    for index, split in enumerate(tqdm(splits, desc="ranking splits", unit="split",
                                       disable=None, leave=False)):
        metrics = compute_reid_metrics(split_similarity(features, split), split.query_ids,
                                       split.gallery_ids, max_rank=config["max_rank"],
                                       ap_mode=config["ap_mode"])
        per_split.append({"split": index, "query": split.query, "gallery": split.gallery,
                          "num_gallery": len(split.gallery_ids),
                          "num_gallery_identities": len(set(split.gallery_ids)), **metrics})
    _sync(device)
    done = time.perf_counter()
    mean, std = summarise(per_split)
    views = 2 if config["flip"] else 1
    report = {
        "per_split": per_split, "mean": mean, "std": std, "std_ddof": STD_DDOF,
        "num_splits": len(splits), "gallery": gallery_template(config),
        "ap_mode": config["ap_mode"], "max_rank": config["max_rank"], "flip": config["flip"],
        "counts": {"images_listed": listed, "unique_images": len(paths),
                   "images_encoded": len(paths) * views},
        "timings": {"list_seconds": listed_at - start, "load_seconds": loaded_at - listed_at,
                    "encode_seconds": encoded_at - loaded_at, "metrics_seconds": done - encoded_at,
                    "total_seconds": done - start},
    }
    return Evaluation(report, features, splits)
