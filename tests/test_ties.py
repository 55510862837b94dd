"""Tied similarities in compute_reid_metrics: the default rule counts every metric as its
expected value over all orders of the tied gallery items (a collapsed model scores chance);
torchreid's gallery-order rule stays available as ties="gallery_order"; without ties with a
non-match both rules give the same numbers, bit for bit."""
import importlib.util
import itertools
from fractions import Fraction
from math import comb
from pathlib import Path

import numpy as np
import pytest

from handreid.metrics.ranking import compute_reid_metrics

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "reference_metrics", ROOT / "benchmarks/reference_metrics.py")
reference_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_metrics)

KEYS = ("rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP")


def mean_over_orders(similarity, query_ids, gallery_ids):
    """Every metric averaged over every order of the gallery, each ranked under the
    gallery-order rule: the expected value over the orders of tied items, by brute force."""
    results = []
    for order in itertools.permutations(range(len(gallery_ids))):
        order = list(order)
        results.append(compute_reid_metrics(similarity[:, order], query_ids,
                                            [gallery_ids[i] for i in order],
                                            ties="gallery_order"))
    return {key: np.mean([r[key] for r in results]) for key in KEYS}


def test_one_match_tied_with_two_non_matches():
    result = compute_reid_metrics(np.full((1, 3), 0.5), ["p"], ["n", "p", "m"])
    # Rank 1, 2 or 3 with probability 1/3 each.
    assert result["rank1"] == pytest.approx(100 / 3)
    assert result["mAP"] == pytest.approx(100 * float(Fraction(1, 3) * (1 + Fraction(1, 2)
                                                                        + Fraction(1, 3))))
    assert result["mINP"] == pytest.approx(result["mAP"])
    assert result["cmc"][:3] == pytest.approx([100 / 3, 200 / 3, 100.0])


@pytest.mark.parametrize("seed", range(3))
def test_expected_rule_is_the_mean_over_every_order(seed):
    rng = np.random.default_rng(seed)
    similarity = rng.integers(0, 3, (3, 6)) / 2  # few values: many ties
    gallery = [0, 1, 2] + rng.integers(0, 3, 3).tolist()
    brute = mean_over_orders(similarity, [0, 1, 2], gallery)
    for scores in (similarity, similarity.astype(np.float32)):
        for chunk_size in (None, 1):
            result = compute_reid_metrics(scores, [0, 1, 2], gallery, chunk_size=chunk_size)
            for key in KEYS:
                assert result[key] == pytest.approx(brute[key], abs=1e-9), key
    reference = reference_metrics.reference_metrics_loop(similarity, [0, 1, 2], gallery)
    for key in KEYS:  # the reference loop the other tests use, pinned the same way
        assert reference[key] == pytest.approx(brute[key], abs=1e-9), key


def test_ties_in_a_long_float32_gallery():
    # Most items score far lower: the candidate path (items at least as similar as the
    # least similar match) serves the row. The match ties with non-matches at 10 and 90.
    similarity = np.full((1, 100), 0.1, dtype=np.float32)
    similarity[0, [10, 50, 90]] = 0.8
    gallery = [0] * 100
    gallery[50] = 1
    result = compute_reid_metrics(similarity, [1], gallery)
    assert result["mAP"] == pytest.approx(100 * (1 + 1 / 2 + 1 / 3) / 3)
    assert result["cmc"][:3] == pytest.approx([100 / 3, 200 / 3, 100.0])


def test_constant_features_score_chance():
    # 10 identities, 10 images each: a collapsed model ranks every query's 10 matches at
    # random among 100 items. Under the gallery order (identities interleaved) query 0 has
    # its match first, and rank-10 is 100% for every query.
    query, gallery = np.arange(20) % 10, np.arange(100) % 10
    similarity = np.zeros((20, 100), dtype=np.float32)
    result = compute_reid_metrics(similarity, query, gallery)
    chance = [100 * (1 - comb(90, k) / comb(100, k)) for k in (1, 5, 10)]
    assert [result["rank1"], result["rank5"], result["rank10"]] == pytest.approx(chance)
    assert compute_reid_metrics(similarity, query, gallery,
                                ties="gallery_order")["rank10"] == 100.0


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_without_ties_both_rules_give_the_same_numbers_bit_for_bit(dtype):
    rng = np.random.default_rng(5)
    similarity = rng.normal(size=(50, 400)).astype(dtype)
    query, gallery = rng.integers(0, 20, 50), rng.integers(0, 20, 400)
    # Two true matches tied with each other (no non-match among them) keep exact ranks too.
    similarity[0, np.flatnonzero(gallery == query[0])[:2]] = 5.0
    for chunk_size in (None, 7):
        expected = compute_reid_metrics(similarity, query, gallery, chunk_size=chunk_size)
        order = compute_reid_metrics(similarity, query, gallery, chunk_size=chunk_size,
                                     ties="gallery_order")
        assert expected == order
