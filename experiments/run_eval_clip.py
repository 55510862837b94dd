"""Evaluate a CLIP image encoder on the hand re-identification protocol (all splits).

    python experiments/run_eval_clip.py --config configs/finetuning_stage1_frozen_text/eval_vitb16_11k_dorsal_r.yml
    python experiments/run_eval_clip.py --config configs/baseline/eval_vitb16_11k_dorsal_r.yml --set num_splits=1

`variant: baseline` evaluates the pretrained CLIP image encoder as it is; `variant: finetuned`
loads the checkpoint at `save_path`, whichever method trained it (stage1, clipreid or
clip_handid: the checkpoint holds its module specs and feature definition), strictly checked
against the config.

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

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import run_cli


def main(argv=None):
    args = make_parser(__doc__.splitlines()[0]).parse_args(argv)
    config = config_from_args(args)
    # Only once the config is valid: a typo is answered before the evaluation's modules load.
    from handreid.evaluation.evaluate import evaluate_config

    evaluate_config(config)


if __name__ == "__main__":
    run_cli(main)
