"""Scores -> calibrated likelihood ratios (LRs) with lir (Netherlands Forensic Institute), and
their validity metrics.

An LR here is P(score | same person) / P(score | different persons) for the cosine score of
two images, as estimated by a calibrator fitted on scored pairs of persons disjoint from those
the LRs are reported for. LRs are handled as log10 LRs (LLRs), as lir does.

Calibrators (lir): logistic (LogitCalibrator: logistic regression of the score, class-balanced;
monotone and smooth, two parameters, the default), isotonic (IsotonicCalibrator: the PAV fit,
a monotone step function) and kde (KDECalibrator: kernel densities of the two score
distributions, Silverman bandwidth; slow on large pair sets). The LLRs are then bounded by the
empirical lower and upper bounds (ELUB, Vergeer et al. 2016, lir's `elub`) of the calibration
data: no LR is larger than those data can support, and perfectly separated scores still give
finite LRs.

Persons: an identity label `<prefix>__<person>` (11k: another aspect of the same person; HD:
a distractor subject) belongs to person `<person>`. In evaluation (two-fold), each split's
persons are split in two seeded halves; the calibrator is fitted on the pairs whose two
persons are both in one half and applied to the pairs whose two persons are both in the other,
then the halves swap and the reported LLRs are pooled; pairs across the halves are left out.
"""
import json
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from handreid.core.errors import UserError
from handreid.core.atomic_files import atomic_write

# logistic: lir's LogitCalibrator (scikit-learn's class-balanced LogisticRegression, its
# default L2 penalty C=1), solved by Newton steps: the same optimum as the default lbfgs, in
# about a third of the time on one score.
CALIBRATORS = ("logistic", "isotonic", "kde")


def _new_calibrator(kind):
    # lir (and scikit-learn with it, about 1 s) is imported only where LRs are computed, not
    # by every evaluation that imports this module.
    if kind == "logistic":
        from lir.algorithms.logistic_regression import LogitCalibrator
        return LogitCalibrator(solver="newton-cholesky")
    if kind == "isotonic":
        from lir.algorithms.isotonic_regression import IsotonicCalibrator
        return IsotonicCalibrator()
    from lir.algorithms.kde import KDECalibrator
    return KDECalibrator(bandwidth="silverman")


DEFAULT_CALIBRATOR = "logistic"
# Per-split validity metrics: Cllr and its parts in bits; misleading-evidence rates in percent;
# the largest and smallest reported LR as log10 LR.
LR_METRICS = ("cllr", "cllr_min", "cllr_cal", "misleading_same", "misleading_different",
              "max_log10_lr", "min_log10_lr")
# The calibrated LLR is tabulated at these cosine scores in a calibration file and read by
# linear interpolation: one function of the score, equal in compare_photos.py and search.py.
SCORE_GRID = np.linspace(-1.0, 1.0, 20001)
# ENFSI Guideline for Evaluative Reporting in Forensic Science (2015), verbal equivalents of
# the LR: (lowest LR of the band, words). Below 1 the same words hold for 1/LR in support of
# the other proposition.
ENFSI_SCALE = ((1e6, "extremely strong support"), (1e4, "very strong support"),
               (1e3, "strong support"), (1e2, "moderately strong support"),
               (1e1, "moderate support"), (2.0, "weak support"))
ENFSI_REFERENCE = "ENFSI Guideline for Evaluative Reporting in Forensic Science (2015)"
CALIBRATE_COMMAND = "python experiments/calibrate.py --config <eval config>"


def person_of(label):
    """The person an identity label belongs to: `<prefix>__<person>` -> `<person>`."""
    return str(label).rpartition("__")[2]


@dataclass
class Calibration:
    """A fitted score -> LLR calibrator with its ELUB bounds (log10) and its data's size."""
    kind: str
    calibrator: object
    lower: float
    upper: float
    num_same: int
    num_different: int

    def llr(self, scores):
        """Bounded log10 LRs of cosine scores."""
        llrs = self.calibrator.transform(np.asarray(scores, dtype=np.float64).reshape(-1))
        return np.clip(llrs, self.lower, self.upper)


def fit(scores, same, kind=DEFAULT_CALIBRATOR):
    """Fit `kind` on scores (1-D) with labels `same` (True = same person) and bound it by the
    ELUB of the calibration data's own LLRs."""
    if kind not in CALIBRATORS:
        raise UserError(f"lr_calibrator must be one of {', '.join(CALIBRATORS)}, got {kind!r}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(same, dtype=int).reshape(-1)
    num_same = int(labels.sum())
    if num_same == 0 or num_same == len(labels):
        raise UserError(f"calibration needs same-person and different-person pairs, got "
                        f"{num_same} same and {len(labels) - num_same} different; calibrate on "
                        "data with at least two persons and two images of some person")
    from lir.algorithms.bayeserror import elub
    calibrator = _new_calibrator(kind).fit(scores, labels)
    lower, upper = elub(calibrator.transform(scores).copy(), labels)
    return Calibration(kind, calibrator, float(lower), float(upper), num_same,
                       len(labels) - num_same)


def validity(llrs, same):
    """Validity metrics of reported LLRs against the truth `same` (see LR_METRICS)."""
    llrs = np.asarray(llrs, dtype=np.float64)
    labels = np.asarray(same, dtype=int)
    from lir import metrics
    from lir.data.models import LLRData
    data = LLRData(features=llrs, labels=labels)
    cllr, cllr_min = metrics.cllr(data), metrics.cllr_min(data)
    return {"cllr": cllr, "cllr_min": cllr_min, "cllr_cal": cllr - cllr_min,
            "misleading_same": 100.0 * float(np.mean(llrs[labels == 1] < 0)),
            "misleading_different": 100.0 * float(np.mean(llrs[labels == 0] > 0)),
            "max_log10_lr": float(llrs.max()), "min_log10_lr": float(llrs.min())}


def pair_arrays(similarity, query_ids, gallery_ids, query_rows=None, gallery_rows=None):
    """(scores, same) of the query x gallery pairs, optionally of some rows/columns only."""
    similarity = np.asarray(similarity)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    if query_rows is not None:
        similarity, query_ids = similarity[query_rows], query_ids[query_rows]
    if gallery_rows is not None:
        similarity, gallery_ids = similarity[:, gallery_rows], gallery_ids[gallery_rows]
    same = query_ids[:, None] == gallery_ids[None, :]
    return similarity.reshape(-1), same.reshape(-1)


def person_halves(query_ids, gallery_ids, seed, index):
    """A seeded split of the persons of one split (queries and gallery) into two halves."""
    persons = sorted({person_of(i) for i in list(query_ids) + list(gallery_ids)})
    if len(persons) < 4:
        raise UserError(f"likelihood_ratio needs at least 4 persons per split for its two-fold "
                        f"calibration, got {len(persons)}; add persons or set "
                        "calibration_data: <a prepared folder dataset>")
    order = np.random.default_rng([seed, index, 17]).permutation(len(persons))
    half = len(persons) // 2
    return ({persons[i] for i in order[:half]}, {persons[i] for i in order[half:]})


def fold_rows(ids, persons):
    return np.array([person_of(i) in persons for i in ids], dtype=bool)


def two_fold(similarity, query_ids, gallery_ids, kind, seed, index):
    """Two-fold LLRs of one split -> (llrs, same, folds). folds: for each fold the calibrated
    and the reported persons with the pair counts (what the test checks disjointness on)."""
    halves = person_halves(query_ids, gallery_ids, seed, index)
    llrs, same, folds = [], [], []
    for fit_half, report_half in (halves, halves[::-1]):
        scores, labels = pair_arrays(similarity, query_ids, gallery_ids,
                                     fold_rows(query_ids, fit_half),
                                     fold_rows(gallery_ids, fit_half))
        calibration = fit(scores, labels, kind)
        reported, truth = pair_arrays(similarity, query_ids, gallery_ids,
                                      fold_rows(query_ids, report_half),
                                      fold_rows(gallery_ids, report_half))
        llrs.append(calibration.llr(reported))
        same.append(truth)
        folds.append({"calibration_persons": sorted(fit_half),
                      "reported_persons": sorted(report_half),
                      "calibration_pairs": len(scores), "reported_pairs": len(reported),
                      "lower_log10_bound": calibration.lower,
                      "upper_log10_bound": calibration.upper})
    return np.concatenate(llrs), np.concatenate(same), folds


def verbal(log10_lr):
    """The ENFSI verbal equivalent of an LR, naming the proposition it supports."""
    lr = 10.0 ** abs(log10_lr)
    for lowest, words in ENFSI_SCALE:
        if lr >= lowest:
            return (f"{words} for the same person" if log10_lr > 0
                    else f"{words} for different persons")
    return "no support for either proposition (LR between 1/2 and 2)"


def tabulate(calibration):
    """The bounded LLR at SCORE_GRID (what a calibration file stores)."""
    return calibration.llr(SCORE_GRID)


def llr_from_table(table, scores):
    """LLRs of scores from a tabulated calibration (linear interpolation on SCORE_GRID)."""
    return np.interp(np.asarray(scores, dtype=np.float64), SCORE_GRID, table)


def calibration_path(config):
    """Where the calibration of a config's model lives: beside the checkpoint
    (<save_path stem>.calibration.npz); for the baseline, in results_dir."""
    if config["variant"] == "baseline":
        return Path(config["results_dir"]) / f"{config['name']}_baseline.calibration.npz"
    return Path(config["save_path"]).with_suffix(".calibration.npz")


def save_calibration(path, calibration, model, data):
    """Write a calibration file: the bounded LLR tabulated on SCORE_GRID and, as JSON, the
    calibrator, its bounds, the data it was fitted on (`data`: description and size) and the
    model it belongs to (`model`: feature_encoder.describe_model's dict)."""
    meta = {"calibrator": calibration.kind, "lower_log10_bound": calibration.lower,
            "upper_log10_bound": calibration.upper, "same_person_pairs": calibration.num_same,
            "different_person_pairs": calibration.num_different, "data": data,
            "score": "cosine similarity of the L2-normalised retrieval features",
            "fingerprint": model["fingerprint"], "feature": model["feature"],
            "model": model["model"], "variant": model["variant"],
            "checkpoint": (model["checkpoint"] or {}).get("path"),
            "created": datetime.now().astimezone().isoformat(timespec="seconds")}
    arrays = {"scores": SCORE_GRID, "log10_lr": tabulate(calibration),
              "meta": np.array(json.dumps(meta, sort_keys=True))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))
    return meta


@dataclass
class CalibrationFile:
    """A loaded calibration file: its metadata and the LLR table."""
    path: Path
    meta: dict
    table: np.ndarray

    def llr(self, scores):
        return llr_from_table(self.table, scores)


def load_calibration(path, model):
    """The calibration at `path` for `model` (describe_model's dict). A missing file names the
    calibrate command; one fitted for another checkpoint, feature or flip rule is refused."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no calibration for this model at {path}; fit one with "
                        f"{CALIBRATE_COMMAND} (or pass --no-lr for the score alone)")
    try:
        with np.load(path, allow_pickle=False) as data:
            meta, table = json.loads(str(data["meta"])), data["log10_lr"]
            grid = data["scores"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        raise UserError(f"{path} is not a readable calibration file; re-create it with "
                        f"{CALIBRATE_COMMAND} --overwrite") from None
    if not np.array_equal(grid, SCORE_GRID):
        raise UserError(f"{path} was written by another version of calibrate.py; re-create it "
                        f"with {CALIBRATE_COMMAND} --overwrite")
    if meta.get("fingerprint") != model["fingerprint"]:
        feature = meta.get("feature") or {}
        raise UserError(f"{path} was fitted for another model or feature (checkpoint "
                        f"{meta.get('checkpoint')}, feature {feature.get('definition')}, flip "
                        f"{feature.get('flip')}), not this config's (flip "
                        f"{model['feature']['flip']}); re-fit it with {CALIBRATE_COMMAND} "
                        "--overwrite")
    return CalibrationFile(path, meta, table)
