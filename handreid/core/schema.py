"""The general config keys: each key's type, default, allowed values and the line
docs/config.md gives it (SCHEMA), and the check of one value against its key (ConfigError,
exit code 2). A method's own keys are declared in its file with `option` (handreid/methods/);
registry.config_keys gives every key a config holds."""
import difflib

from handreid.core.errors import ConfigError

ASPECTS = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
DATASETS = ("11k", "hd", "folder")


def option(kind, default, help, choices=None, low=None, nullable=False, aliases=None):
    # aliases: older spellings still accepted, mapped to today's value (e.g. flip: true).
    return {"type": kind, "default": default, "help": help, "choices": choices, "min": low,
            "nullable": nullable or default is None, "aliases": aliases or {}}


# key -> spec. Types: str, int, float, bool, list (of numbers). `None` default = derived.
SCHEMA = {
    # what to train / evaluate
    "name": option(str, None, "experiment name in logs and tables (default: config file stem)"),
    "dataset": option(str, "11k", "dataset: 11k, hd, or folder (your own <root>/<identity>/"
                                   "<images> tree, prepared by datasets/prepare_folder.py)",
                       choices=DATASETS),
    "aspect": option(str, "dorsal_r", "11k aspect (ignored for hd and folder)", choices=ASPECTS),
    "data_dir": option(str, None, "prepared dataset root, the --out of the prepare script "
                                   "(default: datasets/11khands, datasets/HD or datasets/folder)"),
    "model": option(str, "vitb16", "backbone: vitb16, vitb32, rn50, rn101, vitl14, tiny, "
                                    "or any open_clip 'architecture:pretrained_tag'"),
    "pretrained": option(str, None, "weights: open_clip tag, local weights file, or 'none' for "
                                     "random init (default: the model's OpenAI weights)"),
    "head": option(str, "linear", "identity head: linear, or bnneck (BatchNorm1d + bias-free "
                                   "linear, features after the BN)", choices=("linear", "bnneck")),
    "variant": option(str, "finetuned", "evaluation: baseline (pretrained CLIP) or finetuned "
                                         "(checkpoint at save_path)",
                       choices=("baseline", "finetuned")),
    # data pipeline
    "image_size": option("size", None, "input side in pixels, or [height, width] (a ViT only; "
                                        "CLIP-ReID: [256, 128]); default: the backbone's",
                          low=8),
    "cache_images": option(bool, True, "decode and resize every image once and keep it in memory "
                                        "as uint8 (the fast data path)"),
    "num_workers": option(int, 2, "data loader worker processes", low=0),
    "aug_hflip": option(float, 0.5, "probability of a horizontal flip", low=0.0),
    "aug_pad": option(int, 10, "pixels of padding before the random crop (0 = no crop)", low=0),
    "aug_color_jitter": option(float, 0.0, "brightness/contrast/saturation jitter strength",
                                low=0.0),
    "aug_random_erasing": option(float, 0.5, "probability of random erasing", low=0.0),
    "augment_on": option(str, "device", "where training augmentation runs: loader (per image in "
                                         "the loader workers) or device (batched on the training "
                                         "device; the loader hands over uint8 images)",
                          choices=("loader", "device")),
    # optimisation
    "epochs": option(int, 60, "training epochs", low=1),
    "batch_size": option(int, 64, "images per optimizer step (per process under torchrun)", low=1),
    "lr": option(float, 5e-6, "learning rate of the image encoder", low=0.0),
    "head_lr_mult": option(float, 10.0, "learning-rate multiplier of the identity head", low=0.0),
    "weight_decay": option(float, 1e-4, "weight decay (none on norms, biases and embeddings "
                                         "unless weight_decay_all)", low=0.0),
    "scheduler": option(str, "cosine", "schedule after warmup (stepped per lr_stepping)",
                         choices=("cosine", "step")),
    "warmup_epochs": option(int, 5, "linear warmup epochs", low=0),
    "lr_steps": option(list, [30, 50], "epochs at which the step schedule multiplies by lr_gamma"),
    "lr_gamma": option(float, 0.1, "step schedule factor", low=0.0),
    "label_smoothing": option(float, 0.1, "cross-entropy label smoothing", low=0.0),
    "grad_clip": option(float, 0.0, "max gradient norm (0 = off)", low=0.0),
    "amp": option(str, "auto", "precision: auto (bf16 on CUDA where supported, else fp16; fp32 "
                                "on CPU), bf16, fp16, fp32",
                   choices=("auto", "bf16", "fp16", "fp32")),
    "seed": option(int, 0, "random seed"),
    # CLIP-ReID's optimisation mechanisms, general (issue 15; Stage 2 and CLIP-HandID use them)
    "lr_stepping": option(str, "iteration", "lr schedule changes at every optimizer step "
                                             "(iteration) or once at the start of each epoch "
                                             "(epoch, as CLIP-ReID)",
                           choices=("iteration", "epoch")),
    "lr_epoch_origin": option(int, 1, "lr_stepping: epoch: index t of a phase's first epoch in "
                                       "the schedule (1: CLIP-ReID, 0: CLIP-HandID)",
                               choices=(0, 1)),
    "bias_lr_factor": option(float, 1.0, "lr multiplier of every trained tensor whose name "
                                          "contains 'bias' (CLIP-ReID: 2)", low=0.0),
    "weight_decay_all": option(bool, False, "weight decay on every trained tensor, biases, "
                                             "norms and embeddings too (CLIP-ReID)"),
    "classifier_init_std": option(float, None, "std of the normal init of the identity "
                                                "classifiers' weights (CLIP-ReID: 0.001; "
                                                "default: PyTorch's)", low=0.0),
    "resnet_last_stride": option(int, 2, "stride of a ModifiedResNet's layer4 (1: CLIP-ReID, "
                                          "the attention pool's position embedding resized to "
                                          "the larger map)", choices=(1, 2)),
    "aug_erasing_fill": option(str, "zero", "what random erasing fills its rectangle with: zero, "
                                             "or pixel (per-pixel N(0, 1) noise in normalised "
                                             "space, timm's mode='pixel', as CLIP-ReID)",
                                choices=("zero", "pixel")),
    "pos_embed_interpolation": option(str, "bicubic", "how a ViT's position embedding is "
                                                       "resized to another image_size: bicubic "
                                                       "(open_clip's) or bilinear (CLIP-ReID's)",
                                       choices=("bicubic", "bilinear")),
    "normalize": option(str, "clip", "input mean/std: clip (the weights' own), half (0.5/0.5, "
                                      "CLIP-ReID's ViT config) or imagenet (CLIP-ReID's RN50 "
                                      "config)", choices=("clip", "half", "imagenet")),
    # training engine (every method)
    # Its default is handreid/methods' DEFAULT, filled in by registry.config_keys.
    "method": option(str, None, "training method: a built-in method (the stem of its file in "
                                 "handreid/methods/) or the path of a .py file defining a Method "
                                 "subclass, relative to the working directory"),
    "sampler": option(str, "random", "train batches: random, or pk (batch_size / num_instances "
                                      "identities with num_instances images each)",
                       choices=("random", "pk")),
    "num_instances": option(int, 4, "images per identity in a pk batch (K)"),
    "triplet_weight": option(float, 0.0, "weight of the batch-hard triplet loss on the identity "
                                          "features (0 = off)", low=0.0),
    "triplet_margin": option(float, 0.3, "triplet margin", low=0.0),
    "triplet_soft_margin": option(bool, False, "soft-margin triplet loss log(1 + exp(d_ap - "
                                                "d_an)) instead of the margin"),
    "selection": option(str, "val_loss", "best-epoch rule on val/: val_loss (head cross-entropy), "
                                          "val_map (val images ranked against train images), "
                                          "val_accuracy, or last (the last epoch, as CLIP-ReID; "
                                          "val/ is still reported)",
                         choices=("val_loss", "val_map", "val_accuracy", "last")),
    # early stopping
    "early_stop_patience": option(int, 0, "stop when the selection signal has not improved for "
                                           "N epochs; the best epoch is kept (0 or empty = off)",
                                   low=0, nullable=True),
    "save_every": option(int, 10, "write the resume state every N epochs", low=1),
    "save_every_minutes": option(float, 10.0, "... and whenever this many minutes passed since "
                                               "the last one (0 = epochs only)", low=0.0),
    "compile": option(bool, False, "torch.compile the model for training"),
    "channels_last": option(bool, False, "channels-last memory format (ResNet backbones)"),
    "tf32": option(bool, False, "TF32 matmuls and convolutions on GPUs that have them"),
    "device": option(str, "auto", "auto, cpu, cuda or cuda:N"),
    # the prompt that Stage 2 (CLIP-ReID) and CLIP-HandID both read; their other keys are
    # in their own files (handreid/methods/)
    "prompt_template": option(str, "A photo of a X X X X hand.",
                               "Stage-2 text template; each standalone X is one learnable token "
                               "per training identity"),
    "warmup_factor": option(float, 0.1, "Stage-2 phase 2: lr factor where the linear warmup "
                                         "starts", low=0.0),
    # outputs
    "save_path": option(str, None, "checkpoint file (default: saved_models/<name>.pth)"),
    "log_path": option(str, None, "human log file; metrics and plots go beside it "
                                   "(default: follows save_path: saved_models/<x>.pth -> "
                                   "logs/<x>.log, a checkpoint elsewhere -> <stem>.log beside "
                                   "it; a --set save_path without --set log_path derives it)"),
    # live training curves (run_log.py)
    "tensorboard": option(bool, True, "write TensorBoard events of the per-epoch metrics to "
                                       "<log stem>_tensorboard/ beside the log"),
    # evaluation
    "num_splits": option(int, 10, "query/gallery splits to evaluate", low=1),
    "gallery": option(str, "all", "11k gallery: all (gallery{i}_all, the published protocol) or "
                                   "aspect (gallery{i})", choices=("all", "aspect")),
    "flip": option(str, "off", "test-time flip: off, sum (raw features of the image and its "
                                "mirror summed, then L2: MBA-Net / CLIP-HandID) or unit_mean (mean "
                                "of the two L2-normalised features); true/false read as "
                                "unit_mean/off",
                    choices=("off", "sum", "unit_mean"),
                    aliases={True: "unit_mean", False: "off", "true": "unit_mean",
                             "false": "off"}),
    "ap_mode": option(str, "standard", "AP rule printed first; both are always reported: "
                                        "standard (uninterpolated, torchreid/fast-reid) or "
                                        "trapezoid (MBA-Net / CLIP-HandID)",
                       choices=("standard", "trapezoid")),
    "ties": option(str, "expected", "gallery items exactly as similar as a true match: expected "
                                     "(every ranking metric is its expected value over all "
                                     "orders of the tied items; a collapsed model scores "
                                     "chance) or gallery_order (torchreid's stable sort, for "
                                     "comparison with its numbers)",
                    choices=("expected", "gallery_order")),
    "open_set": option(bool, False, "also report open-set identification: per split a seeded "
                                     "random half of the test identities leaves the gallery"),
    "rerank": option(bool, False, "k-reciprocal re-ranking (Zhong et al. 2017) of the ranking "
                                   "metrics"),
    "rerank_k1": option(int, 20, "re-ranking k1 (k-reciprocal neighbours)", low=1),
    "rerank_k2": option(int, 6, "re-ranking k2 (query expansion neighbours)", low=1),
    "rerank_lambda": option(float, 0.3, "re-ranking weight of the original distance", low=0.0),
    "max_rank": option(int, 10, "length of the CMC curve", low=1),
    "eval_batch_size": option(int, 128, "images per forward pass in evaluation", low=1),
    "results_dir": option(str, "logs/results", "results JSON, CSV and plots"),
    "plots": option(bool, True, "write the CMC curve, ranked-retrieval grid and verification "
                                 "(ROC, score histogram) PNGs"),
    "plot_queries": option(int, 6, "queries shown in the ranked-retrieval grid", low=1),
    # likelihood ratios for casework (lir): calibration, Cllr, Tippett and ECE plots
    "likelihood_ratio": option(bool, False, "also report calibrated likelihood ratios: Cllr, "
                                             "Cllr_min, misleading-evidence rates, Tippett and "
                                             "ECE plots (two-fold over each split's persons, or "
                                             "calibration_data)"),
    "lr_calibrator": option(str, "logistic", "score -> LR calibrator (lir): logistic, isotonic "
                                              "(PAV) or kde", choices=("logistic", "isotonic", "kde")),
    "calibration_data": option(str, None, "a prepared folder dataset (datasets/prepare_folder.py "
                                           "--out) whose query0 x gallery0 pairs calibrate the "
                                           "LRs (default: two-fold over the evaluated persons; "
                                           "calibrate.py: the evaluated dataset's split 0)"),
    # training seeds (run_all_finetuned_stage1.py --train --seeds)
    "seeds": option(list, None, "run_all_finetuned_stage1.py: train and evaluate one model per "
                                 "seed (own save_path/log/results per seed: <stem>_seed<N>); "
                                 "overridden by --seeds"),
}


def suggest(key, keys=SCHEMA):
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def check_value(key, value, where, keys=SCHEMA):
    spec = keys[key]
    kind = spec["type"]
    if isinstance(value, (bool, str)) and value in spec["aliases"]:
        value = spec["aliases"][value]
    if value is None:
        if spec["nullable"]:
            return None
        raise ConfigError(f"{where}: '{key}' must not be empty (expected "
                          f"{getattr(kind, '__name__', kind)})")
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if kind == "size":
        return _check_size(key, value, spec["min"], where)
    if kind is list:
        ok = isinstance(value, list) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    elif kind in (int, float):
        ok = isinstance(value, kind) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(f"{where}: '{key}' must be {kind.__name__}, "
                          f"got {type(value).__name__} {value!r}")
    if spec["choices"] and value not in spec["choices"]:
        raise ConfigError(f"{where}: '{key}' must be one of {', '.join(spec['choices'])}, "
                          f"got {value!r}")
    if spec["min"] is not None and value < spec["min"]:
        raise ConfigError(f"{where}: '{key}' must be >= {spec['min']}, got {value!r}")
    if key == "name":
        _check_name(value, where)
    return value


def _check_name(name, where):
    """`name` makes file names inside results_dir (and the default save_path and log_path):
    it may not lead out of the folder."""
    if name in (".", "..") or any(c in name for c in "/\\\0"):
        raise ConfigError(f"{where}: 'name' {name!r} is not a file name (it would lead out of "
                          f"results_dir); use a name without '/' or '\\'")


def _check_size(key, value, low, where):
    """An image size: one side (square) or [height, width] of ints >= low; a square pair
    becomes its side."""
    sides = value if isinstance(value, list) else [value]
    if len(sides) not in (1, 2) or not all(isinstance(v, int) and not isinstance(v, bool)
                                           for v in sides):
        raise ConfigError(f"{where}: '{key}' must be a side in pixels or [height, width], got "
                          f"{value!r}")
    if min(sides) < low:
        raise ConfigError(f"{where}: '{key}' must be >= {low} pixels, got {value!r}")
    return sides[0] if len(set(sides)) == 1 else list(sides)
