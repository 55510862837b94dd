"""One evaluation's report as the user reads it: the printed summary (per split, mean ± std,
likelihood ratios, counts and time), the metric labels, and the row added to results.csv
(the whole file written atomically; a CSV with another header is kept aside first)."""
import csv
import io
import sys

from handreid.casework import likelihood_ratio
from handreid.core.atomic_files import atomic_write_text, keep_previous
from handreid.evaluation import protocol

ALL_METRICS = (protocol.RANKING_METRICS + protocol.VERIFICATION_METRICS
               + protocol.OPEN_SET_METRICS + likelihood_ratio.LR_METRICS)
CSV_FIELDS = (["timestamp", "name", "variant", "model", "dataset", "aspect", "gallery",
               "num_splits", "ap_mode", "flip", "rerank", "open_set"]
              + [name for key in ALL_METRICS for name in (key, f"{key}_std")]
              + ["images_encoded", "images_from_store", "seconds", "checkpoint",
                 "results_json"])
LABELS = {"rank1": "rank-1", "rank5": "rank-5", "rank10": "rank-10", "mAP": "mAP",
          "mAP_trapezoid": "mAP (trapezoid)", "mINP": "mINP", "eer": "EER",
          "eer_threshold": "EER threshold (cosine)", "open_set_rank1": "open-set rank-1 (mated)"}
LABELS.update({f"tar_at_far_{protocol.rate_label(r)}": f"TAR@FAR={protocol.rate_label(r)}"
               for r in protocol.FAR_LEVELS})
LABELS.update({f"fnir_at_fpir_{protocol.rate_label(r)}":
               f"FNIR@FPIR={protocol.rate_label(r)}" for r in protocol.FPIR_LEVELS})
LABELS.update(cllr="Cllr (bits)", cllr_min="Cllr_min (bits)", cllr_cal="Cllr_cal (bits)",
              misleading_same="misleading, same (%)",
              misleading_different="misleading, diff. (%)", max_log10_lr="largest log10 LR",
              min_log10_lr="smallest log10 LR")


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


def unfinished_text(checkpoint):
    """', unfinished (epoch k of n): ...' for a checkpoint of a run that has not finished."""
    note = (checkpoint or {}).get("unfinished")
    return (f", unfinished ({note}): its training has not finished; resume it with the same "
            f"train command for the final model") if note else ""


def checkpoint_warnings(checkpoint):
    """Warnings about how a checkpoint was trained (the numbers stay as they are)."""
    if checkpoint and checkpoint["num_train_identities"] == 1:
        return [f"{checkpoint['path']} was trained on one identity: an identity loss over one "
                f"class is 0 from the start and teaches nothing; train on at least two "
                f"identities (check data_dir and the train split)"]
    return []


def print_report(config, report, checkpoint):
    print(f"\n{config['name']} ({config['variant']}): {config['model']} on "
          f"{dataset_label(config)}, gallery {report['gallery']}, {protocol_note(report)}")
    if checkpoint:
        accuracy = checkpoint["val_accuracy"]
        print(f"checkpoint {checkpoint['path']} (epoch {checkpoint['epoch']}, val accuracy "
              + ("n/a" if accuracy is None else f"{accuracy:.2f}%") + ")"
              + unfinished_text(checkpoint))
    far = f"tar_at_far_{protocol.rate_label(1e-3)}"
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
    for warning in report["warnings"]:
        print(f"warning: {warning}", file=sys.stderr)


def append_csv(path, row):
    """Add one row to the results CSV (header once), rewriting the whole file atomically like
    every other output: a full disk or a kill leaves the previous file whole, never half a
    row. A CSV with another header (older code) is kept aside first and started anew; one
    with a cut row (an append of older code cut by a full disk) is kept aside and its
    complete rows carried over."""
    rows = []
    if path.exists():
        with path.open(newline="") as handle:
            lines = list(csv.reader(handle))
        complete = [line for line in lines[1:] if len(line) == len(CSV_FIELDS)]
        if not lines or lines[0] != CSV_FIELDS:
            print(f"{path} had other columns; kept it as {keep_previous(path)}")
        elif len(complete) < len(lines) - 1:
            print(f"{path} held {len(lines) - 1 - len(complete)} cut rows; kept it as "
                  f"{keep_previous(path)}, the complete rows carried over")
            rows = complete
        else:
            rows = lines[1:]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerows([CSV_FIELDS] + rows)
    csv.DictWriter(buffer, fieldnames=CSV_FIELDS).writerow(row)
    atomic_write_text(path, buffer.getvalue())


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
