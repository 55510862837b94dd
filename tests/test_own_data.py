"""Your own data end to end through the command lines: the synthetic hands re-arranged as
<root>/<identity>/<images> (with nested folders, PNGs, a name with spaces and non-ASCII letters,
and the usual damage), prepared by prepare_folder.py, trained, evaluated, exported as
features, searched and exported to ONNX; and each bad input as a one-line error."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from handreid.evaluation import protocol
import run_all_finetuned_stage1
from handreid.data.loaders import decode_image
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from conftest import DEMO_TRAIN_CONFIG, ROOT, results_json, run_script
from experiments import export_onnx, extract_features, search
from handreid.evaluation.encoder import load_model

EVAL_CONFIG = ROOT / "configs/demo/eval_tiny_11k_dorsal_r.yml"
BASELINE_CONFIG = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"
ODD_NAME = "Hånd ñ 1.jpg"  # spaces and non-ASCII letters must work everywhere
LONELY = "only one"  # an identity with a single image: skipped by name


def one_line_error(proc, code, *words):
    """The run failed with `code`, one stderr line starting 'error:', no traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr and lines[-1].startswith("error:"), proc.stderr
    assert all(word in lines[-1] for word in words), lines[-1]


def arrange(raw, root):
    """Synthetic raw 11k -> <root>/<identity>/: the dorsal right images, one dorsal left image
    as PNG in a nested folder, plus a non-image file, a corrupt JPEG, an oddly named image and a
    single-image identity."""
    left_done = set()
    with (raw / "HandInfo.csv").open() as handle:
        for row in csv.DictReader(handle):
            identity, source = row["id"].strip(), raw / "Hands" / row["imageName"]
            if row["accessories"] != "0":
                continue
            if row["aspectOfHand"] == "dorsal right":
                (root / identity).mkdir(parents=True, exist_ok=True)
                shutil.copy(source, root / identity / row["imageName"])
            elif row["aspectOfHand"] == "dorsal left" and identity not in left_done:
                left_done.add(identity)
                (root / identity / "left").mkdir(parents=True)
                Image.open(source).save(root / identity / "left" / f"{source.stem}.png")
    first, second = sorted(p for p in root.iterdir())[:2]
    sample = sorted(first.glob("*.jpg"))[0]
    (first / "notes.txt").write_text("not an image")
    (first / "corrupt.jpg").write_bytes(sample.read_bytes()[:400])
    ImageOps.mirror(Image.open(sample)).save(second / ODD_NAME)  # unlike any other image
    (root / LONELY).mkdir()
    shutil.copy(sample, root / LONELY / "a.jpg")


def run_main(module, capsys, *args):
    """A script's main() in this process (faster than a subprocess) -> its stdout."""
    module.main([str(a) for a in args])
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def own_root(synthetic_11k_raw, tmp_path_factory):
    root = tmp_path_factory.mktemp("own") / "hands"
    arrange(synthetic_11k_raw, root)
    return root


@pytest.fixture(scope="module")
def own_prepared(own_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("own_prepared")
    proc = run_script("datasets/prepare_folder.py", "--raw", own_root, "--out", out,
                      "--num-splits", "2")
    return out, proc


@pytest.fixture(scope="module")
def own_overrides(own_prepared, tmp_path_factory):
    """--set arguments of a tiny model trained on the folder dataset (shared by the tests)."""
    work = tmp_path_factory.mktemp("own_run")
    overrides = {"dataset": "folder", "data_dir": own_prepared[0],
                 "save_path": work / "model.pth", "log_path": work / "logs/train.log",
                 "results_dir": work / "results", "num_workers": 0, "num_splits": 2}
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    run_script("experiments/train_stage1_frozen_text.py", "--config", DEMO_TRAIN_CONFIG, *sets,
               "--set", "epochs=2", "--set", "warmup_epochs=1")
    return sets, work


@pytest.fixture(scope="module")
def exported(own_root, own_overrides):
    sets, work = own_overrides
    out = work / "features.npz"
    proc = run_script("experiments/extract_features.py", "--config", EVAL_CONFIG, *sets,
                      "--images", own_root, "--out", out)
    with np.load(out, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}, proc


def test_prepare_splits_by_identity_and_reports_what_it_skips(own_root, own_prepared):
    out, proc = own_prepared
    manifest = json.loads((out / "train_val_test_split/splits.json").read_text())
    splits = manifest["splits"]
    train, test = set(splits["train_all"]), set(splits["test"])
    assert train and test and not train & test
    assert LONELY not in train | test
    assert abs(len(test) - len(train)) <= 1  # --test-fraction 0.5 by default
    for i in range(2):
        assert set(splits[f"gallery{i}"]) == set(splits[f"query{i}"]) == test
    entries = {p.name for p in (out / "train_val_test_split").rglob("*") if p.is_file()}
    assert ODD_NAME in entries and any(e.startswith("left__") and e.endswith(".png")
                                       for e in entries)
    assert "corrupt.jpg" not in entries and "notes.txt" not in entries
    for name in ("notes.txt", "corrupt.jpg", LONELY):
        assert name in proc.stderr
    again = run_script("datasets/prepare_folder.py", "--raw", own_root, "--out", out,
                       "--num-splits", "2")
    assert "up to date" in again.stdout


def test_prepare_distractors_and_test_ids(own_root, tmp_path):
    distractors = tmp_path / "others"
    (distractors / "stranger" / "deeper").mkdir(parents=True)
    for image in sorted((own_root / LONELY).glob("*.jpg")):
        shutil.copy(image, distractors / "stranger" / "deeper" / image.name)
    chosen = sorted(p.name for p in own_root.iterdir())[2:5]
    (tmp_path / "test_ids.txt").write_text("# test identities\n" + "\n".join(chosen) + "\n")
    out = tmp_path / "out"
    run_script("datasets/prepare_folder.py", "--raw", own_root, "--out", out, "--num-splits", "2",
               "--distractors", distractors, "--test-ids", tmp_path / "test_ids.txt")
    splits = json.loads((out / "train_val_test_split/splits.json").read_text())["splits"]
    assert sorted(splits["test"]) == chosen
    for i in range(2):
        assert set(splits[f"gallery{i}"]) == set(chosen) | {"distractor__stranger"}
        assert (out / f"train_val_test_split/gallery{i}/distractor__stranger/deeper__a.jpg"
                ).is_file()


@pytest.mark.parametrize("layout,words", [("empty", ["no identity folder"]),
                                          ("flat", ["images but no identity folders"])])
def test_prepare_refuses_a_root_without_identity_folders(own_root, tmp_path, layout, words):
    root = tmp_path / layout
    root.mkdir()
    if layout == "flat":
        for image in sorted((own_root / LONELY).glob("*.jpg")):
            shutil.copy(image, root / image.name)
    proc = run_script("datasets/prepare_folder.py", "--raw", root, "--out", tmp_path / "out",
                      check=False)
    one_line_error(proc, 1, *words)
    assert not (tmp_path / "out").exists()


def test_training_evaluation_and_run_all_work_with_a_folder_dataset(own_overrides, capsys):
    sets, work = own_overrides
    printed = run_main(run_all_finetuned_stage1, capsys, "--configs", EVAL_CONFIG, *sets,
                       "--out", work / "summary")
    table = (work / "summary.md").read_text()
    assert "| folder | finetuned | sum | no | 2 |" in table, printed
    result = json.loads(results_json(work / "results", EVAL_CONFIG, sets).read_text())
    assert result["dataset"] == "folder" and result["gallery"] == "gallery{i}"


def test_exported_features_equal_the_evaluation_features(own_overrides, own_root, exported):
    sets, _ = own_overrides
    data, proc = exported
    features, paths = data["features"], data["paths"].tolist()
    assert features.dtype == np.float32 and np.allclose(np.linalg.norm(features, axis=1), 1)
    assert all(p.startswith(str(own_root)) for p in paths) and len(paths) == len(set(paths))
    names = {os.path.basename(p) for p in paths}
    assert ODD_NAME in names and "corrupt.jpg" not in names and "notes.txt" not in names
    assert "corrupt.jpg" in proc.stderr and "notes.txt" in proc.stderr
    assert data["identities"].tolist() == [os.path.relpath(p, own_root).split(os.sep)[0]
                                           for p in paths]
    description = json.loads(str(data["model"]))
    assert description["checkpoint"]["path"].endswith("model.pth")
    assert description["feature"]["l2_normalised"] and description["fingerprint"]

    config = load_config(EVAL_CONFIG, [s for s in sets if s != "--set"])
    model, _ = load_model(config)
    evaluated = protocol.evaluate(model, config, torch.device("cpu"))
    row_of_inode = {os.stat(p).st_ino: i for i, p in enumerate(paths)}
    compared = 0
    for split in evaluated.splits:
        for path, row in zip(split.query_paths + split.gallery_paths,
                             torch.cat([split.query_rows, split.gallery_rows]).tolist()):
            np.testing.assert_allclose(features[row_of_inode[os.stat(path).st_ino]],
                                       evaluated.features[row].numpy(), atol=1e-5)
            compared += 1
    assert compared > 50


def test_search_finds_a_gallery_image_first_with_score_one(own_overrides, own_root, exported):
    sets, work = own_overrides
    query = next(own_root.rglob(ODD_NAME))
    proc = run_script("experiments/search.py", "--config", EVAL_CONFIG, *sets,
                      "--gallery", work / "features.npz", "--query", query, "--top-k", "3",
                      "--out", work / "search_npz")
    with (work / "search_npz/search.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["gallery"] == str(query) and rows[0]["gallery_identity"] == query.parent.name
    assert abs(float(rows[0]["score"]) - 1) < 1e-5
    assert (work / "search_npz/search_ranking.png").is_file()
    assert query.parent.name in proc.stdout


def test_search_caches_the_gallery_and_applies_the_threshold(own_overrides, own_prepared,
                                                              capsys):
    sets, work = own_overrides
    gallery = own_prepared[0] / "train_val_test_split/gallery0"
    args = ["--config", EVAL_CONFIG, *sets, "--gallery", gallery, "--out", work / "search"]
    identity = sorted(p for p in gallery.iterdir())[0]
    first = run_main(search, capsys, *args, "--query", gallery, "--threshold", "0.9999")
    count = sum(1 for p in gallery.rglob("*") if p.is_file())
    assert "0 features from the cache" in first and f"{count} encoded" in first
    assert "no match in gallery" not in first  # every query is in the gallery
    assert f"{count} queries, {count} with a match" in first
    second = run_main(search, capsys, *args, "--query", identity, "--threshold", "1.5")
    assert f"{count} features from the cache" in second and " 0 encoded" in second
    assert "no match in gallery" in second
    with (work / "search/search.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert rows and all(r["match"] == "no" and r["query_identity"] == "" for r in rows)
    assert len(list((work / "search").glob("search.*.csv"))) == 1  # the first run's, kept


def test_a_webp_query_is_read_as_an_image(own_overrides, own_prepared, tmp_path, capsys):
    from PIL import Image
    sets, work = own_overrides
    gallery = own_prepared[0] / "train_val_test_split/gallery0"
    photo = sorted(p for p in gallery.rglob("*") if p.is_file())[0]
    query = tmp_path / "query.webp"
    Image.open(photo).save(query, lossless=True)
    printed = run_main(search, capsys, "--config", EVAL_CONFIG, *sets, "--gallery", gallery,
                       "--query", query, "--out", work / "webp", "--threshold", "0.99")
    assert "1 queries, 1 with a match" in printed


@pytest.mark.parametrize("case,error,words", [
    ("top_k_0", ConfigError, ["--top-k must be >= 1"]),
    ("chunk_0", UserError, ["--chunk-size must be >= 1"]),
    ("empty_query", UserError, ["--query", "holds no readable image"]),
    ("no_query", UserError, ["--query", "missing.jpg", "does not exist"]),
    ("heic_query", UserError, ["photo.heic is a HEIC file", "does not read", "convert it"]),
    ("readme_query", UserError, ["README.txt line 1 ('These are hands.')",
                                 "is not the path of an image"]),
    ("other_model", UserError, ["another model", "extract_features.py"]),
    ("no_gallery", UserError, ["--gallery", "does not exist"]),
    ("not_features", UserError, ["not a features file"]),
    ("no_images", UserError, ["--images", "does not exist"]),
    ("features_exist", UserError, ["exists", "--overwrite"]),
])
def test_search_and_export_refuse_bad_input(own_overrides, own_root, exported, tmp_path, case,
                                            error, words):
    sets, work = own_overrides
    query = tmp_path / "missing.jpg" if case == "no_query" else next(own_root.rglob(ODD_NAME))
    if case == "heic_query":
        query = tmp_path / "photo.heic"
        query.write_bytes(b"\x00\x00\x00\x18ftypheic")
    if case == "readme_query":
        query = tmp_path / "README.txt"
        query.write_text("These are hands.\n")
    if case == "empty_query":
        query = tmp_path / "no_images"
        query.mkdir()
        (query / "notes.txt").write_text("no image here")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    out = ["--out", tmp_path / "out"]
    config = BASELINE_CONFIG if case == "other_model" else EVAL_CONFIG
    gallery = {"no_gallery": tmp_path / "nothing", "not_features": tmp_path / "junk.npz"}.get(
        case, work / "features.npz")
    if case == "features_exist":
        shutil.copy(work / "features.npz", tmp_path / "f.npz")
    script, args = (extract_features, ["--images", tmp_path / "nothing", "--out",
                                       tmp_path / "f.npz"]) if case == "no_images" else (
        extract_features, ["--images", own_root, "--out", tmp_path / "f.npz"]
    ) if case == "features_exist" else (
        search, ["--gallery", gallery, "--query", query, *out,
                 *(["--top-k", "0"] if case == "top_k_0" else []),
                 *(["--chunk-size", "0"] if case == "chunk_0" else [])])
    with pytest.raises(error) as caught:
        script.main([str(a) for a in ["--config", config, *sets, *args]])
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert not (tmp_path / "out").exists()
    if case == "features_exist":  # left as it was
        assert (tmp_path / "f.npz").read_bytes() == (work / "features.npz").read_bytes()
    else:
        assert not (tmp_path / "f.npz").exists()


def test_onnx_export_matches_torch_and_the_exported_features(own_overrides, exported, capsys):
    import onnxruntime

    sets, work = own_overrides
    printed = run_main(export_onnx, capsys, "--config", EVAL_CONFIG, *sets,
                       "--out", work / "model.onnx")
    difference = float(printed.split("max |difference| = ")[1].split()[0])
    assert difference <= 1e-4
    data, _ = exported
    session = onnxruntime.InferenceSession(str(work / "model.onnx"),
                                           providers=["CPUExecutionProvider"])
    side = session.get_inputs()[0].shape[2]
    paths = data["paths"][:5].tolist()
    images = torch.stack([decode_image(p, side, draft=True) for p in paths]).float() / 255
    features = session.run(["features"], {"images": images.numpy()})[0]
    np.testing.assert_allclose(features, data["features"][:5], atol=1e-5)
