"""What the code wrote before the package layout (tests/fixtures/main_0665f21: a CLIP-HandID
checkpoint, its calibration, a features file and a gallery index) still loads and gives the
same numbers with today's code."""
import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_script

pytestmark = pytest.mark.slow  # end to end (make test-slow)
FIXTURES = ROOT / "tests/fixtures/main_0665f21"
EVAL_CONFIG = ROOT / "configs/demo/eval_clip_handid_tiny_11k_dorsal_r.yml"


@pytest.fixture
def earlier_checkpoint(tmp_path):
    """The earlier checkpoint with its calibration file beside it, in a fresh folder."""
    for name in ("clip_handid.pth", "clip_handid.calibration.npz"):
        shutil.copy(FIXTURES / name, tmp_path / name)
    return tmp_path / "clip_handid.pth"


def config_args(checkpoint, prepared_11k):
    return ["--config", EVAL_CONFIG, "--set", f"save_path={checkpoint}",
            "--set", f"data_dir={prepared_11k}"]


def by_image(npz):
    """{identity folder/file name: feature row} of a features file (paths are absolute)."""
    return {"/".join(Path(str(p)).parts[-2:]): row for p, row in zip(npz["paths"],
                                                                      npz["features"])}


def test_an_earlier_checkpoint_evaluates(earlier_checkpoint, prepared_11k, tmp_path):
    results = tmp_path / "results"
    run_script("experiments/run_eval_clip.py", *config_args(earlier_checkpoint, prepared_11k),
               "--set", f"results_dir={results}", "--set", "num_splits=1",
               "--set", "plots=false")
    report = json.loads(next(results.glob("*.json")).read_text())
    assert report["checkpoint"]["epoch"] == 2 and report["checkpoint"]["method"] == "clip_handid"


def test_today_s_code_extracts_the_earlier_features(earlier_checkpoint, prepared_11k, tmp_path):
    gallery = prepared_11k / "train_val_test_split_dorsal_r/gallery0"
    run_script("experiments/extract_features.py", *config_args(earlier_checkpoint, prepared_11k),
               "--images", gallery, "--out", tmp_path / "now.npz")
    earlier = by_image(np.load(FIXTURES / "features.npz", allow_pickle=False))
    now = by_image(np.load(tmp_path / "now.npz", allow_pickle=False))
    assert sorted(now) == sorted(earlier) and len(now) == 11
    for name in earlier:
        np.testing.assert_allclose(now[name], earlier[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("flag, gallery", [("--gallery", "features.npz"),
                                           ("--index", "gallery_index.npz")])
def test_an_earlier_features_file_and_index_search_with_the_earlier_calibration(
        flag, gallery, earlier_checkpoint, prepared_11k, tmp_path):
    query = sorted((prepared_11k / "train_val_test_split_dorsal_r/query0").rglob("*.jpg"))[0]
    out = tmp_path / "search"
    proc = run_script("experiments/search.py", *config_args(earlier_checkpoint, prepared_11k),
                      flag, FIXTURES / gallery, "--query", query, "--top-k", "3", "--out", out)
    assert f"log10 LR from {earlier_checkpoint.with_suffix('.calibration.npz')}" in proc.stdout
    with open(out / "search.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    assert all(row["log10_lr"] not in ("", None) for row in rows)
