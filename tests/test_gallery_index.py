"""The persistent gallery index: experiments/index_gallery.py builds it, updates encode only
what is new or changed (counted at the encoder), removed files leave, a corrupt image is named
and skipped, another model's index is refused; faiss flat equals the exact search; search.py
--index ranks as search.py --gallery does."""
import csv
import os
import shutil

import numpy as np
import pytest

from handreid.evaluation import encoder
from handreid.search import gallery_index
from conftest import ROOT
from handreid.core.errors import ConfigError, UserError
from experiments import index_gallery, search

CONFIG = ROOT / "configs/demo/eval_baseline_tiny_11k_dorsal_r.yml"
OLD_NS = 1_600_000_000 * 10 ** 9  # a 2020 mtime: older than any scan, so stats are trusted


@pytest.fixture
def gallery(synthetic_11k_raw, tmp_path):
    """3 identities x 2 images, with old mtimes; spare images to add later."""
    hands = sorted((synthetic_11k_raw / "Hands").glob("*.jpg"))
    root = tmp_path / "gallery"
    for n, source in enumerate(hands[:6]):
        (root / f"id{n % 3}").mkdir(parents=True, exist_ok=True)
        shutil.copy(source, root / f"id{n % 3}" / source.name)
        os.utime(root / f"id{n % 3}" / source.name, ns=(OLD_NS, OLD_NS))
    return root, hands[6:]


@pytest.fixture
def encoded(monkeypatch):
    """The paths each Encoder.encode call received."""
    calls, encode = [], encoder.Encoder.encode

    def counting(self, paths):
        calls.append(list(paths))
        return encode(self, paths)
    monkeypatch.setattr(encoder.Encoder, "encode", counting)
    return calls


def run_index(capsys, *args):
    index_gallery.main([str(a) for a in ["--config", CONFIG, *args]])
    return capsys.readouterr()


def test_updates_encode_only_new_or_changed_files(gallery, encoded, tmp_path, capsys):
    root, spare = gallery
    index_path = tmp_path / "gallery.npz"
    run_index(capsys, "--gallery", root, "--index", index_path)
    first = gallery_index.load_index(index_path)
    assert len(encoded) == 1 and len(encoded[0]) == 6 and first.identities[:2] == ["id0"] * 2
    assert first.description["feature"]["flip"] == "sum" and first.stats.shape == (6, 3)

    added = root / "id1" / spare[0].name  # one image added: only it is read and encoded
    shutil.copy(spare[0], added)
    copy = root / "id2" / "copy.jpg"  # a copy of an indexed image: hashed, not encoded
    shutil.copy(first.paths[0], copy)
    out = run_index(capsys, "--index", index_path).out
    assert encoded[1] == [str(added)] and "1 encoded (1 new, 0 changed)" in out
    assert "2 hashed" in out  # the unchanged files were recognised by their stat alone
    second = gallery_index.load_index(index_path)
    np.testing.assert_array_equal(second.features[[second.paths.index(p) for p in first.paths]],
                                  first.features)
    np.testing.assert_array_equal(second.features[second.paths.index(str(copy))],
                                  first.features[0])

    # replaced: same name, same mtime, new content (a new inode) -> noticed and re-encoded;
    # touched: new mtime, same content -> hashed, not encoded; removed -> dropped
    replaced, (touched, removed) = sorted((root / "id2").glob("Hand*"))[0], sorted(
        (root / "id0").iterdir())
    (tmp_path / "new.jpg").write_bytes(spare[1].read_bytes())
    os.utime(tmp_path / "new.jpg", ns=(OLD_NS, OLD_NS))
    os.replace(tmp_path / "new.jpg", replaced)
    os.utime(touched)
    removed.unlink()
    out = run_index(capsys, "--index", index_path).out
    assert encoded[2] == [str(replaced)] and "1 encoded (0 new, 1 changed), 1 removed" in out
    third = gallery_index.load_index(index_path)
    assert str(removed) not in third.paths and len(third.paths) == 7
    row = third.paths.index(str(replaced))
    assert not np.allclose(third.features[row], first.features[first.paths.index(str(replaced))])

    # a corrupt image: named on stderr and skipped; the good new image is indexed
    (root / "id0" / "broken.jpg").write_bytes(spare[2].read_bytes()[:300])
    shutil.copy(spare[3], root / "id0" / spare[3].name)
    printed = run_index(capsys, "--index", index_path)
    assert "broken.jpg" in printed.err and "skipped 1" in printed.err
    assert encoded[3] == [str(root / "id0" / spare[3].name)]
    fourth = gallery_index.load_index(index_path)
    assert len(fourth.paths) == 8 and not any("broken" in p for p in fourth.paths)


def test_faiss_flat_equals_the_exact_search_and_approximate_recall_is_measured(capsys):
    rng = np.random.default_rng(0)
    features = rng.standard_normal((3000, 32)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    index = gallery_index.GalleryIndex(
        features=features, paths=[str(n) for n in range(3000)], identities=[""] * 3000,
        stats=np.zeros((3000, 3), dtype=np.int64), digests=[""] * 3000,
        description={}, gallery="", scanned_ns=0)
    query = rng.standard_normal((50, 32)).astype(np.float32)
    exact_scores, exact_order = index.search(query, 20, 700)
    flat = gallery_index.with_faiss(index, gallery_index.faiss_settings("flat", 3000), 700)
    scores, order = flat.search(query, 20, 700)
    np.testing.assert_array_equal(order, exact_order)  # random features: no ties
    np.testing.assert_allclose(scores, exact_scores, rtol=0, atol=1e-5)
    assert flat.faiss["recall"] == {"k": 10, "queries": 1000, "value": 1.0}
    for kind in ("ivf", "hnsw"):
        served = gallery_index.with_faiss(index, gallery_index.faiss_settings(kind, 3000), 700)
        recall = served.faiss["recall"]
        assert 0.05 < recall["value"] <= 1 and f"recall@10 against exact search " \
            f"{recall['value']:.4f}" in capsys.readouterr().out
        assert served.search(query, 20, 700)[1].min() >= 0
    assert gallery_index.faiss_settings("ivf", 3000) == {"kind": "ivf", "nlist": 55, "nprobe": 8}


def test_search_with_the_index_ranks_as_search_of_the_folder(gallery, tmp_path, capsys):
    root, _ = gallery
    index_path = tmp_path / "gallery.npz"
    printed = run_index(capsys, "--gallery", root, "--index", index_path, "--faiss", "flat").out
    assert "faiss flat: recall@5 against exact search 1.0000" in printed
    assert gallery_index.load_index(index_path).faiss["recall"]["value"] == 1.0
    rows = {}
    for source in (["--index", index_path], ["--gallery", root]):
        out = tmp_path / source[0].strip("-")
        search.main([str(a) for a in ["--config", CONFIG, *source, "--query", root / "id1",
                                      "--top-k", "4", "--out", out]])
        with (out / "search.csv").open() as handle:
            rows[source[0]] = list(csv.DictReader(handle))
    assert "from the index" in capsys.readouterr().out
    assert [r["gallery"] for r in rows["--index"]] == [r["gallery"] for r in rows["--gallery"]]
    np.testing.assert_allclose([float(r["score"]) for r in rows["--index"]],
                               [float(r["score"]) for r in rows["--gallery"]], atol=2e-6)


@pytest.mark.parametrize("case, error, words", [
    ("other_model", UserError, ["another model", "fingerprint", "--rebuild", "--index"]),
    ("other_folder", UserError, ["not", "--rebuild"]),
    ("not_an_index", UserError, ["not a gallery index", "--rebuild"]),
    ("chunk_0", UserError, ["--chunk-size", ">= 1"]),
    ("nprobe_alone", UserError, ["--nprobe", "--faiss ivf"]),
    ("empty_query", UserError, ["--query", "no readable image"]),
    ("search_other_model", UserError, ["another model", "index_gallery.py"]),
    ("search_both", ConfigError, ["--gallery", "--index"]),
])
def test_bad_input_is_one_line_and_leaves_the_index_as_it_was(gallery, tmp_path, case, error,
                                                               words, capsys):
    root, _ = gallery
    index_path = tmp_path / "gallery.npz"
    run_index(capsys, "--gallery", root, "--index", index_path)
    if case == "not_an_index":
        index_path.write_bytes(b"not a zip")
    before = index_path.read_bytes()
    (tmp_path / "empty").mkdir()
    script, args = index_gallery, ["--index", index_path]
    args += {"other_model": ["--set", "seed=1"], "other_folder": ["--gallery", tmp_path],
             "chunk_0": ["--chunk-size", "0"], "nprobe_alone": ["--nprobe", "4"]}.get(case, [])
    if case.startswith("search") or case == "empty_query":
        script = search
        args += ["--query", tmp_path / "empty" if case == "empty_query" else root / "id0",
                 "--out", tmp_path / "out"]
        args += {"search_other_model": ["--set", "seed=1"],
                 "search_both": ["--gallery", root]}.get(case, [])
    with pytest.raises(error) as caught:
        script.main([str(a) for a in ["--config", CONFIG, *args]])
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert index_path.read_bytes() == before and not (tmp_path / "out").exists()


def test_an_update_rebuilds_the_faiss_structure_it_keeps(gallery, tmp_path, capsys):
    root, spare = gallery
    index_path = tmp_path / "gallery.npz"
    run_index(capsys, "--gallery", root, "--index", index_path, "--faiss", "hnsw",
              "--hnsw-m", "4")
    shutil.copy(next(root.rglob("*.jpg")), root / "id1" / "copy.jpg")  # no encoding needed
    printed = run_index(capsys, "--index", index_path).out
    assert "0 encoded" in printed and "recall@6 against exact search" in printed
    index = gallery_index.load_index(index_path)
    assert index.faiss["kind"] == "hnsw" and index.faiss["hnsw_m"] == 4
    row = index.paths.index(str(root / "id1" / "copy.jpg"))
    assert row in index.search(index.features[[row]], 2, 100)[1][0]  # the new row is served
