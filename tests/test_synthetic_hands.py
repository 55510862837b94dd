"""datasets/make_synthetic_hands.py through its command line: the exact raw 11k and HD formats,
ids on both sides of every protocol threshold, image files, determinism, re-runs, bad input."""
import csv
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import run_script

SCRIPT = "datasets/make_synthetic_hands.py"
SMALL = ("--subjects", "4", "--images-per-aspect", "2", "--width", "64", "--height", "48")
HEADER = b"id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities\r\n"
# One HandInfo.csv row as the real file writes it: quoted strings, bare numbers, CRLF.
ROW = re.compile(rb'"\d{7} ?",\d+,"(male|female)","(very fair|fair|medium|dark)",[01],[01],'
                 rb'"(dorsal|palmar) (right|left)","Hand_\d{7}\.jpg",[01]\r')
THRESHOLDS = {"dorsal right": 1050, "dorsal left": 1037, "palmar right": 1051,
              "palmar left": 1042}


def tree(folder):
    """{relative path: bytes} of every file under folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def read_csv(raw):
    with open(raw / "HandInfo.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def test_11k_csv_is_written_like_the_real_file(synthetic_11k_raw):
    data = (synthetic_11k_raw / "HandInfo.csv").read_bytes()
    assert data.startswith(HEADER)
    lines = data[len(HEADER):].split(b"\n")
    assert lines[-1] == b"" and all(ROW.fullmatch(line) for line in lines[:-1])
    real = os.environ.get("HANDS11K_INFO_CSV")
    if real and Path(real).is_file():  # the patterns above are the real file's
        real_lines = Path(real).read_bytes().split(b"\n")
        assert real_lines[0] + b"\n" == HEADER
        assert all(ROW.fullmatch(line) for line in real_lines[1:-1])
    rows = read_csv(synthetic_11k_raw)
    assert [row["id"] for row in rows if row["id"].endswith(" ")] == [rows[-1]["id"].strip() + " "]
    assert [row["imageName"] for row in rows] == [f"Hand_{n:07d}.jpg"
                                                  for n in range(1, len(rows) + 1)]


def test_11k_subjects_straddle_every_threshold(synthetic_11k_raw):
    rows = read_csv(synthetic_11k_raw)
    ids = {row["id"].strip() for row in rows}
    assert len(ids) == 24
    for aspect, threshold in THRESHOLDS.items():
        kept = [row for row in rows if row["aspectOfHand"] == aspect
                and row["accessories"] == "0"]
        per_id = {i: sum(row["id"].strip() == i for row in kept) for i in ids}
        assert set(per_id.values()) == {5}  # every subject, every aspect, 5 images
        train = sum(int(i) <= threshold for i in ids)
        assert 0.35 <= train / len(ids) <= 0.65
        assert str(threshold).zfill(7) in ids  # the boundary itself: id <= T is train
    accessories = [row for row in rows if row["accessories"] == "1"]
    assert accessories and {row["aspectOfHand"] for row in accessories} == set(THRESHOLDS)
    # traits of a person do not change from row to row
    for column in ("age", "gender", "skinColor", "nailPolish", "irregularities"):
        assert all(len({row[column] for row in rows if row["id"].strip() == i}) == 1
                   for i in ids)


def test_11k_images_match_the_csv(synthetic_11k_raw):
    rows = read_csv(synthetic_11k_raw)
    files = sorted(p.name for p in (synthetic_11k_raw / "Hands").iterdir())
    assert files == sorted(row["imageName"] for row in rows)
    for name in files:
        with Image.open(synthetic_11k_raw / "Hands" / name) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (160, 120))
    # every image is its own photo: no two files alike
    assert len({(synthetic_11k_raw / "Hands" / name).read_bytes() for name in files}) == len(files)


def test_hd_layout(synthetic_hd_raw):
    root = synthetic_hd_raw / "Original Images"
    assert sorted(p.name for p in synthetic_hd_raw.iterdir()) == ["Original Images",
                                                                  "synthetic.json"]
    assert sorted(p.name for p in root.iterdir()) == ["1-501", "502-712"]
    images = {}
    for folder in ("1-501", "502-712"):
        for path in (root / folder).iterdir():
            match = re.fullmatch(r"(\d+)_(\d+)\.jpg", path.name)
            assert match, path.name
            images.setdefault((folder, int(match[1])), []).append(int(match[2]))
            with Image.open(path) as image:
                assert (image.format, image.size) == ("JPEG", (160, 120))
    assert all(sorted(ns) == [1, 2, 3, 4, 5] for ns in images.values())
    subjects = [i for folder, i in images if folder == "1-501"]
    distractors = [i for folder, i in images if folder == "502-712"]
    assert len(subjects) == 24 and all(1 <= i <= 501 for i in subjects)
    assert {447, 448} <= set(subjects) and sum(i <= 447 for i in subjects) == 12
    assert len(distractors) == 6 and all(502 <= i <= 712 for i in distractors)


def test_same_seed_identical_bytes_other_seed_different(tmp_path):
    run_script(SCRIPT, "--out", tmp_path / "a", "--seed", "3", *SMALL)
    run_script(SCRIPT, "--out", tmp_path / "b", "--seed", "3", "--workers", "1", *SMALL)
    run_script(SCRIPT, "--out", tmp_path / "c", "--seed", "4", *SMALL)
    a, b, c = (tree(tmp_path / name) for name in "abc")
    assert a == b
    assert a["HandInfo.csv"] != c["HandInfo.csv"]
    images = lambda files: {v for k, v in files.items() if k.endswith(".jpg")}  # noqa: E731
    assert not images(a) & images(c)


def test_identity_is_in_the_hand_not_in_the_pixels(synthetic_11k_raw):
    """Same-person images are closer than different-person images (traits are stable), yet
    nearest neighbour on raw pixels is far from solving identification (nuisance is real)."""
    rows = [row for row in read_csv(synthetic_11k_raw)
            if row["aspectOfHand"] == "dorsal right" and row["accessories"] == "0"]
    labels = np.array([row["id"].strip() for row in rows])
    features = []
    for row in rows:
        with Image.open(synthetic_11k_raw / "Hands" / row["imageName"]) as image:
            pixels = np.asarray(image.convert("L").resize((64, 48)), float).ravel()
        pixels -= pixels.mean()
        features.append(pixels / np.linalg.norm(pixels))
    similarity = np.stack(features) @ np.stack(features).T
    same = labels[:, None] == labels[None, :]
    off_diagonal = ~np.eye(len(labels), dtype=bool)
    assert similarity[same & off_diagonal].mean() > similarity[~same].mean()
    np.fill_diagonal(similarity, -np.inf)
    rank1 = (labels[similarity.argmax(1)] == labels).mean()
    chance = (5 - 1) / (len(labels) - 1)  # another of the person's 5 images, by luck
    assert 3 * chance < rank1 < 0.7


def test_rerun_is_a_no_op_and_other_arguments_are_refused(tmp_path):
    out = tmp_path / "raw"
    run_script(SCRIPT, "--out", out, *SMALL)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = run_script(SCRIPT, "--out", out, *SMALL)
    assert "nothing to do" in again.stdout
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    other = run_script(SCRIPT, "--out", out, "--seed", "1", *SMALL, check=False)
    assert other.returncode == 1 and "--overwrite" in other.stderr
    run_script(SCRIPT, "--out", out, "--seed", "1", "--overwrite", *SMALL)
    assert json.loads((out / "synthetic.json").read_text())["settings"]["seed"] == 1

    (out / "train_val_test_split_dorsal_r").mkdir()  # e.g. prepared from the old images
    kept = run_script(SCRIPT, "--out", out, "--overwrite", *SMALL, check=False)
    assert kept.returncode == 1 and "train_val_test_split_dorsal_r" in kept.stderr


def test_interrupted_run_is_redone_and_foreign_folders_are_refused(tmp_path):
    out = tmp_path / "raw"
    run_script(SCRIPT, "--out", out, *SMALL)
    complete = tree(out)
    manifest = json.loads((out / "synthetic.json").read_text())
    (out / "synthetic.json").write_text(json.dumps({**manifest, "status": "writing"}))
    (out / "Hands" / "Hand_0000001.jpg").unlink()
    run_script(SCRIPT, "--out", out, *SMALL)
    assert tree(out) == complete

    foreign = tmp_path / "real11k"
    (foreign / "Hands").mkdir(parents=True)
    (foreign / "HandInfo.csv").write_text("id\n")
    refused = run_script(SCRIPT, "--out", foreign, "--overwrite", *SMALL, check=False)
    assert refused.returncode == 1 and "not made by this script" in refused.stderr
    assert (foreign / "HandInfo.csv").read_text() == "id\n"


@pytest.mark.parametrize("args, words", [
    (("--subjects", "3"), "--subjects"),
    (("--images-per-aspect", "1"), "--images-per-aspect"),
    (("--width", "8"), "--width"),
    (("--format", "hd", "--subjects", "600"), "--subjects"),
    (("--format", "12k"), "--format"),
    (("--subjects", "many"), "--subjects"),
    (("--workers", "0"), "--workers"),
])
def test_bad_arguments_exit_2_with_one_line(args, words, tmp_path):
    result = run_script(SCRIPT, "--out", tmp_path / "raw", *args, check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1
    assert words in result.stderr
    assert not (tmp_path / "raw").exists()


def test_missing_out_exits_2(tmp_path):
    result = run_script(SCRIPT, check=False)
    assert result.returncode == 2 and "--out" in result.stderr
