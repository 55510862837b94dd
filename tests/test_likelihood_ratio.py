"""likelihood_ratio.py (lir calibration, Cllr, ELUB bounds, two-fold persons), the
likelihood_ratio option of run_eval_clip.py, calibrate.py, compare_photos.py and search.py's LRs."""
import json
import re
import shutil

import numpy as np
import pytest

from handreid.casework import likelihood_ratio
from handreid.model import backbone
from handreid.data.loaders import list_split
from handreid.core.config_files import load_config
from handreid.core.errors import run_cli, UserError
from handreid.methods.stage1 import Stage1
from conftest import DEMO_TRAIN_CONFIG, results_json, run_script
from experiments import calibrate, compare_photos, run_eval_clip, search

EVAL_CONFIG = "configs/demo/eval_tiny_11k_dorsal_r.yml"


def test_cllr_equals_its_formula_pair_by_pair():
    rng = np.random.default_rng(3)
    llrs = rng.normal(0, 1.5, 300)
    same = rng.random(300) < 0.3
    # Brümmer & du Preez: mean over same-person pairs of log2(1 + 1/LR) and over
    # different-person pairs of log2(1 + LR), averaged over the two.
    costs = {True: [], False: []}
    for llr, truth in zip(llrs, same):
        lr = 10.0 ** llr
        costs[bool(truth)].append(np.log2(1 + 1 / lr) if truth else np.log2(1 + lr))
    expected = (np.mean(costs[True]) + np.mean(costs[False])) / 2
    metrics = likelihood_ratio.validity(llrs, same)
    assert metrics["cllr"] == pytest.approx(expected, rel=1e-12)
    assert 0 <= metrics["cllr_min"] <= metrics["cllr"]
    assert metrics["cllr_cal"] == pytest.approx(metrics["cllr"] - metrics["cllr_min"])
    assert metrics["misleading_same"] == pytest.approx(100 * np.mean(llrs[same] < 0))
    assert metrics["misleading_different"] == pytest.approx(100 * np.mean(llrs[~same] > 0))
    assert (metrics["max_log10_lr"], metrics["min_log10_lr"]) == (llrs.max(), llrs.min())


@pytest.mark.parametrize("kind", sorted(likelihood_ratio.CALIBRATORS))
def test_perfectly_separated_scores_give_finite_bounded_lrs(kind):
    rng = np.random.default_rng(0)
    scores = np.concatenate([rng.uniform(0.8, 1.0, 40), rng.uniform(-0.2, 0.5, 400)])
    same = np.arange(440) < 40
    calibration = likelihood_ratio.fit(scores, same, kind)
    llrs = calibration.llr(np.concatenate([scores, [-1.0, 1.0, 0.65]]))
    assert np.isfinite(llrs).all()
    # ELUB: no LR beyond what 40 same and 400 different pairs can support.
    assert -np.log10(41) <= calibration.lower <= llrs.min() < 0
    assert 0 < llrs.max() <= calibration.upper <= np.log10(401)
    table = likelihood_ratio.tabulate(calibration)
    assert likelihood_ratio.llr_from_table(table, 0.9) == pytest.approx(
        calibration.llr([0.9])[0], abs=1e-3)


def test_one_class_of_pairs_cannot_be_calibrated():
    with pytest.raises(UserError, match="same-person and different-person pairs"):
        likelihood_ratio.fit([0.1, 0.2, 0.3], [False, False, False])


def test_two_fold_never_calibrates_on_a_reported_person(monkeypatch):
    """Each score encodes its (query, gallery) pair, so the scores handed to the calibrator
    and to the reported LRs are the pair lists themselves."""
    query_ids = [f"p{i % 8}" for i in range(40)]
    gallery_ids = [f"p{i}" for i in range(8)] + [f"dorsal_l__p{i}" for i in range(8)] + ["q9"]
    num_gallery = len(gallery_ids)
    similarity = np.arange(len(query_ids) * num_gallery, dtype=np.float64).reshape(
        len(query_ids), num_gallery)
    fitted, reported, real_fit = [], [], likelihood_ratio.fit

    def persons(scores):
        return {likelihood_ratio.person_of(ids[int(s) // num_gallery if ids is query_ids
                                               else int(s) % num_gallery])
                for s in scores for ids in (query_ids, gallery_ids)}

    def recording_fit(scores, same, kind):
        fitted.append(persons(scores))
        calibration = real_fit(scores / similarity.max(), same, kind)
        inner = calibration.llr
        calibration.llr = lambda s: reported.append(persons(s)) or inner(s / similarity.max())
        return calibration

    monkeypatch.setattr(likelihood_ratio, "fit", recording_fit)
    llrs, same, folds = likelihood_ratio.two_fold(similarity, query_ids, gallery_ids,
                                                  "logistic", seed=0, index=1)
    assert len(fitted) == len(reported) == 2
    for fold, fit_persons, report_persons in zip(folds, fitted, reported):
        assert fit_persons and report_persons and not fit_persons & report_persons
        assert fit_persons <= set(fold["calibration_persons"])
        assert report_persons <= set(fold["reported_persons"])
    assert fitted[0] | fitted[1] == {f"p{i}" for i in range(8)} | {"q9"}
    assert len(llrs) == len(same) == sum(fold["reported_pairs"] for fold in folds)


def test_verbal_scale():
    assert likelihood_ratio.verbal(np.log10(50)) == "moderate support for the same person"
    assert likelihood_ratio.verbal(-4.5) == "very strong support for different persons"
    assert likelihood_ratio.verbal(0.1).startswith("no support")


@pytest.fixture(scope="module")
def trained(prepared_11k, tmp_path_factory):
    """--set arguments of a tiny Stage-1 model fine-tuned on the synthetic 11k data."""
    work = tmp_path_factory.mktemp("lr_run")
    overrides = {"data_dir": prepared_11k, "save_path": work / "model.pth",
                 "log_path": work / "logs/train.log", "results_dir": work / "results",
                 "num_workers": 0, "num_splits": 2}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    run_script("experiments/train_stage1_frozen_text.py", "--config", DEMO_TRAIN_CONFIG, *sets,
               "--set", "epochs=8", "--set", "warmup_epochs=1")
    return sets, work


def cli(module, capsys, *args):
    """An entry script's main() under run_cli, in this process -> (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: module.main([str(a) for a in args]))
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def ok(module, capsys, *args):
    code, out, err = cli(module, capsys, *args)
    assert code == 0, err
    return out


def one_line_error(result, *words):
    code, out, err = result
    assert code != 0, out
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in lines[0], lines[0]


def printed_llr(text):
    return float(re.search(r"log10 LR ([+-]\d+\.\d+);", text).group(1))


def test_evaluation_calibrate_compare_and_search(trained, prepared_11k, tmp_path, capsys):
    sets, work = trained
    ok(run_eval_clip, capsys, "--config", EVAL_CONFIG, *sets, "--set", "likelihood_ratio=true")
    result = json.loads(results_json(work / "results", EVAL_CONFIG, sets).read_text())
    mean, std = result["mean"], result["std"]
    assert mean["cllr"] < 1 and mean["misleading_same"] < 50
    assert mean["misleading_different"] < 50 and std["cllr"] is not None
    assert mean["cllr_min"] <= mean["cllr"]
    for row in result["per_split"]:
        for fold in row["lr_folds"]:
            assert not set(fold["calibration_persons"]) & set(fold["reported_persons"])
        assert np.isfinite([row["max_log10_lr"], row["min_log10_lr"]]).all()
    plot = results_json(work / "results", EVAL_CONFIG, sets).with_suffix("")
    assert plot.with_name(plot.name + "_lr.png").stat().st_size > 10000
    header = (work / "results/results.csv").read_text().splitlines()[0].split(",")
    assert {"cllr", "cllr_std", "misleading_same", "max_log10_lr"} <= set(header)

    image_dir = prepared_11k / "train_val_test_split_dorsal_r/query0"
    person = sorted(image_dir.iterdir())[0]
    image_a, image_b = sorted(person.iterdir())[:2]
    args = ("--config", EVAL_CONFIG, *sets, image_a, image_b)
    no_calibration = cli(compare_photos, capsys, *args)
    one_line_error(no_calibration, "calibrate.py --config")
    assert "score (cosine similarity)" in no_calibration[1]
    assert "EER threshold " in no_calibration[1]
    assert "score is" in ok(compare_photos, capsys, *args, "--no-lr")

    assert "logistic calibrator" in ok(calibrate, capsys, "--config", EVAL_CONFIG, *sets)
    calibration_file = work / "model.calibration.npz"
    one_line_error(cli(calibrate, capsys, "--config", EVAL_CONFIG, *sets), "--overwrite")
    shown = ok(compare_photos, capsys, *args)
    assert "ENFSI" in shown and "support for" in shown
    compared = printed_llr(shown)

    gallery = tmp_path / "gallery" / person.name
    gallery.mkdir(parents=True)
    shutil.copy(image_b, gallery / image_b.name)
    search_args = ("--config", EVAL_CONFIG, *sets, "--gallery", tmp_path / "gallery",
                   "--query", image_a)
    ok(search, capsys, *search_args, "--out", tmp_path / "search")
    row = (tmp_path / "search/search.csv").read_text().splitlines()[1].split(",")
    assert float(row[-1]) == pytest.approx(compared, abs=1e-3)

    # A calibration of another checkpoint is refused, by compare and by search.
    config = load_config(DEMO_TRAIN_CONFIG, [s for s in sets if s != "--set"])
    names = sorted({name for _, name in list_split(config, "train")})
    Stage1(config, backbone.build_model(config)[0], names).save_checkpoint(
        tmp_path / "other.pth", epoch=1, selection={"metric": "val_loss", "value": 1.0})
    shutil.copy(calibration_file, tmp_path / "other.calibration.npz")
    other = ("--set", f"save_path={tmp_path / 'other.pth'}")
    one_line_error(cli(compare_photos, capsys, *args, *other), "fitted for another model")
    one_line_error(cli(search, capsys, *search_args, *other, "--out", tmp_path / "search2"),
                   "fitted for another model")
    # A different flip rule is another feature: refused too.
    one_line_error(cli(compare_photos, capsys, *args, "--set", "flip=off"),
                   "fitted for another model")


@pytest.mark.parametrize("case", ["missing", "unreadable"])
def test_compare_refuses_a_bad_image(trained, prepared_11k, tmp_path, capsys, case):
    sets, _ = trained
    bad = tmp_path / "hand.jpg"
    if case == "unreadable":
        bad.write_text("not an image")
    good = next((prepared_11k / "train_val_test_split_dorsal_r/query0").rglob("*.jpg"))
    one_line_error(cli(compare_photos, capsys, "--config", EVAL_CONFIG, *sets, good, bad),
                   "IMAGE_B", str(bad), "missing" if case == "missing" else "not an image")


def folder_dataset(prepared_11k, tmp_path, persons, test_ids=None, source="palmar_l/train_all"):
    """A prepared folder dataset of `persons` identities of `source` (by default palmar_l
    training identities: persons the evaluated dorsal_r test set does not hold)."""
    raw = tmp_path / "raw"
    source = prepared_11k / f"train_val_test_split_{source}"
    for folder in sorted(source.iterdir())[:persons]:
        shutil.copytree(folder, raw / folder.name)
    args = ["datasets/prepare_folder.py", "--raw", raw, "--out", tmp_path / "prepared",
            "--num-splits", "1", "--copy"]
    if test_ids:
        (tmp_path / "ids.txt").write_text("\n".join(test_ids) + "\n")
        args += ["--test-ids", tmp_path / "ids.txt"]
    run_script(*args)
    return tmp_path / "prepared", sorted(p.name for p in raw.iterdir())


def test_calibration_data_calibrates_the_evaluation(trained, prepared_11k, tmp_path, capsys):
    sets, work = trained
    data, _ = folder_dataset(prepared_11k, tmp_path, persons=10)
    results = tmp_path / "results"
    code, _, err = cli(run_eval_clip, capsys, "--config", EVAL_CONFIG, *sets,
                       "--set", "likelihood_ratio=true", "--set", f"calibration_data={data}",
                       "--set", f"results_dir={results}", "--set", "plots=false")
    assert code == 0 and "warning" not in err, err
    result = json.loads(results_json(results, EVAL_CONFIG, sets).read_text())
    calibration = result["likelihood_ratio"]["calibration"]
    assert str(data) in calibration["data"] and calibration["persons"] == 5
    assert result["per_split"][0]["lr_folds"] is None
    assert np.isfinite(result["mean"]["cllr"])


def test_calibration_data_of_one_person_is_refused(trained, prepared_11k, tmp_path, capsys):
    sets, _ = trained
    source = prepared_11k / "train_val_test_split_palmar_l/train_all"
    one = sorted(p.name for p in source.iterdir())[:1]
    data, _ = folder_dataset(prepared_11k, tmp_path, persons=3, test_ids=one)
    one_line_error(cli(calibrate, capsys, "--config", EVAL_CONFIG, *sets,
                       "--set", f"calibration_data={data}", "--overwrite"),
                   "1 person", "at least 2")


@pytest.mark.parametrize("case", ["evaluated", "missing"])
def test_evaluation_refuses_bad_calibration_data(trained, prepared_11k, tmp_path, capsys, case):
    """Before any image is encoded: calibration data that are the evaluated (folder) dataset
    itself, or that are not prepared."""
    sets, _ = trained
    data, _ = folder_dataset(prepared_11k, tmp_path, persons=6)
    calibration = data if case == "evaluated" else tmp_path / "nowhere"
    result = cli(run_eval_clip, capsys, "--config", EVAL_CONFIG, *sets, "--set",
                 "likelihood_ratio=true", "--set", "dataset=folder", "--set", f"data_dir={data}",
                 "--set", "num_splits=1", "--set", f"calibration_data={calibration}", "--set",
                 f"results_dir={tmp_path / 'results'}")
    one_line_error(result, *(["is the evaluated dataset"] if case == "evaluated"
                             else ["dataset split not found", "prepare_folder.py"]))
    assert not (tmp_path / "results").exists()


def test_run_all_summary_has_a_cllr_column(trained, tmp_path, capsys):
    import run_all_finetuned_stage1

    sets, _ = trained
    ok(run_all_finetuned_stage1, capsys, "--configs", EVAL_CONFIG, *sets, "--set",
       "likelihood_ratio=true", "--set", "plots=false", "--set",
       f"results_dir={tmp_path / 'results'}", "--out", tmp_path / "summary")
    table = (tmp_path / "summary.md").read_text().splitlines()
    assert table[0].rstrip(" |").endswith("Cllr")
    cllr = float(table[2].rstrip(" |").rsplit("|", 1)[1].split("±")[0])
    assert 0 < cllr < 1


def test_calibration_data_with_the_names_of_evaluated_persons_warns(trained, prepared_11k,
                                                                    tmp_path, capsys):
    sets, _ = trained
    data, _ = folder_dataset(prepared_11k, tmp_path, persons=6, source="dorsal_r/test")
    code, _, err = cli(run_eval_clip, capsys, "--config", EVAL_CONFIG, *sets,
                       "--set", "likelihood_ratio=true", "--set", f"calibration_data={data}",
                       "--set", f"results_dir={tmp_path / 'results'}", "--set", "plots=false")
    assert code == 0 and "persons of calibration_data have the names of evaluated" in err
