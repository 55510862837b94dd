"""Config schema, YAML loading with validation and `--set` overrides, and the argument parser
every script shares (--config, --set; its errors are ConfigErrors).

All experiments read one flat dict. Keys, types, defaults and allowed values live in SCHEMA;
docs/config.md documents them. A bad key, type or value raises ConfigError (exit code 2).
"""
import argparse
import difflib
import os
from pathlib import Path

import yaml

from handreid.core.errors import ConfigError

# CPU runs: OpenMP worker threads that spin while they wait take the cores from everything
# else on a busy machine (a 2-core CPU run was 4x slower). libgomp reads this when torch
# loads, so every entry point imports config before torch; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ASPECTS = ("dorsal_r", "dorsal_l", "palmar_r", "palmar_l")
DATASETS = ("11k", "hd", "folder")
# data_dir of each dataset when the config leaves it out (the prepare scripts' --out default)
DEFAULT_DATA_DIRS = {"11k": "datasets/11khands", "hd": "datasets/HD", "folder": "datasets/folder"}
PREPARE_SCRIPTS = {"11k": "prepare_11k.py", "hd": "prepare_hd.py", "folder": "prepare_folder.py"}


def _opt(kind, default, help, choices=None, low=None, nullable=False, aliases=None):
    # aliases: older spellings still accepted, mapped to today's value (e.g. flip: true).
    return {"type": kind, "default": default, "help": help, "choices": choices, "min": low,
            "nullable": nullable or default is None, "aliases": aliases or {}}


# key -> spec. Types: str, int, float, bool, list (of numbers). `None` default = derived.
SCHEMA = {
    # what to train / evaluate
    "name": _opt(str, None, "experiment name in logs and tables (default: config file stem)"),
    "dataset": _opt(str, "11k", "dataset: 11k, hd, or folder (your own <root>/<identity>/"
                                "<images> tree, prepared by datasets/prepare_folder.py)",
                    choices=DATASETS),
    "aspect": _opt(str, "dorsal_r", "11k aspect (ignored for hd and folder)", choices=ASPECTS),
    "data_dir": _opt(str, None, "prepared dataset root, the --out of the prepare script "
                                "(default: datasets/11khands, datasets/HD or datasets/folder)"),
    "model": _opt(str, "vitb16", "backbone: vitb16, vitb32, rn50, rn101, vitl14, tiny, "
                                 "or any open_clip 'architecture:pretrained_tag'"),
    "pretrained": _opt(str, None, "weights: open_clip tag, local weights file, or 'none' for "
                                  "random init (default: the model's OpenAI weights)"),
    "head": _opt(str, "linear", "identity head: linear, or bnneck (BatchNorm1d + bias-free "
                                "linear, features after the BN)", choices=("linear", "bnneck")),
    "variant": _opt(str, "finetuned", "evaluation: baseline (pretrained CLIP) or finetuned "
                                      "(checkpoint at save_path)",
                    choices=("baseline", "finetuned")),
    # data pipeline
    "image_size": _opt("size", None, "input side in pixels, or [height, width] (a ViT only; "
                                     "CLIP-ReID: [256, 128]); default: the backbone's",
                       low=8),
    "cache_images": _opt(bool, True, "decode and resize every image once and keep it in memory "
                                     "as uint8 (the fast data path)"),
    "num_workers": _opt(int, 2, "data loader worker processes", low=0),
    "aug_hflip": _opt(float, 0.5, "probability of a horizontal flip", low=0.0),
    "aug_pad": _opt(int, 10, "pixels of padding before the random crop (0 = no crop)", low=0),
    "aug_color_jitter": _opt(float, 0.0, "brightness/contrast/saturation jitter strength",
                             low=0.0),
    "aug_random_erasing": _opt(float, 0.5, "probability of random erasing", low=0.0),
    "augment_on": _opt(str, "device", "where training augmentation runs: loader (per image in "
                                      "the loader workers) or device (batched on the training "
                                      "device; the loader hands over uint8 images)",
                       choices=("loader", "device")),
    # optimisation
    "epochs": _opt(int, 60, "training epochs", low=1),
    "batch_size": _opt(int, 64, "images per optimizer step (per process under torchrun)", low=1),
    "lr": _opt(float, 5e-6, "learning rate of the image encoder", low=0.0),
    "head_lr_mult": _opt(float, 10.0, "learning-rate multiplier of the identity head", low=0.0),
    "weight_decay": _opt(float, 1e-4, "weight decay (none on norms, biases and embeddings "
                                      "unless weight_decay_all)", low=0.0),
    "scheduler": _opt(str, "cosine", "schedule after warmup (stepped per lr_stepping)",
                      choices=("cosine", "step")),
    "warmup_epochs": _opt(int, 5, "linear warmup epochs", low=0),
    "lr_steps": _opt(list, [30, 50], "epochs at which the step schedule multiplies by lr_gamma"),
    "lr_gamma": _opt(float, 0.1, "step schedule factor", low=0.0),
    "label_smoothing": _opt(float, 0.1, "cross-entropy label smoothing", low=0.0),
    "grad_clip": _opt(float, 0.0, "max gradient norm (0 = off)", low=0.0),
    "amp": _opt(str, "auto", "precision: auto (bf16 on CUDA where supported, else fp16; fp32 "
                             "on CPU), bf16, fp16, fp32",
                choices=("auto", "bf16", "fp16", "fp32")),
    "seed": _opt(int, 0, "random seed"),
    # CLIP-ReID's optimisation mechanisms, general (issue 15; Stage 2 and CLIP-HandID use them)
    "lr_stepping": _opt(str, "iteration", "lr schedule changes at every optimizer step "
                                          "(iteration) or once at the start of each epoch "
                                          "(epoch, as CLIP-ReID)",
                        choices=("iteration", "epoch")),
    "lr_epoch_origin": _opt(int, 1, "lr_stepping: epoch: index t of a phase's first epoch in "
                                    "the schedule (1: CLIP-ReID, 0: CLIP-HandID)",
                            choices=(0, 1)),
    "bias_lr_factor": _opt(float, 1.0, "lr multiplier of every trained tensor whose name "
                                       "contains 'bias' (CLIP-ReID: 2)", low=0.0),
    "weight_decay_all": _opt(bool, False, "weight decay on every trained tensor, biases, "
                                          "norms and embeddings too (CLIP-ReID)"),
    "classifier_init_std": _opt(float, None, "std of the normal init of the identity "
                                             "classifiers' weights (CLIP-ReID: 0.001; "
                                             "default: PyTorch's)", low=0.0),
    "resnet_last_stride": _opt(int, 2, "stride of a ModifiedResNet's layer4 (1: CLIP-ReID, "
                                       "the attention pool's position embedding resized to "
                                       "the larger map)", choices=(1, 2)),
    "aug_erasing_fill": _opt(str, "zero", "what random erasing fills its rectangle with: zero, "
                                          "or pixel (per-pixel N(0, 1) noise in normalised "
                                          "space, timm's mode='pixel', as CLIP-ReID)",
                             choices=("zero", "pixel")),
    "triplet_intermediate_layer": _opt(int, None, "Stage 2: a third triplet feature, "
                                                  "CLIP-ReID's: ViT the class token after this "
                                                  "many blocks (before ln_post; CLIP-ReID: "
                                                  "blocks - 1 = 11), ResNet the mean of this "
                                                  "layer (CLIP-ReID: 3); default: off"),
    "pos_embed_interpolation": _opt(str, "bicubic", "how a ViT's position embedding is "
                                                    "resized to another image_size: bicubic "
                                                    "(open_clip's) or bilinear (CLIP-ReID's)",
                                    choices=("bicubic", "bilinear")),
    "normalize": _opt(str, "clip", "input mean/std: clip (the weights' own), half (0.5/0.5, "
                                   "CLIP-ReID's ViT config) or imagenet (CLIP-ReID's RN50 "
                                   "config)", choices=("clip", "half", "imagenet")),
    # training engine (every method)
    "method": _opt(str, "stage1", "training method that wrote the checkpoint: stage1 "
                                  "(cross-entropy, text tower frozen), clipreid (Stage 2) or "
                                  "clip_handid (CLIP-HandID)"),
    "sampler": _opt(str, "random", "train batches: random, or pk (batch_size / num_instances "
                                   "identities with num_instances images each)",
                    choices=("random", "pk")),
    "num_instances": _opt(int, 4, "images per identity in a pk batch (K)"),
    "triplet_weight": _opt(float, 0.0, "weight of the batch-hard triplet loss on the identity "
                                       "features (0 = off)", low=0.0),
    "triplet_margin": _opt(float, 0.3, "triplet margin", low=0.0),
    "triplet_soft_margin": _opt(bool, False, "soft-margin triplet loss log(1 + exp(d_ap - "
                                             "d_an)) instead of the margin"),
    "selection": _opt(str, "val_loss", "best-epoch rule on val/: val_loss (head cross-entropy), "
                                       "val_map (val images ranked against train images), "
                                       "val_accuracy, or last (the last epoch, as CLIP-ReID; "
                                       "val/ is still reported)",
                      choices=("val_loss", "val_map", "val_accuracy", "last")),
    # early stopping
    "early_stop_patience": _opt(int, 0, "stop when the selection signal has not improved for "
                                        "N epochs; the best epoch is kept (0 or empty = off)",
                                low=0, nullable=True),
    "save_every": _opt(int, 10, "write the resume state every N epochs", low=1),
    "save_every_minutes": _opt(float, 10.0, "... and whenever this many minutes passed since "
                                            "the last one (0 = epochs only)", low=0.0),
    "compile": _opt(bool, False, "torch.compile the model for training"),
    "channels_last": _opt(bool, False, "channels-last memory format (ResNet backbones)"),
    "tf32": _opt(bool, False, "TF32 matmuls and convolutions on GPUs that have them"),
    "device": _opt(str, "auto", "auto, cpu, cuda or cuda:N"),
    # stage 2 (CLIP-ReID)
    "prompt_template": _opt(str, "A photo of a X X X X hand.",
                            "Stage-2 text template; each standalone X is one learnable token "
                            "per training identity"),
    "prompt_epochs": _opt(int, 120, "Stage-2 phase 1: epochs that learn the prompts (0 = take "
                                    "them from prompt_checkpoint)", low=0),
    "prompt_checkpoint": _opt(str, None, "a Stage-2 checkpoint whose learned prompts phase 2 "
                                         "starts from when prompt_epochs is 0"),
    "prompt_batch_size": _opt(int, 64, "Stage-2 phase 1: image features per step (per process)",
                              low=1),
    "prompt_lr": _opt(float, 3.5e-4, "Stage-2 phase 1: Adam learning rate of the prompts",
                      low=0.0),
    "prompt_weight_decay": _opt(float, 1e-4, "Stage-2 phase 1: weight decay of the prompts",
                                low=0.0),
    "prompt_warmup_epochs": _opt(int, 5, "Stage-2 phase 1: linear warmup epochs", low=0),
    "prompt_warmup_lr": _opt(float, 1e-5, "Stage-2 phase 1: learning rate at the first warmup "
                                          "step", low=0.0),
    "prompt_min_lr": _opt(float, 1e-6, "Stage-2 phase 1: learning rate at the end of the "
                                       "cosine decay", low=0.0),
    "warmup_factor": _opt(float, 0.1, "Stage-2 phase 2: lr factor where the linear warmup "
                                      "starts", low=0.0),
    "id_loss_weight": _opt(float, 0.25, "Stage-2 phase 2: weight of the identity "
                                        "cross-entropy (summed over both heads)", low=0.0),
    "i2t_loss_weight": _opt(float, 1.0, "Stage-2 phase 2: weight of the image-to-text "
                                        "cross-entropy", low=0.0),
    "neck_feat": _opt(str, "before", "Stage-2 retrieval feature: the two image features "
                                     "before or after their BNNeck BN, concatenated",
                      choices=("before", "after")),
    # CLIP-HandID (method clip_handid; prompt_template holds the placeholder word)
    "placeholder": _opt(str, "sks", "CLIP-HandID: the word of prompt_template (one token) "
                                    "whose embedding the image's pseudo-word replaces"),
    "inversion": _opt(str, "learned", "CLIP-HandID pseudo-word: learned (the paper: the "
                                      "inversion network's token, trained through the frozen "
                                      "text tower) or released (the released code: the token's "
                                      "mean over its dimensions, no gradient)",
                      choices=("learned", "released")),
    "interaction_network": _opt(bool, False, "CLIP-HandID: the interaction network (text over "
                                             "image attention, per sample) with a third head "
                                             "and a third part of the retrieval feature"),
    # outputs
    "save_path": _opt(str, None, "checkpoint file (default: saved_models/<name>.pth)"),
    "log_path": _opt(str, None, "human log file; metrics and plots go beside it "
                                "(default: logs/<name>.log)"),
    # live training curves (run_log.py)
    "tensorboard": _opt(bool, True, "write TensorBoard events of the per-epoch metrics to "
                                    "<log stem>_tensorboard/ beside the log"),
    # evaluation
    "num_splits": _opt(int, 10, "query/gallery splits to evaluate", low=1),
    "gallery": _opt(str, "all", "11k gallery: all (gallery{i}_all, the published protocol) or "
                                "aspect (gallery{i})", choices=("all", "aspect")),
    "flip": _opt(str, "off", "test-time flip: off, sum (raw features of the image and its "
                             "mirror summed, then L2: MBA-Net / CLIP-HandID) or unit_mean (mean "
                             "of the two L2-normalised features); true/false read as "
                             "unit_mean/off",
                 choices=("off", "sum", "unit_mean"),
                 aliases={True: "unit_mean", False: "off", "true": "unit_mean",
                          "false": "off"}),
    "ap_mode": _opt(str, "standard", "AP rule printed first; both are always reported: "
                                     "standard (uninterpolated, torchreid/fast-reid) or "
                                     "trapezoid (MBA-Net / CLIP-HandID)",
                    choices=("standard", "trapezoid")),
    "open_set": _opt(bool, False, "also report open-set identification: per split a seeded "
                                  "random half of the test identities leaves the gallery"),
    "rerank": _opt(bool, False, "k-reciprocal re-ranking (Zhong et al. 2017) of the ranking "
                                "metrics"),
    "rerank_k1": _opt(int, 20, "re-ranking k1 (k-reciprocal neighbours)", low=1),
    "rerank_k2": _opt(int, 6, "re-ranking k2 (query expansion neighbours)", low=1),
    "rerank_lambda": _opt(float, 0.3, "re-ranking weight of the original distance", low=0.0),
    "max_rank": _opt(int, 10, "length of the CMC curve", low=1),
    "eval_batch_size": _opt(int, 128, "images per forward pass in evaluation", low=1),
    "results_dir": _opt(str, "logs/results", "results JSON, CSV and plots"),
    "plots": _opt(bool, True, "write the CMC curve, ranked-retrieval grid and verification "
                              "(ROC, score histogram) PNGs"),
    "plot_queries": _opt(int, 6, "queries shown in the ranked-retrieval grid", low=1),
    # likelihood ratios for casework (lir): calibration, Cllr, Tippett and ECE plots
    "likelihood_ratio": _opt(bool, False, "also report calibrated likelihood ratios: Cllr, "
                                          "Cllr_min, misleading-evidence rates, Tippett and "
                                          "ECE plots (two-fold over each split's persons, or "
                                          "calibration_data)"),
    "lr_calibrator": _opt(str, "logistic", "score -> LR calibrator (lir): logistic, isotonic "
                                           "(PAV) or kde", choices=("logistic", "isotonic", "kde")),
    "calibration_data": _opt(str, None, "a prepared folder dataset (datasets/prepare_folder.py "
                                        "--out) whose query0 x gallery0 pairs calibrate the "
                                        "LRs (default: two-fold over the evaluated persons; "
                                        "calibrate.py: the evaluated dataset's split 0)"),
    # training seeds (run_all_finetuned_stage1.py --train --seeds)
    "seeds": _opt(list, None, "run_all_finetuned_stage1.py: train and evaluate one model per "
                              "seed (own save_path/log/results per seed: <stem>_seed<N>); "
                              "overridden by --seeds"),
}


def _suggest(key):
    close = difflib.get_close_matches(key, SCHEMA, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_value(key, value, where):
    spec = SCHEMA[key]
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
    return value


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


def parse_override(text):
    """'key=value' -> (key, value), the value parsed as YAML ('1e-5' -> float, 'true' -> bool)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. --set lr=1e-5")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    kind = SCHEMA.get(key, {}).get("type")
    # YAML reads '1e-5' as a string; numbers written that way are common in lr overrides.
    if kind is float and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is str and value is not None and not isinstance(value, str):
        value = raw.strip()
    return key, value


def _read_yaml(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path} (pass an existing YAML file to --config)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{at}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
    return data


def load_config(path=None, overrides=()):
    """Defaults <- YAML file <- `key=value` overrides; validated, derived paths filled in."""
    config = {key: spec["default"] for key, spec in SCHEMA.items()}
    sources = []
    if path is not None:
        sources.append((str(path), _read_yaml(path).items()))
    sources.append(("--set", [parse_override(o) if isinstance(o, str) else o for o in overrides]))
    for where, items in sources:
        for key, value in items:
            if key not in SCHEMA:
                raise ConfigError(f"{where}: unknown key '{key}'{_suggest(key)}")
            config[key] = _check_value(key, value, where)
    _rename_overridden_run(config, dict(sources[0][1]) if path is not None else {},
                           {key for key, _ in sources[-1][1]})
    if config["name"] is None:
        config["name"] = Path(path).stem if path is not None else "experiment"
    if config["data_dir"] is None:
        config["data_dir"] = DEFAULT_DATA_DIRS[config["dataset"]]
    if config["save_path"] is None:
        config["save_path"] = f"saved_models/{config['name']}.pth"
    if config["log_path"] is None:
        config["log_path"] = f"logs/{config['name']}.log"
    return config


# Keys that say which run a config is: a --set that changes one makes another run.
RUN_IDENTITY_KEYS = ("method", "model", "dataset", "data_dir", "aspect")


def _rename_overridden_run(config, from_file, set_keys):
    """A --set of a RUN_IDENTITY_KEYS key makes another run than the file's: its name,
    save_path and log_path (where the file names them and --set does not) get a suffix saying
    what changed, so it never shares (or is refused as) the file's own run. The same --set on
    the train and the eval config gives both the same names."""
    changed = [key for key in RUN_IDENTITY_KEYS
               if key in set_keys and config[key] != from_file.get(key, SCHEMA[key]["default"])]
    if not changed:
        return
    def slug(value):  # a data_dir counts by its folder name
        return "".join(c if c.isalnum() or c in ".-" else "-" for c in Path(str(value)).name)
    suffix = "__" + "_".join(f"{key}-{slug(config[key])}" for key in changed)
    for key in ("name", "save_path", "log_path"):
        if key in set_keys or key not in from_file or config[key] is None:
            continue
        value = Path(config[key])
        config[key] = str(value.with_name(value.stem + suffix + value.suffix)) \
            if key != "name" else config[key] + suffix


def dataset_dir(config):
    """The prepared split folder the loaders read for this dataset (and 11k aspect)."""
    root = Path(config["data_dir"])
    if config["dataset"] == "11k":
        return root / f"train_val_test_split_{config['aspect']}"
    return root / "train_val_test_split"


def prepare_command(config):
    """The command that creates dataset_dir(config), quoted in missing-data errors."""
    raw = "<root of your <root>/<identity>/<images> tree>" if config["dataset"] == "folder" \
        else "<raw dataset folder>"
    return (f"python datasets/{PREPARE_SCRIPTS[config['dataset']]} --raw {raw} "
            f"--out {config['data_dir']}")


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are ConfigErrors: one line, exit code 2, under run_cli."""

    def error(self, message):
        raise ConfigError(f"{self.prog}: {message} (see --help)")


def make_parser(description, default_config=None):
    """An argument parser with --config and repeatable --set key=value."""
    parser = ArgumentParser(description=description)
    parser.add_argument("--config", default=default_config, required=default_config is None,
                        help="YAML config file" + (f" (default: {default_config})"
                                                   if default_config else ""))
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a config key; repeatable")
    return parser
