"""What one evaluation of a config gives the user: the printed report, the results JSON (a
re-run keeps the previous one aside), one row appended to results.csv (report.py), and the
plots (plots.py). `evaluate_config` runs all of it for one resolved config; it serves
experiments/run_eval_clip.py and run_all_finetuned_stage1.py.
"""
from datetime import datetime
from pathlib import Path

from handreid.core.atomic_files import atomic_write_json, keep_previous
from handreid.core.errors import check_writable
from handreid.core.runtime import resolve_device
from handreid.evaluation import protocol
from handreid.evaluation.encoder import load_model, protocol_identities
from handreid.evaluation.plots import (plot_cmc, plot_likelihood_ratios, plot_ranking,
                                       plot_verification)
from handreid.evaluation.report import (append_csv, checkpoint_warnings, csv_row,
                                        dataset_label, print_report)


def evaluate_config(config, store=None):
    """Evaluate one resolved config; print the report, write JSON, CSV row and plots.
    `store`: a protocol.FeatureStore shared with earlier configs of this process.
    Returns the results dict (as written to the JSON)."""
    device = resolve_device(config)
    protocol.check_data(config)
    check_writable(Path(config["results_dir"]) / "results.csv")  # before any image is encoded
    model, checkpoint = load_model(config, protocol_identities(config))
    model.to(device)
    evaluated = protocol.evaluate(model, config, device, store)
    result = {"name": config["name"], "variant": config["variant"], "model": config["model"],
              "dataset": dataset_label(config), "checkpoint": checkpoint,
              "device": str(device), "config": config,
              "timestamp": datetime.now().astimezone().isoformat(timespec="seconds"),
              **evaluated.report}
    result["warnings"] = evaluated.report["warnings"] + checkpoint_warnings(checkpoint)
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
          + f"; row added to {files['csv']}")
    if config["plots"]:
        print(f"plots: {files['cmc_plot']}, {files['ranking_plot']}, "
              f"{files['verification_plot']}"
              + (f", {files['lr_plot']}" if "lr_plot" in files else ""))
    return result
