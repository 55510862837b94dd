"""prepare_11k.py and prepare_hd.py through their command lines: the protocol's invariants on
synthetic data, seeding, re-runs, image modes, damaged downloads, bad input, and the published
11k counts on the real HandInfo.csv (when HANDS11K_INFO_CSV names one)."""
import csv
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from PIL import Image

from handreid.core.schema import ASPECTS
from conftest import run_script

PREPARE = {"11k": "datasets/prepare_11k.py", "hd": "datasets/prepare_hd.py"}
HD_FOLDERS = ("Original Images/1-501", "Original Images/502-712")
CSV_HEADER = ("id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,"
              "irregularities")
ASPECT_OF_HAND = {"dorsal_r": "dorsal right", "dorsal_l": "dorsal left",
                  "palmar_r": "palmar right", "palmar_l": "palmar left"}


def split_folders(out, dataset):
    if dataset == "hd":
        return [out / "train_val_test_split"]
    return [out / f"train_val_test_split_{aspect}" for aspect in ASPECTS]


def read_tree(folder):
    """{split: {identity: sorted file names}} as on disk."""
    return {split.name: {ident.name: sorted(f.name for f in ident.iterdir())
                         for ident in split.iterdir()}
            for split in folder.iterdir() if split.is_dir()}


def entries(splits, name):
    return {(identity, source) for identity, files in splits[name].items() for source in files}


def check_protocol(folder, num_splits):
    """Assert the invariants shared by both datasets; return the folder's splits.json."""
    manifest = json.loads((folder / "splits.json").read_text())
    splits = manifest["splits"]
    assert read_tree(folder) == {
        split: {ident: sorted(Path(s).name for s in files) for ident, files in ids.items()}
        for split, ids in splits.items()}
    assert manifest["counts"] == {
        split: {"identities": len(ids), "images": sum(map(len, ids.values()))}
        for split, ids in splits.items()}
    assert manifest["num_splits"] == num_splits and f"query{num_splits}" not in splits
    train, test = set(splits["train_all"]), set(splits["test"])
    assert train and test and not train & test
    assert set(splits["train"]) == set(splits["val"]) == train
    assert all(len(files) == 1 for files in splits["val"].values())
    assert entries(splits, "train") | entries(splits, "val") == entries(splits, "train_all")
    assert not entries(splits, "train") & entries(splits, "val")
    for i in range(num_splits):
        own = {ident: files for ident, files in splits[f"gallery{i}"].items() if ident in test}
        assert set(own) == test and all(len(files) == 1 for files in own.values())
        own_entries = {(ident, files[0]) for ident, files in own.items()}
        assert own_entries | entries(splits, f"query{i}") == entries(splits, "test")
        assert not own_entries & entries(splits, f"query{i}")
    return manifest


def raw_snapshot(raw):
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size) for p in raw.rglob("*")}


def inode(path):
    stat = os.stat(os.path.realpath(path))
    return stat.st_dev, stat.st_ino


def tiny_jpeg(seed=0, size=(16, 12)):
    buffer = io.BytesIO()
    Image.new("RGB", size, (seed * 37 % 256, seed * 91 % 256, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


def make_raw_11k(raw, per_identity=3):
    """A tiny raw 11k: per aspect 3 train ids (below every threshold) and 3 test ids (above),
    `per_identity` images each, plus one accessories=1 image the protocol must leave out."""
    (raw / "Hands").mkdir(parents=True)
    rows, number = [CSV_HEADER], 0
    for aspect in ASPECTS:
        for identity, accessories in [(i, 0) for i in ("0000100", "0000101", "0000102",
                                                       "0002000", "0002001", "0002002")
                                      for _ in range(per_identity)] + [("0000100", 1)]:
            number += 1
            name = f"Hand_{number:07d}.jpg"
            (raw / "Hands" / name).write_bytes(tiny_jpeg(number))
            rows.append(f'"{identity}",30,"male","fair",{accessories},0,'
                        f'"{ASPECT_OF_HAND[aspect]}","{name}",0')
    (raw / "HandInfo.csv").write_text("\n".join(rows) + "\n")
    return raw


def make_raw_hd(raw):
    """A tiny raw HD: ids 440..451 of 1-501 (4 train, 4 test) and 4 distractor subjects."""
    for folder, ids in zip(HD_FOLDERS, (range(444, 452), range(600, 604))):
        (raw / folder).mkdir(parents=True)
        for identity in ids:
            for n in (1, 2, 3):
                (raw / folder / f"{identity}_{n}.jpg").write_bytes(tiny_jpeg(identity * 3 + n))
    return raw


def hands_of(raw, aspect, identity):
    with open(raw / "HandInfo.csv", newline="") as handle:
        return [raw / "Hands" / row["imageName"] for row in csv.DictReader(handle)
                if row["id"] == identity and row["aspectOfHand"] == ASPECT_OF_HAND[aspect]
                and row["accessories"] == "0"]


# ------------------------------------------------------------------ protocol invariants
def test_11k_protocol_invariants(synthetic_11k_raw, prepared_11k):
    manifests = {aspect: check_protocol(folder, 3)
                 for aspect, folder in zip(ASPECTS, split_folders(prepared_11k, "11k"))}
    with open(synthetic_11k_raw / "HandInfo.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    for aspect, manifest in manifests.items():
        splits, threshold = manifest["splits"], manifest["protocol"]["train_max_id"][aspect]
        assert max(map(int, splits["train_all"])) <= threshold < min(map(int, splits["test"]))
        kept = {(row["id"].strip(), "Hands/" + row["imageName"]) for row in rows
                if row["aspectOfHand"] == ASPECT_OF_HAND[aspect] and row["accessories"] == "0"}
        assert entries(splits, "train_all") | entries(splits, "test") == kept
        assert set(splits["gallery0"]) == set(splits["test"])  # no distractors here
        for i in range(3):
            union = {ident if other == aspect else f"{other}__{ident}": files
                     for other in ASPECTS
                     for ident, files in manifests[other]["splits"][f"gallery{i}"].items()}
            assert len(union) == sum(len(manifests[o]["splits"][f"gallery{i}"]) for o in ASPECTS)
            assert splits[f"gallery{i}_all"] == union
    # A distractor entry is the very image of the other aspect's gallery (one inode).
    other = manifests["dorsal_l"]["splits"]["gallery0"]
    identity, (source,) = sorted(other.items())[0]
    folder = split_folders(prepared_11k, "11k")
    assert inode(folder[0] / "gallery0_all" / f"dorsal_l__{identity}" / Path(source).name) == \
        inode(folder[1] / "gallery0" / identity / Path(source).name) == \
        inode(synthetic_11k_raw / source)


def test_hd_protocol_invariants(synthetic_hd_raw, prepared_hd):
    manifest = check_protocol(prepared_hd / "train_val_test_split", 3)
    splits = manifest["splits"]
    assert max(map(int, splits["train_all"])) <= 447 < min(map(int, splits["test"]))
    subjects = {p.name for p in (synthetic_hd_raw / HD_FOLDERS[0]).iterdir()}
    assert {Path(source).name for _, source in entries(splits, "train_all")
            | entries(splits, "test")} == subjects
    distractors = {(f"distractor__{p.name.split('_')[0]}", f"{HD_FOLDERS[1]}/{p.name}")
                   for p in (synthetic_hd_raw / HD_FOLDERS[1]).iterdir()}
    assert distractors
    for i in range(3):
        extra = {(ident, source) for ident, source in entries(splits, f"gallery{i}")
                 if ident not in splits["test"]}
        assert extra == distractors
    assert not any(name.startswith("gallery") and name.endswith("_all") for name in splits)


# ------------------------------------------------------------------ seeding and re-runs
@pytest.mark.parametrize("dataset", ["11k", "hd"])
def test_same_seed_identical_other_seed_different(dataset, synthetic_11k_raw, synthetic_hd_raw,
                                                  tmp_path):
    raw = synthetic_11k_raw if dataset == "11k" else synthetic_hd_raw
    for out, seed in (("a", 0), ("b", 0), ("c", 1)):
        run_script(PREPARE[dataset], "--raw", raw, "--out", tmp_path / out, "--seed", seed,
                   "--num-splits", 2)
    for a, b, c in zip(*(split_folders(tmp_path / out, dataset) for out in "abc")):
        assert read_tree(a) == read_tree(b)
        assert (a / "splits.json").read_bytes() == (b / "splits.json").read_bytes()
        first, other = (json.loads((f / "splits.json").read_text())["splits"] for f in (a, c))
        assert first["train_all"] == other["train_all"] and first["test"] == other["test"]
        assert first["val"] != other["val"] and first["gallery0"] != other["gallery0"]


def test_rerun_is_noop_other_request_refused_overwrite_rebuilds(synthetic_hd_raw, tmp_path):
    out = tmp_path / "out"
    args = ("--raw", synthetic_hd_raw, "--out", out, "--num-splits", 2)
    run_script(PREPARE["hd"], *args)
    folder = out / "train_val_test_split"
    before = (inode(folder), (folder / "splits.json").read_bytes())

    again = run_script(PREPARE["hd"], *args)
    assert "up to date" in again.stdout and "gallery0" in again.stdout
    for change, named in ((("--num-splits", 2, "--seed", 1), "seed=0"),
                          (("--num-splits", 2, "--copy"), "images='link'"),
                          (("--num-splits", 3), "num_splits=2")):
        refused = run_script(PREPARE["hd"], *args[:4], *change, check=False)
        assert refused.returncode == 1 and "Traceback" not in refused.stderr
        assert named in refused.stderr and "--overwrite" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert (inode(folder), (folder / "splits.json").read_bytes()) == before

    run_script(PREPARE["hd"], *args, "--seed", 1, "--overwrite")
    assert json.loads((folder / "splits.json").read_text())["seed"] == 1
    assert [p.name for p in out.iterdir()] == ["train_val_test_split"]  # no temp folders left


def test_11k_rebuilds_only_a_missing_aspect_identically(synthetic_11k_raw, prepared_11k,
                                                         tmp_path):
    out = tmp_path / "out"
    shutil.copytree(prepared_11k, out, copy_function=os.link)
    folders = split_folders(out, "11k")
    reference = read_tree(folders[2]), (folders[2] / "splits.json").read_text()
    shutil.rmtree(folders[2])
    kept = [inode(f) for f in folders if f != folders[2]]
    run_script(PREPARE["11k"], "--raw", synthetic_11k_raw, "--out", out, "--num-splits", 3)
    assert [inode(f) for f in folders if f != folders[2]] == kept
    assert (read_tree(folders[2]), (folders[2] / "splits.json").read_text()) == reference


def test_existing_folder_without_manifest_is_refused(synthetic_hd_raw, tmp_path):
    (tmp_path / "train_val_test_split" / "train").mkdir(parents=True)
    proc = run_script(PREPARE["hd"], "--raw", synthetic_hd_raw, "--out", tmp_path, check=False)
    assert proc.returncode == 1 and "holds no splits.json" in proc.stderr


# ------------------------------------------------------------------ links and copies
@pytest.mark.parametrize("mode", [(), ("--copy",), ("--max-side", 24)], ids=str)
def test_each_source_image_is_one_inode(mode, synthetic_hd_raw, tmp_path):
    before = raw_snapshot(synthetic_hd_raw)
    out = tmp_path / "out"
    run_script(PREPARE["hd"], "--raw", synthetic_hd_raw, "--out", out, "--num-splits", 3, *mode)
    assert raw_snapshot(synthetic_hd_raw) == before  # the raw folder is never modified
    folder = out / "train_val_test_split"
    splits = json.loads((folder / "splits.json").read_text())["splits"]
    inodes = {}
    for split, ids in splits.items():
        for identity, files in ids.items():
            for source in files:
                inodes.setdefault(source, set()).add(
                    inode(folder / split / identity / Path(source).name))
    assert all(len(found) == 1 for found in inodes.values())
    assert len({next(iter(found)) for found in inodes.values()}) == len(inodes)
    source = sorted(inodes)[0]
    shared = next(iter(inodes[source]))
    assert (shared == inode(synthetic_hd_raw / source)) == (mode == ())
    if mode:
        copy = out / "_images" / ("copy" if mode == ("--copy",) else "max_side_24") / source
        assert inode(copy) == shared
    if mode == ("--copy",):
        assert copy.read_bytes() == (synthetic_hd_raw / source).read_bytes()
    if mode and mode[0] == "--max-side":
        with Image.open(copy) as image:
            assert max(image.size) == 24 and image.size == (24, 18)  # 160x120 kept at 4:3


def test_links_across_file_systems_are_symlinks(tmp_path):
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs /dev/shm on another file system than the temp folder")
    raw_parent = Path(tempfile.mkdtemp(dir=shm))
    try:
        raw = make_raw_hd(raw_parent / "raw")
        run_script(PREPARE["hd"], "--raw", raw, "--out", tmp_path, "--num-splits", 1)
        entry = next((tmp_path / "train_val_test_split" / "gallery0" / "448").iterdir())
        assert entry.is_symlink()
        assert inode(entry) == inode(raw / HD_FOLDERS[0] / entry.name)
    finally:
        shutil.rmtree(raw_parent)


def test_default_out_is_the_raw_folder(tmp_path):
    raw = make_raw_11k(tmp_path / "raw", per_identity=2)
    run_script(PREPARE["11k"], "--raw", raw, "--num-splits", 1)
    assert all((f / "splits.json").is_file() for f in split_folders(raw, "11k"))


# ------------------------------------------------------------------ damaged downloads
def test_11k_partial_download_and_corrupt_files(tmp_path):
    raw = make_raw_11k(tmp_path / "raw")
    lonely_train = hands_of(raw, "dorsal_r", "0000100")
    for path in lonely_train[1:]:
        path.unlink()
    corrupt_test = hands_of(raw, "dorsal_r", "0002000")
    for path in corrupt_test[1:]:
        path.write_bytes(b"this is not a jpeg")
    truncated = hands_of(raw, "dorsal_l", "0000101")[0]
    truncated.write_bytes(truncated.read_bytes()[:200])
    proc = run_script(PREPARE["11k"], "--raw", raw, "--out", tmp_path / "out",
                      "--num-splits", 2)
    assert "skipped 5 missing or unreadable images" in proc.stderr
    assert lonely_train[1].name in proc.stderr and "not an image" in proc.stderr
    assert "0000100, 0002000" in proc.stderr  # dorsal_r identities left with one image

    manifests = [check_protocol(f, 2) for f in split_folders(tmp_path / "out", "11k")]
    dorsal_r, dorsal_l = manifests[0], manifests[1]
    assert dorsal_r["skipped"]["identities_with_too_few_images"] == ["0000100", "0002000"]
    assert sorted(dorsal_r["skipped"]["unusable_images"]) == sorted(
        f"Hands/{p.name}" for p in lonely_train[1:] + corrupt_test[1:])
    assert list(dorsal_l["skipped"]["unusable_images"]) == [f"Hands/{truncated.name}"]
    assert "0000100" not in dorsal_r["splits"]["train_all"]
    assert "0002000" not in dorsal_r["splits"]["test"]
    assert "dorsal_r__0002000" not in dorsal_l["splits"]["gallery0_all"]
    assert len(dorsal_l["splits"]["train_all"]["0000101"]) == 2
    assert dorsal_r["counts"]["train_all"] == {"identities": 2, "images": 6}


def test_completed_download_is_not_taken_for_up_to_date(tmp_path):
    raw = make_raw_11k(tmp_path / "raw")
    missing = hands_of(raw, "dorsal_r", "0000100")[1]
    kept = missing.read_bytes()
    missing.unlink()
    args = ("--raw", raw, "--out", tmp_path / "out", "--num-splits", 2)
    run_script(PREPARE["11k"], *args)
    missing.write_bytes(kept)  # the rest of the download arrives
    refused = run_script(PREPARE["11k"], *args, check=False)
    assert refused.returncode == 1 and "other raw files" in refused.stderr
    assert "--overwrite" in refused.stderr
    run_script(PREPARE["11k"], *args, "--overwrite")
    manifest = check_protocol(tmp_path / "out/train_val_test_split_dorsal_r", 2)
    assert not manifest["skipped"]["unusable_images"]
    assert "up to date" in run_script(PREPARE["11k"], *args).stdout


def test_hd_partial_download_and_corrupt_files(tmp_path):
    raw = make_raw_hd(tmp_path / "raw")
    subjects, distractors = (raw / folder for folder in HD_FOLDERS)
    (subjects / "450_2.jpg").unlink()
    (subjects / "450_3.jpg").write_bytes(b"")
    (distractors / "601_1.jpg").write_bytes(b"\x00" * 64)
    (subjects / "scan.jpg").write_bytes(tiny_jpeg())
    (subjects / "ReadMe.txt").write_text("not an image, ignored")
    proc = run_script(PREPARE["hd"], "--raw", raw, "--out", tmp_path / "out", "--num-splits", 2)
    assert "skipped 1 images not named <id>_<n>: Original Images/1-501/scan.jpg" in proc.stderr
    assert "skipped 2 missing or unreadable images" in proc.stderr
    manifest = check_protocol(tmp_path / "out" / "train_val_test_split", 2)
    splits = manifest["splits"]
    assert manifest["skipped"]["identities_with_too_few_images"] == ["450"]
    assert sorted(splits["test"]) == ["448", "449", "451"]
    assert splits["gallery1"]["distractor__601"] == [f"{HD_FOLDERS[1]}/601_{n}.jpg"
                                                     for n in (2, 3)]


# ------------------------------------------------------------------ bad input
def test_csv_missing_columns_are_named(tmp_path):
    raw = make_raw_11k(tmp_path / "raw")
    with open(raw / "HandInfo.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    keep = [k for k, name in enumerate(rows[0]) if name not in ("aspectOfHand", "accessories")]
    (raw / "HandInfo.csv").write_text("\n".join(",".join(r[k] for k in keep) for r in rows))
    proc = run_script(PREPARE["11k"], "--raw", raw, "--out", tmp_path / "out", check=False)
    assert proc.returncode == 1 and "accessories, aspectOfHand" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dataset,damage,message", [
    ("11k", None, "datasets/11khands/HandInfo.csv not found: download"),
    ("11k", "Hands", "Hands not found: download Hands.zip"),
    ("11k", "Hands/*", "no train identity has 2 or more readable images"),
    ("hd", None, "datasets/HD/Original Images/1-501 not found: download"),
    ("hd", HD_FOLDERS[1], "502-712 not found"),
])
def test_missing_raw_data_is_a_one_line_error(dataset, damage, message, tmp_path):
    args = ()
    if damage:
        raw = make_raw_11k(tmp_path / "raw") if dataset == "11k" else make_raw_hd(tmp_path / "raw")
        for path in raw.glob(damage):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        args = ("--raw", raw, "--out", tmp_path / "out")
    proc = run_script(PREPARE[dataset], *args, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error:")
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args", [("--num-splits", 0), ("--copy", "--max-side", 64),
                                  ("--max-side", 0), ("--seed", "x"), ("--bogus",)], ids=str)
def test_bad_arguments_exit_2(args, tmp_path):
    proc = run_script(PREPARE["11k"], "--raw", tmp_path, *args, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


# ------------------------------------------------------------------ the real HandInfo.csv
PUBLISHED = {  # DESIGN.md: train IDs, train imgs, val, test IDs, test imgs, query, gallery, all
    "dorsal_r": (72, 890, 72, 71, 1042, 971, 71, 290),
    "dorsal_l": (73, 735, 73, 73, 1061, 988, 73, 290),
    "palmar_r": (72, 905, 72, 71, 988, 917, 71, 290),
    "palmar_l": (76, 928, 76, 75, 1023, 948, 75, 290),
}


@pytest.mark.skipif(not os.environ.get("HANDS11K_INFO_CSV"),
                    reason="HANDS11K_INFO_CSV does not name a real HandInfo.csv")
def test_real_handinfo_gives_the_published_counts(tmp_path):
    real = Path(os.environ["HANDS11K_INFO_CSV"])
    raw = tmp_path / "raw"
    (raw / "Hands").mkdir(parents=True)
    shutil.copy(real, raw / "HandInfo.csv")
    jpeg = tiny_jpeg()  # the images are not needed to count: one tiny JPEG under every name
    with open(real, newline="") as handle:
        for row in csv.DictReader(handle):
            (raw / "Hands" / row["imageName"].strip()).write_bytes(jpeg)
    run_script(PREPARE["11k"], "--raw", raw, "--out", tmp_path / "out", "--num-splits", 2)
    for aspect, folder in zip(ASPECTS, split_folders(tmp_path / "out", "11k")):
        manifest = json.loads((folder / "splits.json").read_text())
        assert not any(manifest["skipped"].values())
        for i in range(2):
            c = manifest["counts"]
            got = (c["train"]["identities"], c["train"]["images"], c["val"]["images"],
                   c["test"]["identities"], c["test"]["images"], c[f"query{i}"]["images"],
                   c[f"gallery{i}"]["images"], c[f"gallery{i}_all"]["images"])
            assert got == PUBLISHED[aspect], aspect
