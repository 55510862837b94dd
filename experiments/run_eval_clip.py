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
  <name>_<variant>_ranking.png  std over splits), split 0's ranked retrieval (query, then
  <name>_<variant>_verification.png  its top-k gallery images in the order scored, re-ranked
                                or not; green = same identity, red = other) and split 0's
                                ROC curve (log FAR axis) beside the genuine and impostor
                                score histograms.
  <name>_<variant>_lr.png       with likelihood_ratio: true, split 0's Tippett and ECE plots
                                of the calibrated likelihood ratios.
"""
import csv
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# config first: it sets OMP_WAIT_POLICY (CPU threads do not spin) before torch loads
from config import load_config, make_parser  # noqa: E402
from errors import run_cli  # noqa: E402
from atomic_files import atomic_write, atomic_write_json  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import evaluation  # noqa: E402
import likelihood_ratio  # noqa: E402
from feature_encoder import load_model  # noqa: E402
from reid_metrics import genuine_impostor_scores  # noqa: E402
from runtime import resolve_device  # noqa: E402

ALL_METRICS = (evaluation.RANKING_METRICS + evaluation.VERIFICATION_METRICS
               + evaluation.OPEN_SET_METRICS + likelihood_ratio.LR_METRICS)
CSV_FIELDS = (["timestamp", "name", "variant", "model", "dataset", "aspect", "gallery",
               "num_splits", "ap_mode", "flip", "rerank", "open_set"]
              + [name for key in ALL_METRICS for name in (key, f"{key}_std")]
              + ["images_encoded", "images_from_store", "seconds", "checkpoint",
                 "results_json"])
LABELS = {"rank1": "rank-1", "rank5": "rank-5", "rank10": "rank-10", "mAP": "mAP",
          "mAP_trapezoid": "mAP (trapezoid)", "mINP": "mINP", "eer": "EER",
          "eer_threshold": "EER threshold (cosine)", "open_set_rank1": "open-set rank-1 (mated)"}
LABELS.update({f"tar_at_far_{evaluation.rate_label(r)}": f"TAR@FAR={evaluation.rate_label(r)}"
               for r in evaluation.FAR_LEVELS})
LABELS.update({f"fnir_at_fpir_{evaluation.rate_label(r)}":
               f"FNIR@FPIR={evaluation.rate_label(r)}" for r in evaluation.FPIR_LEVELS})
LABELS.update(cllr="Cllr (bits)", cllr_min="Cllr_min (bits)", cllr_cal="Cllr_cal (bits)",
              misleading_same="misleading, same (%)",
              misleading_different="misleading, diff. (%)", max_log10_lr="largest log10 LR",
              min_log10_lr="smallest log10 LR")
THUMB = 96
FRAME = 4


def dataset_label(config):
    return f"11k/{config['aspect']}" if config["dataset"] == "11k" else config["dataset"]


def format_mean_std(mean, std):
    if mean is None:
        return "   n/a"
    return f"{mean:6.2f} ± {std:5.2f}" if std is not None else f"{mean:6.2f}"


def ap_order(report):
    """mAP keys, the config's ap_mode first."""
    return ("mAP_trapezoid", "mAP") if report["ap_mode"] == "trapezoid" \
        else ("mAP", "mAP_trapezoid")


def protocol_note(report):
    """Flip rule, re-ranking and open set of a report, in words."""
    notes = [f"flip {report['flip']}"]
    if report["rerank"]:
        rerank = report["rerank"]
        notes.append(f"re-ranked (k1 {rerank['k1']}, k2 {rerank['k2']}, lambda "
                     f"{rerank['lambda']})")
    if report["open_set"]:
        notes.append("open set")
    return ", ".join(notes)


def print_report(config, report, checkpoint):
    print(f"\n{config['name']} ({config['variant']}): {config['model']} on "
          f"{dataset_label(config)}, gallery {report['gallery']}, {protocol_note(report)}")
    if checkpoint:
        accuracy = checkpoint["val_accuracy"]
        print(f"checkpoint {checkpoint['path']} (epoch {checkpoint['epoch']}, val accuracy "
              + ("n/a" if accuracy is None else f"{accuracy:.2f}%") + ")")
    far = f"tar_at_far_{evaluation.rate_label(1e-3)}"
    columns = ("rank1", "rank5", "rank10") + ap_order(report) + ("mINP", "eer", far)
    short = {"mAP_trapezoid": "mAP-trap", "eer": "EER", far: "TAR@1e-3"}
    print(f"{'split':>5} {'queries':>7} {'valid':>6} {'gallery':>7} "
          + " ".join(f"{short.get(k, LABELS[k]):>8}" for k in columns))
    for row in report["per_split"]:
        print(f"{row['split']:>5} {row['num_queries']:>7} {row['num_valid_queries']:>6} "
              f"{row['num_gallery']:>7} " + " ".join(
                  "     n/a" if row[k] is None else f"{row[k]:8.2f}" for k in columns))
    std_note = f"std over splits, ddof={report['std_ddof']}" if report["num_splits"] > 1 \
        else "one split: no std"
    print(f"mean ± std over {report['num_splits']} splits ({std_note}), percent:")
    keys = []
    for key in (k for k in ALL_METRICS if k in report["mean"]):
        if key == "mAP":
            keys += ap_order(report)
        elif key not in ("mAP_trapezoid", "eer_threshold") + likelihood_ratio.LR_METRICS:
            keys.append(key)
    for key in keys:
        print(f"  {LABELS[key]:24} {format_mean_std(report['mean'][key], report['std'][key])}")
    threshold, spread = report["mean"]["eer_threshold"], report["std"]["eer_threshold"]
    print(f"  {LABELS['eer_threshold']:24} {threshold:.4f}"
          + ("" if spread is None else f" ± {spread:.4f}") + " (a score, not percent)")
    if report["likelihood_ratio"]:
        calibration = report["likelihood_ratio"]["calibration"]
        print(f"likelihood ratios ({report['likelihood_ratio']['calibrator']} calibrator, "
              + (calibration if isinstance(calibration, str) else
                 f"calibrated on {calibration['data']}") + "), mean ± std:")
        for key in likelihood_ratio.LR_METRICS:
            mean, std = report["mean"][key], report["std"][key]
            digits = 2 if key.startswith("misleading") else 3
            print(f"  {LABELS[key]:24} {mean:7.{digits}f}"
                  + ("" if std is None else f" ± {std:.{digits}f}"))
    counts, timings = report["counts"], report["timings"]
    print(f"images: {counts['images_listed']} listed over all splits, "
          f"{counts['unique_images']} unique, {counts['images_encoded']} encoded, "
          f"{counts['images_from_store']} from earlier configs; time "
          f"{timings['total_seconds']:.1f} s (encode {timings['encode_seconds']:.1f} s, "
          f"metrics {timings['metrics_seconds']:.2f} s)")


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
           "rerank": bool(result["rerank"]), "open_set": result["open_set"],
           "images_encoded": result["counts"]["images_encoded"],
           "images_from_store": result["counts"]["images_from_store"],
           "seconds": round(result["timings"]["total_seconds"], 3),
           "checkpoint": (result["checkpoint"] or {}).get("path", ""),
           "results_json": str(json_path)}
    for key in ALL_METRICS:
        value, spread = mean.get(key), std.get(key)
        row[key] = "" if value is None else round(value, 4)
        row[f"{key}_std"] = "" if spread is None else round(spread, 4)
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


def plot_verification(path, config, evaluated):
    """Split 0's verification: ROC (TAR against FAR, log FAR axis) and the genuine and
    impostor cosine-score histograms with the EER threshold."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    split = evaluated.splits[0]
    genuine, impostor = genuine_impostor_scores(
        evaluation.split_similarity(evaluated.features, split), split.query_ids,
        split.gallery_ids)
    row = evaluated.report["per_split"][0]
    # FAR and TAR at every observed score t (accept when score >= t), highest t first.
    thresholds = np.unique(np.concatenate([genuine, impostor]))[::-1]
    far = (len(impostor) - np.searchsorted(np.sort(impostor), thresholds)) / len(impostor)
    tar = (len(genuine) - np.searchsorted(np.sort(genuine), thresholds)) / len(genuine)
    figure, (roc, histogram) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    shown = far > 0  # a log axis cannot show FAR = 0
    roc.plot(100 * far[shown], 100 * tar[shown])
    roc.set(xscale="log", xlabel="FAR (%)", ylabel="TAR (%)", ylim=(0, 100.5),
            title=f"ROC, split 0: EER {row['eer']:.2f}%")
    roc.axvline(100 / len(impostor), color="grey", lw=0.8, ls=":",
                label="one impostor pair (lowest FAR measurable)")
    roc.legend(fontsize=7, loc="upper left")
    bins = np.linspace(min(genuine.min(), impostor.min()), max(genuine.max(), impostor.max()), 50)
    histogram.hist(impostor, bins=bins, density=True, alpha=0.55, color="#d62020",
                   label=f"impostor ({len(impostor)})")
    histogram.hist(genuine, bins=bins, density=True, alpha=0.55, color="#1a9e3a",
                   label=f"genuine ({len(genuine)})")
    histogram.axvline(row["eer_threshold"], color="black", lw=1, ls="--",
                      label=f"EER threshold {row['eer_threshold']:.3f}")
    histogram.set(xlabel="cosine score", ylabel="density", title="score distributions, split 0")
    histogram.legend(fontsize=7)
    for axis in (roc, histogram):
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{config['name']} ({config['variant']})", fontsize=9)
    figure.tight_layout()
    atomic_write(path, lambda handle: figure.savefig(handle, format="png"))
    plt.close(figure)


def plot_likelihood_ratios(path, config, evaluated):
    """Split 0's reported LRs: Tippett plot (lir: proportion of log10 LRs >= x for same and for
    different persons) and ECE plot (lir: empirical cross-entropy against prior log odds, with
    the PAV-optimised LRs and the uninformative reference)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from lir.data.models import LLRData
    from lir.plotting import tippett
    from lir.plotting.expected_calibration_error import plot_ece

    llrs, same = evaluated.first_split_llrs
    data = LLRData(features=llrs, labels=same.astype(int))
    row = evaluated.report["per_split"][0]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    tippett(data, ax=left)
    left.legend(left.get_lines()[:2], [f"same person ({int(same.sum())} pairs)",
                                       f"different persons ({int((~same).sum())} pairs)"],
                fontsize=7)
    left.set(ylabel="proportion of LRs >= x (%)", xlabel="log10 LR",
             title=f"Tippett, split 0: Cllr {row['cllr']:.3f}, Cllr_min {row['cllr_min']:.3f}")
    plot_ece(data, ax=right)
    right.legend(fontsize=7)
    right.set(xlabel="prior log10 odds (same person)", ylabel="empirical cross-entropy (bits)",
              title="ECE, split 0")
    for axis in (left, right):
        axis.title.set_fontsize(9)
        axis.grid(alpha=0.3)
    figure.suptitle(f"{config['name']} ({config['variant']}): likelihood ratios, "
                    f"{config['lr_calibrator']} calibrator", fontsize=9)
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


QUERY_COLOUR, SAME_COLOUR, OTHER_COLOUR = "#1f5fbf", "#1a9e3a", "#d62020"


def save_ranking_grid(path, rows):
    """A PNG sheet, one row per query: its thumbnail, a gap, then its ranked images.
    rows: [(query tile, [ranked tiles])]; a tile is (image path, frame colour, caption), the
    caption (two short lines) written underneath."""
    from PIL import Image, ImageDraw

    k = max(len(ranked) for _, ranked in rows)
    cell, label_height, gap, margin = THUMB + 2 * FRAME, 26, 12, 4
    sheet = Image.new("RGB", (2 * margin + gap + (k + 1) * cell,
                              2 * margin + len(rows) * (cell + label_height)), "white")
    draw, font = ImageDraw.Draw(sheet), _font()

    def tile(x, y, image_path, colour, caption):
        sheet.paste(_thumbnail(image_path, colour), (x, y))
        draw.text((x + 1, y + cell), caption, fill="black", font=font, spacing=1)

    for r, (query, ranked) in enumerate(rows):
        y = margin + r * (cell + label_height)
        tile(margin, y, *query)
        for rank, ranked_tile in enumerate(ranked):
            tile(margin + gap + (rank + 1) * cell, y, *ranked_tile)
    save_png(path, sheet)


def plot_ranking(path, evaluated, num_queries, max_rank):
    """Split 0: rows of query thumbnail (blue frame) then its top-k gallery images, green frame
    for the query's identity, red for another; rank and identity name underneath."""
    split = evaluated.splits[0]
    k = min(10, max_rank, len(split.gallery_ids))
    # The order the metrics scored (re-ranked with rerank: true); same tie order: stable
    # descending sort.
    top = torch.argsort(evaluated.first_split_scores.cpu(), dim=1, descending=True,
                        stable=True)[:, :k]
    shown = np.unique(np.linspace(0, len(split.query_ids) - 1, num_queries).round().astype(int))
    rows = []
    for q in shown:
        query_id = split.query_ids[q]
        ranked = [(split.gallery_paths[g],
                   SAME_COLOUR if split.gallery_ids[g] == query_id else OTHER_COLOUR,
                   f"rank {rank + 1}\n{split.gallery_ids[g]}")
                  for rank, g in enumerate(top[q].tolist())]
        rows.append(((split.query_paths[q], QUERY_COLOUR, f"query\n{query_id}"), ranked))
    save_ranking_grid(path, rows)


def evaluate_config(config, store=None):
    """Evaluate one resolved config; print the report, write JSON, CSV row and plots.
    `store`: an evaluation.FeatureStore shared with earlier configs of this process.
    Returns the results dict (as written to the JSON)."""
    device = resolve_device(config)
    evaluation.check_data(config)
    model, checkpoint = load_model(config)
    model.to(device)
    evaluated = evaluation.evaluate(model, config, device, store)
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
        files["verification_plot"] = str(results_dir / f"{stem}_verification.png")
        plot_cmc(files["cmc_plot"], config, evaluated.report)
        plot_verification(files["verification_plot"], config, evaluated)
        plot_ranking(files["ranking_plot"], evaluated, config["plot_queries"],
                     config["max_rank"])
        if config["likelihood_ratio"]:
            files["lr_plot"] = str(results_dir / f"{stem}_lr.png")
            plot_likelihood_ratios(files["lr_plot"], config, evaluated)
    result["files"] = files
    kept = keep_previous(json_path)
    atomic_write_json(json_path, result)
    append_csv(Path(files["csv"]), csv_row(config, result, json_path))
    print(f"results: {json_path}" + (f" (previous run kept as {kept})" if kept else "")
          + f"; row appended to {files['csv']}")
    if config["plots"]:
        print(f"plots: {files['cmc_plot']}, {files['ranking_plot']}, "
              f"{files['verification_plot']}"
              + (f", {files['lr_plot']}" if "lr_plot" in files else ""))
    return result


def main(argv=None):
    args = make_parser(__doc__.splitlines()[0]).parse_args(argv)
    evaluate_config(load_config(args.config, args.overrides))


if __name__ == "__main__":
    run_cli(main)
