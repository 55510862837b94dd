"""evaluation.py (features, multi-split protocol, encode-once cache) and
experiments/run_eval_clip.py (baseline / finetuned runs, outputs, failure paths)."""
import csv
import json
import os

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from handreid.evaluation import protocol
from handreid.model import backbone
from handreid.data.loaders import eval_loader, list_split
from handreid.core.config_files import load_config
from handreid.core.errors import ConfigError, UserError
from handreid.evaluation.evaluate import evaluate_config
from handreid.methods.stage1 import Stage1
from conftest import run_script
from handreid.metrics.ranking import compute_reid_metrics, compute_verification_metrics, rerank_k_reciprocal

EVAL_SCRIPT = "experiments/run_eval_clip.py"


def tiny_model(config):
    torch.manual_seed(0)
    clip_model, classifier = backbone.build_model(config)
    return backbone.HandIdModel(clip_model, classifier)


def count_encoded(model):
    """Wrap model.features; the returned list grows by the batch size of every call."""
    calls, inner = [], model.features

    def features(images):
        calls.append(len(images))
        return inner(images)

    model.features = features
    return calls


def test_encodes_each_unique_image_once_whatever_num_splits(make_config):
    encoded, unique = {}, {}
    for splits in (1, 3):
        config = make_config(num_splits=splits)
        model = tiny_model(config)
        calls = count_encoded(model)
        report = protocol.evaluate(model, config, torch.device("cpu")).report
        # Prepared files keep their source file name: one name per source image.
        listed = [path for query, gallery in protocol.split_names(config)
                  for name in (query, gallery) for path, _ in list_split(config, name)]
        encoded[splits] = sum(calls)
        unique[splits] = len({os.path.basename(path) for path in listed})
        assert encoded[splits] == unique[splits] == report["counts"]["unique_images"] \
            == report["counts"]["images_encoded"]
        assert report["counts"]["images_listed"] == len(listed) >= unique[splits]
        assert report["num_splits"] == len(report["per_split"]) == splits
    assert unique[3] >= unique[1]
    assert report["counts"]["images_listed"] > unique[3]  # splits share images
    # 3 splits list 3x the images of one, but encode far fewer than 3x.
    assert encoded[3] < 2 * encoded[1]


def test_cached_split_metrics_equal_a_direct_evaluation(make_config):
    """Split 2 through the unique-image cache == encoding its own query and gallery lists."""
    config = make_config(num_splits=3, max_rank=5)
    model = tiny_model(config)
    device = torch.device("cpu")
    report = protocol.evaluate(model, config, device).report
    query, gallery = list_split(config, "query2"), list_split(config, "gallery2_all")
    query_features = protocol.extract_features(
        model, eval_loader(config, [p for p, _ in query]), device)
    gallery_features = protocol.extract_features(
        model, eval_loader(config, [p for p, _ in gallery]), device)
    similarity = query_features @ gallery_features.T
    query_ids, gallery_ids = [n for _, n in query], [n for _, n in gallery]
    direct = compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=5)
    direct.update(compute_verification_metrics(similarity, query_ids, gallery_ids))
    cached = report["per_split"][2]
    assert cached["query"] == "query2" and cached["gallery"] == "gallery2_all"
    for key in ("rank1", "rank5", "mAP", "mAP_trapezoid", "mINP", "num_valid_queries",
                "num_queries", "eer", "eer_threshold"):
        assert cached[key] == pytest.approx(direct[key], abs=1e-5), key
    assert cached["mAP_trapezoid"] < cached["mAP"]
    assert cached["tar_at_far_1e-2"] == pytest.approx(direct["tar_at_far"][1e-2], abs=1e-5)
    # Fewer impostor pairs than 1/FAR: n/a, and n/a in the mean.
    assert cached["num_impostor_pairs"] < 1e4 and cached["tar_at_far_1e-4"] is None
    assert report["mean"]["tar_at_far_1e-4"] is None
    assert len(cached["cmc"]) == 5


def test_distractor_galleries_are_ranked_by_identity_name(make_config, prepared_hd):
    """Gallery folders hold identities the queries lack (other aspects, HD 502-712); name
    labels keep every query valid, and `gallery: aspect` drops the distractors."""
    for config, gallery_name, distractor in [
            (make_config(num_splits=1), "gallery0_all", "__"),
            (make_config(num_splits=1, gallery="aspect"), "gallery0", None),
            (make_config(num_splits=1, dataset="hd", data_dir=str(prepared_hd)), "gallery0",
             "distractor__")]:
        _, splits, _ = protocol.collect_splits(config)
        split = splits[0]
        assert split.gallery == gallery_name
        extra = set(split.gallery_ids) - set(split.query_ids)
        assert set(split.query_ids) <= set(split.gallery_ids)
        assert bool(extra) == (distractor is not None)
        assert all(distractor in name for name in extra)
        row = protocol.evaluate(tiny_model(config), config, torch.device("cpu")) \
            .report["per_split"][0]
        assert row["num_valid_queries"] == row["num_queries"] == len(split.query_ids)
        assert row["num_gallery"] == len(split.gallery_ids)


def test_flip_rules(make_config):
    """sum: raw features of the image and its mirror summed, then L2 (the published rule);
    unit_mean: the two L2-normalised views averaged, then L2. The mirror's raw features are
    scaled x3 here, so the rules differ (on the tiny model the two norms are nearly equal)."""
    config = make_config()
    model = tiny_model(config)
    paths = [path for path, _ in list_split(config, "query0")][:10]
    loader = eval_loader(config, paths, batch_size=4)
    images = torch.cat([batch for batch, _ in loader])
    with torch.no_grad():
        raw, raw_mirror = model.features(images), 3 * model.features(images.flip(3))
    expected = {"sum": F.normalize(raw + raw_mirror, dim=1),
                "unit_mean": F.normalize(F.normalize(raw, dim=1)
                                         + F.normalize(raw_mirror, dim=1), dim=1)}
    assert not torch.allclose(expected["sum"], expected["unit_mean"], atol=1e-3)
    inner = model.features
    calls = []

    def features(batch):  # extract_features encodes each batch, then its mirror
        calls.append(len(batch))
        return inner(batch) * (3 if len(calls) % 2 == 0 else 1)

    model.features = features
    for rule, want in expected.items():
        calls.clear()
        flipped = protocol.extract_features(model, loader, torch.device("cpu"), flip=rule)
        assert sum(calls) == 2 * len(paths)
        assert torch.allclose(flipped, want, atol=1e-5), rule
    assert model.training  # extract_features restores the caller's mode
    with pytest.raises(UserError, match="flip must be one of off, sum, unit_mean"):
        protocol.extract_features(model, loader, torch.device("cpu"), flip="mean")


def test_old_flip_values_still_load():
    assert [load_config(None, [("flip", value)])["flip"] for value in (True, False)] == \
        ["unit_mean", "off"]
    assert load_config(None, ["flip=true"])["flip"] == "unit_mean"
    assert load_config(None, ["flip=sum"])["flip"] == "sum"


def test_open_set_needs_two_test_identities(make_config):
    config = make_config(num_splits=1, open_set=True)
    _, splits, _ = protocol.collect_splits(config)
    split = splits[0]
    one = [i for i, name in enumerate(split.query_ids) if name == split.query_ids[0]]
    lonely = protocol.Split(split.query, split.gallery, [split.query_paths[i] for i in one],
                              [split.query_ids[i] for i in one], split.query_rows[one],
                              split.gallery_paths, split.gallery_ids, split.gallery_rows)
    with pytest.raises(UserError, match="open_set needs at least 2 test identities per split, "
                                        "but query0 has 1; set open_set: false"):
        protocol.open_set_gallery(lonely, config, 0)
    keep = protocol.open_set_gallery(split, config, 0)
    assert keep == protocol.open_set_gallery(split, config, 0)  # seeded
    removed = set(split.gallery_ids) - {split.gallery_ids[j] for j in keep}
    identities = set(split.query_ids)
    assert removed <= identities and len(removed) == len(identities) // 2


def test_more_splits_than_prepared_is_a_clear_error(make_config):
    with pytest.raises(UserError, match="num_splits is 5 but .* has 3 prepared splits"):
        protocol.check_data(make_config(num_splits=5))


# ------------------------------------------------------------------ run_eval_clip.py

def eval_args(config_path, tmp_path, *overrides):
    return ["--config", str(config_path), "--set", f"results_dir={tmp_path / 'results'}",
            *overrides]


@pytest.fixture
def eval_config(make_config, tmp_path):
    """An eval config file on the synthetic data (tiny model, 2 splits) under tmp_path."""
    config = make_config()
    path = tmp_path / "eval_tiny.yml"
    path.write_text(f"name: tiny_eval\nmodel: tiny\ndata_dir: {config['data_dir']}\n"
                    f"save_path: {config['save_path']}\nnum_splits: 2\nnum_workers: 0\n"
                    f"plot_queries: 3\nmax_rank: 8\n")
    return path, config


def save_tiny_checkpoint(config, path, **changes):
    config = dict(config, **changes)
    names = sorted({name for _, name in list_split(config, "train")})
    torch.manual_seed(1)
    Stage1(config, backbone.build_model(config)[0], names).save_checkpoint(
        path, epoch=4, selection={"metric": "val_accuracy", "value": 0.625,
                                  "val_accuracy": 0.625})


def test_baseline_run_writes_results_and_keeps_earlier_ones(eval_config, tmp_path):
    from experiments import run_eval_clip

    path, _ = eval_config
    results = tmp_path / "results"
    run_eval_clip.main(eval_args(path, tmp_path, "--set", "variant=baseline"))
    first = json.loads((results / "tiny_eval_baseline.json").read_text())
    assert first["variant"] == "baseline" and first["checkpoint"] is None
    assert first["config"]["model"] == "tiny" and first["config"]["num_splits"] == 2
    assert [row["split"] for row in first["per_split"]] == [0, 1]
    assert set(first["mean"]) == set(first["std"]) == {
        "rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP", "cmc", "eer",
        "eer_threshold", "tar_at_far_1e-2", "tar_at_far_1e-3", "tar_at_far_1e-4"}
    assert first["flip"] == "off" and first["rerank"] is None and not first["open_set"]
    assert len(first["mean"]["cmc"]) == 8 and first["std_ddof"] == 1
    assert first["gallery"] == "gallery{i}_all" and first["ap_mode"] == "standard"
    assert first["counts"]["images_encoded"] == first["counts"]["unique_images"] > 0
    assert first["timings"]["total_seconds"] >= first["timings"]["encode_seconds"] > 0
    assert (results / "tiny_eval_baseline_cmc.png").stat().st_size > 1000
    assert (results / "tiny_eval_baseline_verification.png").stat().st_size > 1000
    # Ranking grid: 3 query rows of query + top-8 tiles (104 px with frame, 26 px captions);
    # the query frame is blue, every gallery frame green (same identity) or red.
    with Image.open(results / "tiny_eval_baseline_ranking.png") as grid:
        assert grid.size == (4 + 12 + 9 * 104 + 4, 4 + 3 * 130 + 4)
        for row in range(3):
            y = 4 + row * 130 + 1
            assert grid.getpixel((5, y)) == (0x1F, 0x5F, 0xBF)
            assert {grid.getpixel((4 + 12 + rank * 104 + 1, y)) for rank in range(1, 9)} <= \
                {(0x1A, 0x9E, 0x3A), (0xD6, 0x20, 0x20)}

    run_eval_clip.main(eval_args(path, tmp_path, "--set", "variant=baseline",
                                 "--set", "flip=true"))
    second = json.loads((results / "tiny_eval_baseline.json").read_text())
    assert second["flip"] == "unit_mean" and second["counts"]["images_encoded"] == \
        2 * second["counts"]["unique_images"]
    kept = [json.loads(p.read_text()) for p in results.glob("tiny_eval_baseline.*.json")]
    assert len(kept) == 1 and kept[0]["timestamp"] == first["timestamp"]
    assert kept[0]["flip"] == "off"
    with (results / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["flip"] for row in rows] == ["off", "unit_mean"]
    for key in ("rank1", "mAP", "mAP_trapezoid", "eer", "tar_at_far_1e-3"):
        assert float(rows[0][key]) == pytest.approx(first["mean"][key], abs=1e-3)
    assert rows[0]["tar_at_far_1e-4"] == "" and rows[0]["fnir_at_fpir_1e-1"] == ""


def test_open_set_and_reranked_run(eval_config, tmp_path, capsys):
    """open_set adds FNIR@FPIR; rerank changes the ranking metrics but not the verification
    metrics, which use the cosine scores."""
    from experiments import run_eval_clip

    path, _ = eval_config
    args = ("--set", "variant=baseline", "--set", "plots=false")
    plain = evaluate_config(load_config(path, [
        ("results_dir", str(tmp_path / "plain")), ("variant", "baseline"), ("plots", False)]))
    run_eval_clip.main(eval_args(path, tmp_path, *args, "--set", "open_set=true", "--set",
                                 "rerank=true", "--set", "rerank_k1=5", "--set", "rerank_k2=2"))
    output = capsys.readouterr().out
    assert "FNIR@FPIR=1e-1" in output and "re-ranked (k1 5, k2 2" in output
    result = json.loads((tmp_path / "results/tiny_eval_baseline.json").read_text())
    assert result["rerank"] == {"k1": 5, "k2": 2, "lambda": 0.3} and result["open_set"]
    for row, before in zip(result["per_split"], plain["per_split"]):
        assert row["eer"] == before["eer"] and row["num_mated"] + row["num_non_mated"] == \
            row["num_queries"] and row["num_non_mated"] > 0
        assert 0 <= row["fnir_at_fpir_1e-1"] <= 100
    assert any(row["mAP"] != before["mAP"]
               for row, before in zip(result["per_split"], plain["per_split"]))
    bad = run_script(EVAL_SCRIPT, *eval_args(path, tmp_path, *args, "--set", "rerank=true",
                                             "--set", "rerank_k1=0"), check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == \
        "error: --set: 'rerank_k1' must be >= 1, got 0"
    with pytest.raises(ConfigError, match="rerank_lambda must be between 0 and 1, got 1.5"):
        protocol.check_data(load_config(path, [("rerank", True), ("rerank_lambda", 1.5)]))


def test_finetuned_run_loads_the_checkpoint(eval_config, tmp_path):
    path, config = eval_config
    save_tiny_checkpoint(config, config["save_path"])
    proc = run_script(EVAL_SCRIPT, *eval_args(path, tmp_path, "--set", "plots=false"))
    assert "rank-1" in proc.stdout and "mean ± std over 2 splits" in proc.stdout
    result = json.loads((tmp_path / "results/tiny_eval_finetuned.json").read_text())
    assert result["checkpoint"]["epoch"] == 4 and result["checkpoint"]["val_accuracy"] == 0.625
    assert result["checkpoint"]["path"] == config["save_path"]
    assert "cmc_plot" not in result["files"]
    assert len((tmp_path / "results/results.csv").read_text().splitlines()) == 2


def test_missing_checkpoint_is_a_one_line_error(eval_config, tmp_path):
    path, _ = eval_config
    proc = run_script(EVAL_SCRIPT, *eval_args(path, tmp_path), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("error: checkpoint not found")
    assert "Traceback" not in proc.stderr and not (tmp_path / "results").exists()


@pytest.mark.parametrize("changes, message", [
    ({"aspect": "dorsal_l"}, "was trained on aspect 'dorsal_l'"),
    ({"head": "bnneck"}, "has a bnneck head"),
])
def test_mismatched_checkpoint_is_refused(eval_config, tmp_path, changes, message):
    path, config = eval_config
    save_tiny_checkpoint(config, config["save_path"], **changes)
    with pytest.raises(UserError, match=message):
        evaluate_config(load_config(path, [("results_dir", str(tmp_path))]))


def test_reranked_split_is_ranked_and_plotted_in_the_reranked_order(make_config):
    config = make_config(num_splits=1, rerank=True, rerank_k1=5, rerank_k2=2)
    evaluated = protocol.evaluate(tiny_model(config), config, torch.device("cpu"))
    split = evaluated.splits[0]
    features = evaluated.features
    distance = rerank_k_reciprocal(features[split.query_rows], features[split.gallery_rows],
                                   5, 2, 0.3)
    # The ranking grid sorts first_split_scores: the re-ranked order, not the cosine one.
    assert torch.equal(evaluated.first_split_scores, -distance)
    expected = compute_reid_metrics(-distance, split.query_ids, split.gallery_ids)
    assert evaluated.report["per_split"][0]["mAP"] == pytest.approx(expected["mAP"])


def test_an_unwritable_results_dir_fails_before_any_image_is_encoded(eval_config, tmp_path,
                                                                      monkeypatch):
    from experiments import run_eval_clip
    path, _ = eval_config
    (tmp_path / "a_file").write_text("not a folder")
    encoded = []
    monkeypatch.setattr(protocol, "evaluate", lambda *args, **kw: encoded.append(1))
    with pytest.raises(UserError, match=r"cannot write .*a_file/r/results.csv: .* is a file, "
                                        r"not a folder; write to another folder"):
        run_eval_clip.main(["--config", str(path), "--set", "variant=baseline", "--set",
                            f"results_dir={tmp_path / 'a_file/r'}"])
    assert not encoded
