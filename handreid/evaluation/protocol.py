"""Feature extraction and the multi-split re-identification protocol.

Split i ranks the images of query{i} against a gallery: gallery{i}_all on 11k (the published
protocol: the four aspects' galleries, other aspects as distractors), gallery{i} on 11k with
`gallery: aspect`, gallery{i} on HD (which holds the 502-712 distractors). Labels are identity
NAMES, so query and gallery folders with different identity sets line up.

The splits only re-draw which image of each identity sits in the gallery, so every split shows
(nearly) the same images. The union of all splits is encoded once - a unique image is its
source file, identified by the (device, inode) of the resolved path, which the prepare scripts
make one per source image - and each split's metrics index that feature cache. Ten splits cost
one encoding pass plus ten small rankings. A FeatureStore carries features across configs of
one process (run_all), keyed by the model's identity and the image file.

Each split reports the ranking metrics (CMC, mAP under both AP rules, mINP; re-ranked with
`rerank: true`), verification metrics over all its query x gallery pairs (EER, TAR at FAR
1e-2/1e-3/1e-4) and, with `open_set: true`, open-set identification metrics (FNIR at FPIR
0.1/0.01) with a seeded half of the test identities taken out of the gallery. Verification and
open-set metrics always use the cosine scores: re-ranked distances are not comparable across
queries.

Spread over splits is the sample standard deviation (ddof=1): the splits are random draws and
the std estimates how much a new split would move the numbers. One split has no std (None).
"""
import os
import sys
import time
from dataclasses import dataclass

from handreid.core.config_files import dataset_dir, prepare_command
from handreid.core.errors import ConfigError, UserError

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from handreid.casework import likelihood_ratio
from handreid.data.loaders import eval_loader, list_split
from handreid.metrics.ranking import compute_reid_metrics
from handreid.metrics.reranking import rerank_k_reciprocal
from handreid.metrics.verification import compute_open_set_metrics, compute_verification_metrics
from handreid.core.runtime import resolve_precision

RANKING_METRICS = ("rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP")
FAR_LEVELS = (1e-2, 1e-3, 1e-4)
FPIR_LEVELS = (1e-1, 1e-2)
STD_DDOF = 1
# Views encoded per image under each test-time flip rule.
FLIP_VIEWS = {"off": 1, "sum": 2, "unit_mean": 2}


def rate_label(rate):
    """1e-3 -> '1e-3', the suffix of a per-rate metric key."""
    mantissa, exponent = f"{rate:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


VERIFICATION_METRICS = ("eer", "eer_threshold") + tuple(f"tar_at_far_{rate_label(r)}"
                                                       for r in FAR_LEVELS)
OPEN_SET_METRICS = ("open_set_rank1",) + tuple(f"fnir_at_fpir_{rate_label(r)}"
                                               for r in FPIR_LEVELS)


def retrieval_features(model, images, flip="off"):
    """L2-normalised float32 features of one batch under a test-time flip rule: "off";
    "sum", the raw features of the image and its mirror summed, then L2 (MBA-Net /
    CLIP-HandID); "unit_mean", each view L2-normalised first."""
    features = model.features(images).float()
    if flip != "off":
        mirrored = model.features(images.flip(3)).float()
        if flip == "unit_mean":
            features, mirrored = F.normalize(features, dim=1), F.normalize(mirrored, dim=1)
        features = features + mirrored
    return F.normalize(features, dim=1)


def extract_features(model, loader, device, flip="off", amp="auto"):
    """L2-normalised identity features [N, D] (float32, on `device`) of a loader that yields
    (images, index) batches; row i is the image with index i, whatever the batch order.

    `model` is a make_model.HandIdModel: `model.features` is the one feature function shared
    with training. `amp` is the config's precision (auto: bf16 autocast on CUDA where
    supported, else fp16; fp32 on CPU). `flip` is the test-time flip rule: "off"; "sum", the
    MBA-Net / CLIP-HandID rule: the raw features of the image and its horizontal mirror are
    summed, then L2-normalised; "unit_mean": each view is L2-normalised first, so both weigh
    the same whatever their raw norms, and their mean is normalised again.
    """
    if flip not in FLIP_VIEWS:
        raise UserError(f"flip must be one of {', '.join(FLIP_VIEWS)}, got {flip!r}")
    dtype = resolve_precision(amp, device)
    was_training = model.training
    model.eval()
    features = None
    try:
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=dtype is not None):
            for images, index in tqdm(loader, desc="encoding images", unit="batch",
                                      disable=None, leave=False):
                batch = retrieval_features(model, images.to(device, non_blocking=True), flip)
                if features is None:
                    features = torch.zeros(len(loader.dataset), batch.shape[1], device=device)
                features[index.to(device)] = batch
    finally:
        model.train(was_training)
    if features is None:
        raise UserError("no images to encode: the evaluation splits are empty; re-run the "
                        "prepare script")
    check_finite(features, lambda row: loader.dataset.paths[row])
    return features


BROKEN_MODEL = ("the model's weights are broken (a diverged training?) or its precision "
                "overflowed; use another checkpoint, or set amp: fp32")


def check_finite(features, name_of_row, fix=BROKEN_MODEL):
    """UserError unless every feature is finite: NaN or inf would rank nothing (a NaN score
    is no match) yet pass silently. Every command's features come through here, when
    encoded or when a features or index file is loaded. `name_of_row(i)`: what row i is (an
    image path)."""
    values = torch.as_tensor(features)
    bad = torch.nonzero(~torch.isfinite(values.reshape(len(values), -1)).all(1)).squeeze(1)
    if len(bad):
        raise UserError(f"{len(bad)} of {len(features)} features are not finite (NaN or inf; "
                        f"first: {name_of_row(int(bad[0]))}): {fix}")


def image_key(path):
    """The identity of an image file: (st_dev, st_ino) of its resolved path."""
    stat = os.stat(os.path.realpath(path))
    return stat.st_dev, stat.st_ino


def _file_identity(path):
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_mtime_ns, stat.st_size


def model_identity(config, device):
    """What makes two configs' features of one image equal: the baseline's backbone, weights,
    image size and seed (random-init models), or the fine-tuned checkpoint file (path,
    mtime, size); with the flip rule, precision and device."""
    if config["variant"] == "baseline":
        pretrained = config["pretrained"]
        weights = _file_identity(pretrained) if pretrained and os.path.isfile(pretrained) \
            else pretrained
        size = config["image_size"]
        model = ("baseline", config["model"], weights,
                 tuple(size) if isinstance(size, list) else size, config["seed"])
    else:
        model = ("finetuned",) + _file_identity(config["save_path"])
    return model + (config["flip"], config["amp"], str(device))


class FeatureStore:
    """Features already encoded in this process, per model identity and image file, so that
    several configs with one model (run_all: a backbone on the four 11k aspects, whose
    galleries share the other aspects' test images) encode each image once."""

    def __init__(self):
        self._rows = {}  # model identity -> {image key: feature row}

    def lookup(self, model, keys):
        known = self._rows.get(model, {})
        return {key: known[key] for key in keys if key in known}

    def add(self, model, keys, features):
        self._rows.setdefault(model, {}).update(zip(keys, features))


def gallery_template(config):
    """The gallery folder name of split {i} for this config."""
    return "gallery{i}_all" if config["dataset"] == "11k" and config["gallery"] == "all" \
        else "gallery{i}"


def split_names(config):
    """[(query folder, gallery folder)] of splits 0..num_splits-1 for this config."""
    gallery = gallery_template(config)
    return [(f"query{i}", gallery.format(i=i)) for i in range(config["num_splits"])]


def check_data(config):
    """Fail fast, before a model is loaded: the re-ranking weight is a weight, the dataset is
    prepared and has num_splits splits (and so is calibration_data, with likelihood_ratio)."""
    if config["rerank"] and config["rerank_lambda"] > 1:
        raise ConfigError(f"rerank_lambda must be between 0 and 1, got {config['rerank_lambda']}"
                          f"; e.g. --set rerank_lambda=0.3")
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
    if config["likelihood_ratio"] and config["calibration_data"]:
        check_data(calibration_config(config))


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

    A unique image is keyed by image_key (st_dev, st_ino); its first listed path stands for
    it."""
    check_data(config)
    row_of, paths, splits, listed = {}, [], [], 0

    def rows(items):
        out = []
        for path, _ in items:
            key = image_key(path)
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


def ranking_scores(features, split, config, similarity):
    """The scores the ranking metrics rank by: the split's cosine `similarity`, or with
    rerank: true the negated k-reciprocal re-ranked distance."""
    if not config["rerank"]:
        return similarity
    device = features.device
    return -rerank_k_reciprocal(features[split.query_rows.to(device)],
                                features[split.gallery_rows.to(device)], config["rerank_k1"],
                                config["rerank_k2"], config["rerank_lambda"])


def open_set_gallery(split, config, index):
    """Gallery columns kept for the open-set metrics of split `index`: a seeded random half
    of the test (query) identities leaves the gallery; distractor identities stay."""
    identities = sorted(set(split.query_ids))
    if len(identities) < 2:
        raise UserError(f"open_set needs at least 2 test identities per split, but "
                        f"{split.query} has {len(identities)}; set open_set: false")
    generator = np.random.default_rng([config["seed"], index])
    removed = set(generator.choice(identities, len(identities) // 2, replace=False).tolist())
    return [j for j, name in enumerate(split.gallery_ids) if name not in removed]


def split_metrics(features, split, config, index):
    """-> (metrics row of one split, the scores its ranking used)."""
    similarity = split_similarity(features, split)
    scores = ranking_scores(features, split, config, similarity)
    row = compute_reid_metrics(scores, split.query_ids, split.gallery_ids,
                               max_rank=config["max_rank"], ties=config["ties"])
    verification = compute_verification_metrics(similarity, split.query_ids, split.gallery_ids,
                                                far=FAR_LEVELS)
    row.update(eer=verification["eer"], eer_threshold=verification["eer_threshold"],
               num_genuine_pairs=verification["num_genuine"],
               num_impostor_pairs=verification["num_impostor"])
    for rate, tar in verification["tar_at_far"].items():
        row[f"tar_at_far_{rate_label(rate)}"] = tar
    if config["open_set"]:
        keep = open_set_gallery(split, config, index)
        open_set = compute_open_set_metrics(
            similarity[:, torch.tensor(keep, device=similarity.device)], split.query_ids,
            [split.gallery_ids[j] for j in keep], fpir=FPIR_LEVELS)
        row.update(open_set_rank1=open_set["rank1_mated"], num_mated=open_set["num_mated"],
                   num_non_mated=open_set["num_non_mated"])
        for rate, fnir in open_set["fnir_at_fpir"].items():
            row[f"fnir_at_fpir_{rate_label(rate)}"] = fnir
    return row, scores


def metric_keys(config):
    """The per-split metrics summarised over splits for this config."""
    return (RANKING_METRICS + VERIFICATION_METRICS
            + (OPEN_SET_METRICS if config["open_set"] else ())
            + (likelihood_ratio.LR_METRICS if config["likelihood_ratio"] else ()))


def calibration_config(config):
    """The config whose split 0 holds the calibration pairs: `calibration_data` as a folder
    dataset, or the config's own dataset. A calibration_data that is the evaluated dataset
    itself is refused: its persons are the reported ones."""
    cal_config = dict(config, num_splits=1, rerank=False, open_set=False,
                      likelihood_ratio=False, calibration_data=None)
    if config["calibration_data"]:
        cal_config.update(dataset="folder", data_dir=config["calibration_data"])
        if config["likelihood_ratio"] and \
                dataset_dir(cal_config).resolve() == dataset_dir(config).resolve():
            raise ConfigError(f"calibration_data {config['calibration_data']} is the evaluated "
                              "dataset: its persons would calibrate their own LRs; give a "
                              "dataset of other persons, or leave calibration_data out for "
                              "the two-fold calibration")
    return cal_config


def calibration_pairs(model, config, device, store=None):
    """-> (scores, same, description, persons) of the calibration pairs of a prepared dataset: its
    query0 x gallery0 pairs, scored by `model` under the config's flip rule.
    `calibration_data` names that dataset (a prepared folder dataset); without it, the
    config's own dataset (calibrate.py: its test persons, never its training persons)."""
    cal_config = calibration_config(config)
    paths, splits, _ = collect_splits(cal_config)
    features, _, _ = encode(model, cal_config, device, paths, store)
    split = splits[0]
    persons = {likelihood_ratio.person_of(i) for i in split.query_ids + split.gallery_ids}
    where = f"{dataset_dir(cal_config)} ({split.query} x {split.gallery})"
    if len(persons) < 2:
        raise UserError(f"the calibration data {where} hold {len(persons)} person(s); "
                        "calibration needs at least 2: prepare a folder dataset of more persons "
                        "and set calibration_data: <its --out>")
    scores, same = likelihood_ratio.pair_arrays(split_similarity(features, split).cpu().numpy(),
                                                split.query_ids, split.gallery_ids)
    description = {"data": where, "persons": len(persons), "images": len(paths),
                   "same_person_pairs": int(same.sum()),
                   "different_person_pairs": int((~same).sum())}
    return scores, same, description, persons


def split_likelihood_ratios(features, split, config, index, calibration=None):
    """-> (LR metrics row, log10 LRs, truth) of one split: with a fitted `calibration`
    (calibration_data) applied to all its pairs; else two-fold over its persons."""
    similarity = split_similarity(features, split).cpu().numpy()
    if calibration is not None:
        scores, same = likelihood_ratio.pair_arrays(similarity, split.query_ids,
                                                    split.gallery_ids)
        llrs, folds = calibration.llr(scores), None
    else:
        llrs, same, folds = likelihood_ratio.two_fold(
            similarity, split.query_ids, split.gallery_ids, config["lr_calibrator"],
            config["seed"], index)
    row = likelihood_ratio.validity(llrs, same)
    row.update(num_lr_pairs=len(llrs), lr_folds=folds)
    return row, llrs, same


def summarise(per_split, keys):
    """Mean and sample std (ddof=1; None for one split) of each metric and the CMC curve. A
    metric that is n/a (None) on any split is n/a in the mean."""
    mean, std = {}, {}
    for key in keys + ("cmc",):
        column = [split[key] for split in per_split]
        if any(value is None for value in column):
            mean[key] = std[key] = None
            continue
        values = np.array(column, dtype=np.float64)
        mean[key] = values.mean(0).tolist()
        std[key] = values.std(0, ddof=STD_DDOF).tolist() if len(values) > 1 else None
    return mean, std


@dataclass
class Evaluation:
    """The JSON-ready report plus what plots need: the features, the splits and the scores
    split 0 was ranked by."""
    report: dict
    features: torch.Tensor
    splits: list
    first_split_scores: torch.Tensor
    first_split_llrs: tuple = None  # (log10 LRs, truth) of split 0 with likelihood_ratio


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode(model, config, device, paths, store=None):
    """Features of `paths` (rows in order); with a FeatureStore only the images it lacks for
    this model are encoded. -> (features, number encoded fresh, number from the store)."""
    keys = [image_key(path) for path in paths]
    model_key = model_identity(config, device) if store is not None else None
    known = store.lookup(model_key, keys) if store is not None else {}
    missing = [i for i, key in enumerate(keys) if key not in known]
    fresh = None
    if missing:
        fresh = extract_features(model, eval_loader(config, [paths[i] for i in missing]),
                                 device, flip=config["flip"], amp=config["amp"])
        if store is not None:
            store.add(model_key, [keys[i] for i in missing], fresh)
    if not known:
        return fresh, len(missing), 0
    dim = next(iter(known.values())).shape[0]
    features = torch.empty(len(paths), dim, device=device)
    stored = [i for i, key in enumerate(keys) if key in known]
    features[stored] = torch.stack([known[keys[i]] for i in stored]).to(device)
    if missing:
        features[missing] = fresh
    return features, len(missing), len(stored)


# Features (unit vectors) all within this distance of their mean: a collapsed model.
CONSTANT_SPREAD = 1e-3


def feature_warnings(features):
    """Warnings about what the features say of the model (the numbers stay as they are)."""
    spread = float((features - features.mean(0)).norm(dim=1).max()) if len(features) else 0.0
    if spread < CONSTANT_SPREAD:
        return [f"the model gives (nearly) the same feature to every image (all within "
                f"{spread:.1e} of their mean): it has collapsed, and its ranking metrics are "
                f"chance (ties: expected) or an artefact of the gallery order (ties: "
                f"gallery_order); retrain it (check lr, the training data and its loss)"]
    return []


def evaluate(model, config, device, store=None):
    """Run the multi-split protocol with `model` (a HandIdModel already on `device`); with a
    FeatureStore, images it holds for this model are not encoded again.

    report: per_split (metrics of each split with its folder names and sizes), mean, std
    (ddof=1), counts (images_listed, unique_images, images_encoded = images encoded fresh x
    views, images_from_store), timings (seconds: list, encode (with loading), metrics,
    total), the protocol settings and warnings (feature_warnings); with likelihood_ratio:
    true, each split's LR validity metrics (likelihood_ratio.LR_METRICS) and how its LRs were
    calibrated."""
    start = time.perf_counter()
    paths, splits, listed = collect_splits(config)
    listed_at = time.perf_counter()
    features, fresh, from_store = encode(model, config, device, paths, store)
    _sync(device)
    encoded_at = time.perf_counter()

    calibration = lr_data = first_llrs = None
    if config["likelihood_ratio"] and config["calibration_data"]:
        scores, same, lr_data, persons = calibration_pairs(model, config, device, store)
        shared = sorted(persons & {likelihood_ratio.person_of(i) for split in splits
                                   for i in split.query_ids + split.gallery_ids})
        if shared:
            print(f"warning: {len(shared)} persons of calibration_data have the names of "
                  f"evaluated persons ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}"
                  "); if they are the same people, their LRs were calibrated on themselves",
                  file=sys.stderr)
        calibration = likelihood_ratio.fit(scores, same, config["lr_calibrator"])
        lr_data.update(lower_log10_bound=calibration.lower, upper_log10_bound=calibration.upper)
    lr_at = time.perf_counter()
    per_split, first_scores = [], None
    for index, split in enumerate(tqdm(splits, desc="ranking splits", unit="split",
                                       disable=None, leave=False)):
        metrics, scores = split_metrics(features, split, config, index)
        if config["likelihood_ratio"]:
            lr_row, llrs, same = split_likelihood_ratios(features, split, config, index,
                                                         calibration)
            metrics.update(lr_row)
        if index == 0:
            first_scores = scores
            first_llrs = (llrs, same) if config["likelihood_ratio"] else None
        per_split.append({"split": index, "query": split.query, "gallery": split.gallery,
                          "num_gallery": len(split.gallery_ids),
                          "num_gallery_identities": len(set(split.gallery_ids)), **metrics})
    _sync(device)
    done = time.perf_counter()
    mean, std = summarise(per_split, metric_keys(config))
    rerank = {"k1": config["rerank_k1"], "k2": config["rerank_k2"],
              "lambda": config["rerank_lambda"]} if config["rerank"] else None
    report = {
        "per_split": per_split, "mean": mean, "std": std, "std_ddof": STD_DDOF,
        "num_splits": len(splits), "gallery": gallery_template(config),
        "warnings": feature_warnings(features),
        "ap_mode": config["ap_mode"], "ties": config["ties"], "max_rank": config["max_rank"],
        "flip": config["flip"],
        "rerank": rerank, "open_set": config["open_set"], "far_levels": list(FAR_LEVELS),
        "fpir_levels": list(FPIR_LEVELS) if config["open_set"] else None,
        "likelihood_ratio": {"calibrator": config["lr_calibrator"],
                             "calibration": lr_data or "two-fold over each split's persons"}
        if config["likelihood_ratio"] else None,
        "counts": {"images_listed": listed, "unique_images": len(paths),
                   "images_encoded": fresh * FLIP_VIEWS[config["flip"]],
                   "images_from_store": from_store},
        "timings": {"list_seconds": listed_at - start, "encode_seconds": encoded_at - listed_at,
                    "calibration_seconds": lr_at - encoded_at,
                    "metrics_seconds": done - lr_at, "total_seconds": done - start},
    }
    return Evaluation(report, features, splits, first_scores, first_llrs)
