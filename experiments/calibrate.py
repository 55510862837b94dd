"""Fit the score -> likelihood-ratio calibration of a model and write it beside its checkpoint.

    python experiments/calibrate.py --config <eval config> [--set calibration_data=<prepared folder dataset>] [--overwrite]

The calibration pairs are the query0 x gallery0 pairs of `calibration_data` (a folder dataset
prepared by datasets/prepare_folder.py: reference data of persons other than those of the
case), or, without it, of the config's own dataset: its test persons, never the persons the
model was trained on. Each pair's score is the cosine similarity of the model's retrieval
features under the config's flip rule; the calibrator is `lr_calibrator` (lir; default
logistic) and the log10 LRs are bounded by the ELUB of those pairs.

Writes <save_path stem>.calibration.npz (baseline: <results_dir>/<name>_baseline.calibration.npz):
the log10 LR tabulated over the cosine scores -1..1, the calibrator, its bounds, the data's
description and size, and the fingerprint of the model, feature and flip rule it was fitted
for. compare_photos.py and search.py read it and refuse it for any other model.
"""

from handreid.core.startup import start

start()

from handreid.evaluation import protocol
from handreid.casework import likelihood_ratio
from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import run_cli, UserError
from handreid.evaluation.encoder import Encoder


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing calibration file")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    path = likelihood_ratio.calibration_path(config)
    if path.exists() and not args.overwrite:
        raise UserError(f"{path} exists; pass --overwrite to replace it")
    protocol.check_data(protocol.calibration_config(config))  # before the model loads
    encoder = Encoder(config)
    scores, same, data, _ = protocol.calibration_pairs(encoder.model, config,
                                                         encoder.device)
    calibration = likelihood_ratio.fit(scores, same, config["lr_calibrator"])
    meta = likelihood_ratio.save_calibration(path, calibration, encoder.description, data)
    print(f"{path}: {meta['calibrator']} calibrator on {data['data']}, {data['persons']} "
          f"persons, {meta['same_person_pairs']} same-person and "
          f"{meta['different_person_pairs']} different-person pairs; log10 LR bounded to "
          f"[{meta['lower_log10_bound']:.2f}, {meta['upper_log10_bound']:.2f}] (ELUB); "
          f"model fingerprint {meta['fingerprint'][:12]}, flip {meta['feature']['flip']}")


if __name__ == "__main__":
    run_cli(main)
