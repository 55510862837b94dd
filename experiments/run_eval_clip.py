"""Evaluate a CLIP image encoder on the hand re-identification protocol (all splits).

    python experiments/run_eval_clip.py --config configs/finetuning_stage1_frozen_text/eval_vitb16_11k_dorsal_r.yml
    python experiments/run_eval_clip.py --config configs/baseline/eval_vitb16_11k_dorsal_r.yml --set num_splits=1

`variant: baseline` evaluates the pretrained CLIP image encoder as it is; `variant: finetuned`
loads the Stage-1 checkpoint at `save_path`, strictly checked against the config.

Outputs in `results_dir`:
  <name>_<variant>.json         the latest results: resolved config, checkpoint (path, epoch,
                                val accuracy, training config), per split, mean, std, counts,
                                timings. A re-run first keeps the previous file as
                                <name>_<variant>.<its mtime>.json: no result is ever lost.
  results.csv                   one row appended per run (every run ever made).
  <name>_<variant>_cmc.png      with plots: true, for the latest run: the CMC curve (mean ±
  <name>_<variant>_ranking.png  std over splits) and split 0's ranked retrieval (query, then
                                its top-k gallery images; green = same identity, red = other).
"""
import csv
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import evaluation  # noqa: E402
import make_model  # noqa: E402
from config import atomic_write, atomic_write_json, load_config, make_parser, run_cli  # noqa: E402
from runtime import resolve_device  # noqa: E402

CSV_FIELDS = ["timestamp", "name", "variant", "model", "dataset", "aspect", "gallery",
              "num_splits", "ap_mode", "flip", "rank1", "rank1_std", "rank5", "rank5_std",
              "rank10", "rank10_std", "mAP", "mAP_std", "mINP", "mINP_std", "images_encoded",
              "seconds", "checkpoint", "results_json"]
THUMB = 96
FRAME = 4


def load_model(config):
    """-> (HandIdModel, checkpoint info or None) for the config's variant."""
    if config["variant"] == "baseline":
        # Random-initialised backbones (model: tiny, pretrained: none) then give the same
        # baseline on every run.
        torch.manual_seed(config["seed"])
        clip_model, classifier = make_model.build_model(config, num_classes=None)
        return make_model.HandIdModel(clip_model, classifier), None
    model, ckpt = make_model.load_checkpoint(config["save_path"], config)
    info = {"path": str(config["save_path"]), "method": ckpt["method"], "epoch": ckpt["epoch"],
            "selection": ckpt["selection"], "val_accuracy": ckpt["selection"].get("val_accuracy"),
            "feature": ckpt["feature"], "backbone": ckpt["backbone"],
            "num_train_identities": len(ckpt["identity_names"]), "train_config": ckpt["config"]}
    return model, info


def dataset_label(config):
    return config["dataset"] if config["dataset"] == "hd" else f"11k/{config['aspect']}"


def format_mean_std(mean, std):
    return f"{mean:6.2f} ± {std:5.2f}" if std is not None else f"{mean:6.2f}"


def print_report(config, report, checkpoint):
    print(f"\n{config['name']} ({config['variant']}): {config['model']} on "
          f"{dataset_label(config)}, gallery {report['gallery']}, AP {report['ap_mode']}"
          + (", flip" if report["flip"] else ""))
    if checkpoint:
        accuracy = checkpoint["val_accuracy"]
        print(f"checkpoint {checkpoint['path']} (epoch {checkpoint['epoch']}, val accuracy "
              + ("n/a" if accuracy is None else f"{accuracy:.2f}%") + ")")
    header = (f"{'split':>5} {'queries':>7} {'valid':>6} {'gallery':>7} {'rank-1':>7} "
              f"{'rank-5':>7} {'rank-10':>7} {'mAP':>7} {'mINP':>7}")
    print(header)
    for row in report["per_split"]:
        print(f"{row['split']:>5} {row['num_queries']:>7} {row['num_valid_queries']:>6} "
              f"{row['num_gallery']:>7} " + " ".join(f"{row[k]:7.2f}" for k in evaluation.METRICS))
    std_note = f"std over splits, ddof={report['std_ddof']}" if report["num_splits"] > 1 \
        else "one split: no std"
    print(f"mean ± std over {report['num_splits']} splits ({std_note}):")
    for key, label in zip(evaluation.METRICS, ("rank-1", "rank-5", "rank-10", "mAP", "mINP")):
        print(f"  {label:8} {format_mean_std(report['mean'][key], report['std'][key])}")
    counts, timings = report["counts"], report["timings"]
    print(f"images: {counts['images_listed']} listed over all splits, "
          f"{counts['unique_images']} unique, {counts['images_encoded']} encoded; time "
          f"{timings['total_seconds']:.1f} s (encode {timings['encode_seconds']:.1f} s, "
          f"load {timings['load_seconds']:.1f} s, metrics {timings['metrics_seconds']:.2f} s)")


def keep_previous(path):
    """Before `path` is replaced, keep the old file as <stem>.<its mtime><suffix> (a hard link
    where possible, so the stable name never goes missing). Returns the kept path or None."""
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(path.stat().st_mtime))
    kept, n = path.with_name(f"{path.stem}.{stamp}{path.suffix}"), 1
    while kept.exists():
        kept, n = path.with_name(f"{path.stem}.{stamp}-{n}{path.suffix}"), n + 1
    try:
        os.link(path, kept)
    except OSError:
        shutil.copy2(path, kept)
    return kept


def append_csv(path, row):
    """Append one row to the results CSV (header once). A CSV with another header (older
    code) is kept aside first, never rewritten."""
    if path.exists():
        with path.open(newline="") as handle:
            header = next(csv.reader(handle), None)
        if header != CSV_FIELDS:
            kept = keep_previous(path)
            path.unlink()
            print(f"{path} had other columns; kept it as {kept}")
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def csv_row(config, result, json_path):
    mean, std = result["mean"], result["std"]
    row = {"timestamp": result["timestamp"], "name": config["name"],
           "variant": config["variant"], "model": config["model"], "dataset": config["dataset"],
           "aspect": config["aspect"] if config["dataset"] == "11k" else "",
           "gallery": result["gallery"], "num_splits": result["num_splits"],
           "ap_mode": result["ap_mode"], "flip": result["flip"],
           "images_encoded": result["counts"]["images_encoded"],
           "seconds": round(result["timings"]["total_seconds"], 3),
           "checkpoint": (result["checkpoint"] or {}).get("path", ""),
           "results_json": str(json_path)}
    for key in evaluation.METRICS:
        row[key] = round(mean[key], 4)
        row[f"{key}_std"] = "" if std[key] is None else round(std[key], 4)
    return row


def save_png(path, image):
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def plot_cmc(path, config, report):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = np.arange(1, config["max_rank"] + 1)
    mean = np.array(report["mean"]["cmc"])
    figure, axis = plt.subplots(figsize=(5, 3.6), dpi=120)
    axis.plot(ranks, mean, marker="o", markersize=3, label="mean over splits")
    if report["std"]["cmc"] is not None:
        std = np.array(report["std"]["cmc"])
        axis.fill_between(ranks, mean - std, np.minimum(mean + std, 100), alpha=0.25,
                          label=f"± std ({report['num_splits']} splits)")
    axis.set(xlabel="rank", ylabel="identification rate (%)", ylim=(0, 100.5),
             title=f"CMC: {config['name']} ({config['variant']})\nrank-1 "
                   f"{report['mean']['rank1']:.1f}, mAP {report['mean']['mAP']:.1f}")
    axis.title.set_fontsize(9)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)


def _thumbnail(path, colour):
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        tile = ImageOps.pad(image.convert("RGB"), (THUMB, THUMB), color="white")
    return ImageOps.expand(tile, border=FRAME, fill=colour)


def _font():
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=10)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def plot_ranking(path, evaluated, num_queries, max_rank):
    """Split 0: rows of query thumbnail (blue frame) then its top-k gallery images, green frame
    for the query's identity, red for another; rank and identity name underneath."""
    from PIL import Image, ImageDraw

    split = evaluated.splits[0]
    k = min(10, max_rank, len(split.gallery_ids))
    similarity = evaluation.split_similarity(evaluated.features, split).cpu()
    # Same tie order as the metrics: stable descending sort.
    top = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :k]
    rows = np.unique(np.linspace(0, len(split.query_ids) - 1, num_queries).round().astype(int))
    cell, label_height, gap, margin = THUMB + 2 * FRAME, 26, 12, 4
    sheet = Image.new("RGB", (2 * margin + gap + (k + 1) * cell,
                              2 * margin + len(rows) * (cell + label_height)), "white")
    draw, font = ImageDraw.Draw(sheet), _font()

    def tile(x, y, image_path, colour, caption, name):
        sheet.paste(_thumbnail(image_path, colour), (x, y))
        draw.text((x + 1, y + cell), f"{caption}\n{name}", fill="black", font=font, spacing=1)

    for r, q in enumerate(rows):
        y = margin + r * (cell + label_height)
        query_id = split.query_ids[q]
        tile(margin, y, split.query_paths[q], "#1f5fbf", "query", query_id)
        for rank, g in enumerate(top[q].tolist()):
            gallery_id = split.gallery_ids[g]
            colour = "#1a9e3a" if gallery_id == query_id else "#d62020"
            tile(margin + gap + (rank + 1) * cell, y, split.gallery_paths[g], colour,
                 f"rank {rank + 1}", gallery_id)
    save_png(path, sheet)


def evaluate_config(config):
    """Evaluate one resolved config; print the report, write JSON, CSV row and plots.
    Returns the results dict (as written to the JSON)."""
    device = resolve_device(config)
    evaluation.check_data(config)
    model, checkpoint = load_model(config)
    model.to(device)
    evaluated = evaluation.evaluate(model, config, device)
    result = {"name": config["name"], "variant": config["variant"], "model": config["model"],
              "dataset": dataset_label(config), "checkpoint": checkpoint,
              "device": str(device), "config": config,
              "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
              **evaluated.report}
    print_report(config, result, checkpoint)

    results_dir = Path(config["results_dir"])
    stem = f"{config['name']}_{config['variant']}"
    json_path = results_dir / f"{stem}.json"
    files = {"json": str(json_path), "csv": str(results_dir / "results.csv")}
    if config["plots"]:
        files["cmc_plot"] = str(results_dir / f"{stem}_cmc.png")
        files["ranking_plot"] = str(results_dir / f"{stem}_ranking.png")
        plot_cmc(files["cmc_plot"], config, evaluated.report)
        plot_ranking(files["ranking_plot"], evaluated, config["plot_queries"],
                     config["max_rank"])
    result["files"] = files
    kept = keep_previous(json_path)
    atomic_write_json(json_path, result)
    append_csv(Path(files["csv"]), csv_row(config, result, json_path))
    print(f"results: {json_path}" + (f" (previous run kept as {kept})" if kept else "")
          + f"; row appended to {files['csv']}")
    if config["plots"]:
        print(f"plots: {files['cmc_plot']}, {files['ranking_plot']}")
    return result


def main(argv=None):
    args = make_parser(__doc__.splitlines()[0]).parse_args(argv)
    evaluate_config(load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_cli(main)
