"""Are two hand photos of the same person? The score, where it falls against the EER threshold
of the model's evaluation, and the calibrated likelihood ratio with its verbal equivalent.

    python experiments/compare_photos.py --config <eval config> IMAGE_A IMAGE_B [--no-lr]

Prints the cosine score of the two images' retrieval features (the evaluation's own decode,
feature function and flip rule); the EER threshold (mean over splits) of this model's latest
evaluation (the newest results JSON in results_dir, from run_eval_clip.py, of this checkpoint
file and epoch, or this baseline backbone, with this flip rule) and on which side the score
falls; then the likelihood ratio from the calibration file beside the checkpoint
(calibrate.py): LR and log10 LR, the ELUB bounds that cap it, and the verbal equivalent on the
ENFSI scale (ENFSI Guideline for Evaluative Reporting in Forensic Science, 2015).

Without a calibration file the score and threshold are printed, then an error names the
calibrate command (exit 1); --no-lr prints the score and threshold alone (exit 0).
"""
import json
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import run_cli, UserError
import numpy as np
from handreid.casework import likelihood_ratio
from handreid.evaluation.encoder import Encoder
from handreid.data.image_files import image_problem

EVAL_COMMAND = "python experiments/run_eval_clip.py --config <eval config>"


def check_image(path, name):
    problem = image_problem(path)
    if problem:
        raise UserError(f"{name} {path}: {problem}; give an image file Pillow can read "
                        "(JPEG, PNG, BMP, WebP, TIFF, ...)")


def same_model(result, config, description):
    """Whether a results file evaluated the model `config` and `description` name, with its
    flip rule: the same checkpoint file and epoch, or for the baseline the same backbone."""
    if result.get("flip") != config["flip"] or result.get("variant") != config["variant"]:
        return False
    if config["variant"] == "baseline":
        evaluated = result.get("config") or {}
        return all(evaluated.get(key) == config[key]
                   for key in ("model", "pretrained", "image_size", "normalize"))
    evaluated, mine = result.get("checkpoint") or {}, description["checkpoint"] or {}
    return evaluated.get("epoch") == mine.get("epoch") and \
        Path(evaluated.get("path", "")).resolve() == Path(mine["path"]).resolve()


def eer_threshold(config, description):
    """-> (threshold or None, where it came from or why there is none): from the newest results
    file in results_dir that evaluated this model, whatever --set spelling named it then."""
    folder = Path(config["results_dir"])
    for path in sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            result = json.loads(path.read_text())
            if same_model(result, config, description):
                return result["mean"]["eer_threshold"], \
                    f"{path}, mean over {result['num_splits']} splits"
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            continue
    return None, (f"no evaluation of this model with flip {config['flip']} in {folder}; run "
                  f"{EVAL_COMMAND} for it")


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("image_a", type=Path, metavar="IMAGE_A")
    parser.add_argument("image_b", type=Path, metavar="IMAGE_B")
    parser.add_argument("--no-lr", action="store_true",
                        help="print the score and the EER threshold only (no calibration)")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    check_image(args.image_a, "IMAGE_A")
    check_image(args.image_b, "IMAGE_B")
    encoder = Encoder(config)
    features = encoder.encode([str(args.image_a), str(args.image_b)])
    score = float(np.dot(features[0], features[1]))
    print(f"A: {args.image_a}\nB: {args.image_b}\nmodel: {config['model']} "
          f"({config['variant']}" + (f", checkpoint {config['save_path']}"
                                      if config["variant"] == "finetuned" else "")
          + f"), flip {config['flip']}")
    print(f"score (cosine similarity): {score:.4f}")
    threshold, source = eer_threshold(config, encoder.description)
    if threshold is None:
        print(f"EER threshold: unavailable ({source})")
    else:
        side = "at or above: same person" if score >= threshold else "below: different persons"
        print(f"EER threshold {threshold:.4f} ({source}): the score is {side} at the equal-"
              "error-rate operating point")
    if args.no_lr:
        return
    calibration = likelihood_ratio.load_calibration(
        likelihood_ratio.calibration_path(config), encoder.description)
    meta = calibration.meta
    llr = float(calibration.llr(score))
    print(f"likelihood ratio (same person vs different persons): LR {10 ** llr:.4g}, log10 LR "
          f"{llr:+.3f}; bounds (ELUB) log10 LR [{meta['lower_log10_bound']:+.2f}, "
          f"{meta['upper_log10_bound']:+.2f}]"
          + (" (capped at a bound)" if llr in (meta["lower_log10_bound"],
                                               meta["upper_log10_bound"]) else ""))
    print(f"calibration: {calibration.path} ({meta['calibrator']} on {meta['data']['data']}, "
          f"{meta['same_person_pairs']} same / {meta['different_person_pairs']} different "
          "pairs)")
    print(f"verbal equivalent ({likelihood_ratio.ENFSI_REFERENCE}): the score provides "
          f"{likelihood_ratio.verbal(llr)}")


if __name__ == "__main__":
    run_cli(main)
