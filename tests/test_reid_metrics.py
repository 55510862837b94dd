"""metrics.ranking.compute_reid_metrics: hand-computed cases, input errors, and agreement with a
per-query loop reference of torchreid's eval_market1501 semantics and with torchreid's python
loop itself on random cases; metrics.verification (verification and open set) against per-pair
and per-search loops."""
import importlib.util
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from handreid.core.errors import UserError
from handreid.metrics.inputs import MetricInputError
from handreid.metrics.ranking import compute_reid_metrics
from handreid.metrics.verification import compute_open_set_metrics, compute_verification_metrics

ROOT = Path(__file__).resolve().parents[1]
# The loop references live in benchmarks/reference_metrics.py (one copy: benchmarks and tests).
_spec = importlib.util.spec_from_file_location(
    "reference_metrics", ROOT / "benchmarks/reference_metrics.py")
reference_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_metrics)
reference_metrics_loop = reference_metrics.reference_metrics_loop

SCALARS = ("rank1", "rank5", "rank10", "mAP", "mAP_trapezoid", "mINP")


def pct(fraction):
    return 100.0 * float(fraction)


def assert_same(result, expected, tol=1e-6):
    for key in SCALARS:
        assert result[key] == pytest.approx(expected[key], abs=tol), key
    assert result["cmc"] == pytest.approx(expected["cmc"], abs=tol)
    assert result["num_valid_queries"] == expected["num_valid_queries"]
    assert result["num_queries"] == expected["num_queries"]


def test_one_positive():
    # The only true match is second in the ranking.
    result = compute_reid_metrics(np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]), ["x"],
                                  ["y", "x", "z", "w", "v"], max_rank=5)
    # Plain Python numbers: they go into checkpoints loaded with torch.load(weights_only=True).
    assert all(type(value) in (int, float, list) for value in result.values())
    assert result["cmc"] == [0.0, 100.0, 100.0, 100.0, 100.0]
    assert (result["rank1"], result["rank5"], result["rank10"]) == (0.0, 100.0, 100.0)
    assert result["mAP"] == pytest.approx(50.0)
    assert result["mINP"] == pytest.approx(50.0)
    assert (result["num_valid_queries"], result["num_queries"]) == (1, 1)


def test_several_positives_and_mean_over_queries():
    similarity = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5],    # id 1: matches at ranks 1, 3, 5
                               [0.1, 0.9, 0.3, 0.2, 0.4]])   # id 2: its match ranks first
    result = compute_reid_metrics(similarity, [1, 2], [1, 2, 1, 3, 1])
    ap_first = (Fraction(1, 1) + Fraction(2, 3) + Fraction(3, 5)) / 3
    assert result["mAP"] == pytest.approx(pct((ap_first + 1) / 2))
    assert result["mINP"] == pytest.approx(pct((Fraction(3, 5) + 1) / 2))
    assert result["rank1"] == 100.0
    assert len(result["cmc"]) == 10


def test_trapezoid_ap_matches_mba_net_rule_and_reads_lower():
    # k-th of n matches at rank r adds ((k-1)/(r-1) + k/r) / 2n, with (k-1)/(r-1) = 1 at r = 1.
    similarity = np.array([[0.9, 0.8, 0.7, 0.6, 0.5]])
    standard = compute_reid_metrics(similarity, [1], [1, 2, 1, 3, 1])
    expected = (Fraction(2, 2) + (Fraction(1, 2) + Fraction(2, 3)) / 2
                + (Fraction(2, 4) + Fraction(3, 5)) / 2) / 3
    assert standard["mAP_trapezoid"] == pytest.approx(pct(expected))  # 32/45
    assert standard["mAP"] == pytest.approx(pct(Fraction(34, 45)))
    # A lone match at rank 2: standard 1/2, trapezoid (0/1 + 1/2) / 2 = 1/4.
    single = compute_reid_metrics(similarity, ["x"], ["y", "x", "z", "w", "v"])
    assert (single["mAP"], single["mAP_trapezoid"]) == (pytest.approx(50.0), pytest.approx(25.0))


GALLERY_ORDER = {"ties": "gallery_order"}  # torchreid's rule, kept for comparison


def test_ties_keep_gallery_order():
    tied = np.full((1, 3), 0.5)
    assert compute_reid_metrics(tied, ["p"], ["n", "p", "m"],
                                **GALLERY_ORDER)["mAP"] == pytest.approx(50.0)
    assert compute_reid_metrics(tied, ["p"], ["p", "n", "m"], **GALLERY_ORDER)["rank1"] == 100.0
    # The match ties with two earlier negatives, behind a clearly better one: rank 4.
    result = compute_reid_metrics(np.array([[0.7, 0.5, 0.5, 0.5]]), [1], [0, 0, 0, 1],
                                  **GALLERY_ORDER)
    assert result["mAP"] == pytest.approx(25.0)
    assert result["cmc"][:4] == [0.0, 0.0, 0.0, 100.0]


def test_tied_matches_take_consecutive_ranks():
    # Two matches share a similarity that no non-match has: ranks 3 and 4.
    result = compute_reid_metrics(np.array([[0.9, 0.5, 0.7, 0.5]]), ["p"], ["n", "p", "m", "p"])
    assert result["mAP"] == pytest.approx(pct((Fraction(1, 3) + Fraction(2, 4)) / 2))
    assert result["mINP"] == pytest.approx(50.0)
    assert result["cmc"][:3] == [0.0, 0.0, 100.0]


def test_ties_in_a_long_gallery():
    # A short head inside a long gallery (the partial-sort path): the match at index 50 ties
    # with negatives at 10 (before it in gallery order) and 90 (after it).
    similarity = torch.full((1, 100), 0.1)
    similarity[0, [10, 50, 90]] = 0.8
    gallery = [0] * 100
    gallery[50] = 1
    result = compute_reid_metrics(similarity, [1], gallery, **GALLERY_ORDER)
    assert result["mAP"] == pytest.approx(50.0)
    assert result["cmc"][:2] == [0.0, 100.0]


def test_query_without_a_match_is_left_out_and_counted():
    similarity = np.array([[0.9, 0.1, 0.2], [0.3, 0.2, 0.1]])
    result = compute_reid_metrics(similarity, ["a", "ghost"], ["b", "a", "c"])
    alone = compute_reid_metrics(similarity[:1], ["a"], ["b", "a", "c"])
    assert (result["num_valid_queries"], result["num_queries"]) == (1, 2)
    assert_same({**result, "num_queries": 1}, alone, tol=0)
    assert result["mAP"] == pytest.approx(pct(Fraction(1, 3)))


def test_no_valid_query_raises():
    with pytest.raises(ValueError, match="none of the 2 queries has a true match") as err:
        compute_reid_metrics(np.ones((2, 3)), ["a", "b"], ["c", "d", "e"])
    assert isinstance(err.value, UserError)  # scripts print it as one line


def test_gallery_shorter_than_max_rank_pads_the_curve():
    result = compute_reid_metrics(np.array([[0.2, 0.9, 0.1]]), [7], [7, 8, 9], max_rank=12)
    assert result["cmc"] == [0.0] + [100.0] * 11
    assert (result["rank5"], result["rank10"]) == (100.0, 100.0)
    short = compute_reid_metrics(np.array([[0.2, 0.9, 0.1]]), [7], [7, 8, 9], max_rank=2)
    assert short["cmc"] == [0.0, 100.0] and short["rank10"] == 100.0


def test_string_labels_equal_integer_labels():
    rng = np.random.default_rng(3)
    similarity = rng.random((12, 30))
    query, gallery = rng.integers(0, 6, 12), rng.integers(0, 6, 30)
    by_int = compute_reid_metrics(similarity, query, gallery)
    by_name = compute_reid_metrics(similarity, [f"{i:07d}" for i in query],
                                   [f"{i:07d}" for i in gallery])
    by_tensor = compute_reid_metrics(torch.from_numpy(similarity), torch.from_numpy(query),
                                     torch.from_numpy(gallery))
    assert_same(by_name, by_int, tol=0)
    assert_same(by_tensor, by_int, tol=0)


def random_case(seed, num_queries=70, num_gallery=300, num_ids=25, decimals=None):
    """Noisy identity features: several matches per query, some queries without a match in
    the gallery, string labels; rounding the similarities creates ties."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_ids + 5, 16))
    query_ids = rng.integers(0, num_ids + 5, num_queries)  # ids >= num_ids: never in gallery
    gallery_ids = rng.integers(0, num_ids, num_gallery)
    noise = rng.uniform(0.3, 2.0)

    def features(ids):
        feats = centres[ids] + noise * rng.normal(size=(len(ids), 16))
        return feats / np.linalg.norm(feats, axis=1, keepdims=True)

    similarity = features(query_ids) @ features(gallery_ids).T
    if decimals is not None:
        similarity = np.round(similarity, decimals)
    return similarity, [f"id{i}" for i in query_ids], [f"id{i}" for i in gallery_ids]


@pytest.mark.parametrize("ties", ["expected", "gallery_order"])
@pytest.mark.parametrize("seed,decimals", [(0, None), (1, None), (2, 1), (3, 2), (4, 1), (5, 3)])
def test_agrees_with_per_query_loop_reference(seed, decimals, ties):
    similarity, query_ids, gallery_ids = random_case(seed, decimals=decimals)
    expected = reference_metrics_loop(similarity, query_ids, gallery_ids, max_rank=20,
                                      ties=ties)
    assert expected["num_valid_queries"] < expected["num_queries"]  # the case has invalid ones
    result = compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=20, ties=ties)
    assert_same(result, expected)


@pytest.mark.parametrize("ties", ["expected", "gallery_order"])
@pytest.mark.parametrize("seed,decimals", [(0, None), (2, 1), (3, 2), (5, 3)])
def test_float32_scores_agree_with_per_query_loop_reference(seed, decimals, ties):
    # float32 on the CPU: the matches are ranked among the items at least as similar as each
    # row's least similar match (the informative case), or by sorting whole rows where those
    # are more than an eighth of the row (noise near 2: almost random scores); ties included.
    similarity, query_ids, gallery_ids = random_case(seed, decimals=decimals)
    similarity = similarity.astype(np.float32)
    expected = reference_metrics_loop(similarity, query_ids, gallery_ids, max_rank=20,
                                      ties=ties)
    assert_same(compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=20,
                                     ties=ties), expected)
    for chunk_size in (1, 13):
        assert_same(compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=20,
                                         chunk_size=chunk_size, ties=ties), expected)


def test_float32_ties_and_signed_zeros_in_the_candidate_path():
    # One informative row: the match (index 5) ties with non-matches at 1 and 7 and with
    # -0.0 / +0.0 elsewhere; most items score far lower, so the candidate path serves it.
    similarity = np.full((2, 64), -0.9, dtype=np.float32)
    similarity[0, [1, 5, 7]] = 0.5
    similarity[0, 3] = 0.8
    similarity[1, [2, 9]] = (-0.0, 0.0)  # the match (9) ties with -0.0 before it: rank 2
    gallery = ["n"] * 64
    gallery[5], gallery[9] = "p", "q"
    result = compute_reid_metrics(similarity, ["p", "q"], gallery, max_rank=4, **GALLERY_ORDER)
    assert result["cmc"] == [0.0, 50.0, 100.0, 100.0]  # ranks 3 and 2
    assert result["mAP"] == pytest.approx(pct((Fraction(1, 3) + Fraction(1, 2)) / 2))


def test_nan_is_refused_in_every_path():
    similarity, query_ids, gallery_ids = random_case(1)
    valid = [i for i, name in enumerate(query_ids) if name in set(gallery_ids)]
    invalid = [i for i, name in enumerate(query_ids) if name not in set(gallery_ids)]
    for scores in (similarity.astype(np.float32), similarity):
        for row, column in ((valid[0], 0), (invalid[0], 3)):
            broken = scores.copy()
            broken[row, column] = np.nan
            with pytest.raises(MetricInputError, match="NaN"):
                compute_reid_metrics(broken, query_ids, gallery_ids)


def test_reference_loops_match_hand_case():
    # The references themselves are pinned to a hand-computed value, so neither can drift
    # together with the code it checks.
    case = (np.array([[0.9, 0.8, 0.7, 0.6, 0.5]]), [1], [1, 2, 1, 3, 1])
    for ties in ("expected", "gallery_order"):
        assert reference_metrics_loop(*case, ties=ties)["mAP"] == \
            pytest.approx(pct(Fraction(34, 45)))
    _, torchreid_map = reference_metrics.torchreid_python_loop(*case)
    assert torchreid_map == pytest.approx(float(Fraction(34, 45)))


@pytest.mark.parametrize("seed", [0, 1])
def test_torchreid_loop_yardstick_agrees(seed):
    # The speed goal is measured against torchreid's python loop as it runs: it must compute
    # the same CMC and mAP (no ties here: its quicksort orders tied distances arbitrarily).
    similarity, query_ids, gallery_ids = random_case(seed)
    cmc, mean_ap = reference_metrics.torchreid_python_loop(similarity, query_ids, gallery_ids,
                                                           max_rank=20)
    result = compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=20)
    assert result["cmc"] == pytest.approx(100 * cmc, abs=1e-4)  # torchreid's float32 curve
    assert result["mAP"] == pytest.approx(100 * mean_ap, abs=1e-9)


def test_chunk_size_does_not_change_results():
    similarity, query_ids, gallery_ids = random_case(5, decimals=2)
    whole = compute_reid_metrics(similarity, query_ids, gallery_ids)
    for chunk_size in (1, 7, 1000):
        assert_same(compute_reid_metrics(similarity, query_ids, gallery_ids,
                                         chunk_size=chunk_size), whole, tol=1e-9)


def test_input_containers_give_the_same_result():
    similarity, query_ids, gallery_ids = random_case(6)
    similarity = similarity.astype(np.float32)
    expected = compute_reid_metrics(similarity, query_ids, gallery_ids)
    assert_same(compute_reid_metrics(torch.from_numpy(similarity), query_ids, gallery_ids),
                expected, tol=0)
    assert_same(compute_reid_metrics(similarity.tolist(), query_ids, gallery_ids), expected,
                tol=0)
    # A reversed view (negative strides) of reversed columns is the same matrix.
    reversed_view = similarity[:, ::-1].copy()[:, ::-1]
    assert_same(compute_reid_metrics(reversed_view, query_ids, gallery_ids), expected, tol=0)


def test_bfloat16_similarity_ranks_like_its_float32_values():
    # bfloat16 has no numpy dtype: this runs the torch sort used off the CPU.
    similarity, query_ids, gallery_ids = random_case(8)
    low_precision = torch.from_numpy(similarity).to(torch.bfloat16)  # rounding adds ties
    assert_same(compute_reid_metrics(low_precision, query_ids, gallery_ids),
                reference_metrics_loop(low_precision.float().numpy(), query_ids, gallery_ids))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_the_similarity_device():
    similarity, query_ids, gallery_ids = random_case(7, decimals=2)
    on_gpu = compute_reid_metrics(torch.from_numpy(similarity).cuda(), query_ids, gallery_ids)
    assert_same(on_gpu, compute_reid_metrics(similarity, query_ids, gallery_ids), tol=1e-9)


@pytest.mark.parametrize("args,kwargs,message", [
    ((np.ones(3), ["a"], ["a", "b", "c"]), {}, "matrix"),
    ((np.ones((2, 3)), ["a"], ["a", "b", "c"]), {}, "1 query_ids"),
    ((np.ones((1, 0)), ["a"], []), {}, "1 queries x 0 gallery"),
    ((np.ones((0, 2)), [], ["a", "b"]), {}, "0 queries x 2 gallery"),
    ((np.array([[np.nan, 1.0]]), ["a"], ["a", "b"]), {}, "NaN"),
    ((np.ones((1, 2)), [1], ["1", "2"]), {}, "different label types"),
    ((np.ones((1, 2)), ["a"], ["a", "b"]), {"max_rank": 0}, "max_rank"),
    ((np.ones((1, 2)), ["a"], ["a", "b"]), {"chunk_size": 0}, "chunk_size"),
    ((np.ones((1, 2)), ["a"], ["a", "b"]), {"ties": "random"}, "ties must be one of"),
])
def test_bad_input_is_a_clear_error(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        compute_reid_metrics(*args, **kwargs)


# ------------------------------------------------------------ verification and open set

reference_verification_loop = reference_metrics.reference_verification_loop
reference_open_set_loop = reference_metrics.reference_open_set_loop


def test_verification_hand_case():
    # Genuine scores 0.9, 0.4; impostor 0.8, 0.4, 0.1, 0.1. At t = 0.4: FAR 2/4, FRR 0;
    # at t = 0.8: FAR 1/4, FRR 1/2 (|diff| 1/4, the minimum; lowest t of it).
    similarity = np.array([[0.9, 0.8, 0.1], [0.4, 0.4, 0.1]])
    result = compute_verification_metrics(similarity, ["a", "b"], ["a", "b", "d"],
                                          far=(0.3, 0.2))
    assert result["eer"] == pytest.approx(pct((Fraction(1, 4) + Fraction(1, 2)) / 2))
    assert result["eer_threshold"] == 0.8
    # FAR <= 0.3 first holds at t = 0.8 (one impostor accepted): TAR 1/2. FAR <= 0.2 needs
    # t > 0.8: t = 0.9, TAR 1/2. Fewer than 1/FAR impostor pairs: n/a.
    assert result["tar_at_far"] == {0.3: pytest.approx(50.0), 0.2: None}
    assert (result["num_genuine"], result["num_impostor"]) == (2, 4)


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 2), (3, 1)])
def test_verification_agrees_with_per_pair_loop(seed, decimals):
    similarity, query_ids, gallery_ids = random_case(seed, 12, 25, 5, decimals=decimals)
    far = (0.1, 0.01, 0.004, 1e-3)
    result = compute_verification_metrics(similarity, query_ids, gallery_ids, far=far)
    expected = reference_verification_loop(similarity, query_ids, gallery_ids, far)
    assert result["eer"] == pytest.approx(expected["eer"], abs=1e-9)
    assert result["eer_threshold"] == expected["eer_threshold"]
    assert result["tar_at_far"].keys() == expected["tar_at_far"].keys()
    for rate, tar in expected["tar_at_far"].items():
        assert result["tar_at_far"][rate] == (None if tar is None else pytest.approx(tar)), rate


@pytest.mark.parametrize("seed,decimals", [(0, None), (1, 1), (2, 2), (3, 1)])
def test_open_set_agrees_with_per_search_loop(seed, decimals):
    similarity, query_ids, gallery_ids = random_case(seed, 150, 40, 8, decimals=decimals)
    fpir = (0.5, 0.1, 0.03, 0.01)
    result = compute_open_set_metrics(similarity, query_ids, gallery_ids, fpir=fpir)
    expected = reference_open_set_loop(similarity, query_ids, gallery_ids, fpir)
    assert result["num_mated"] + result["num_non_mated"] == 150
    assert result["rank1_mated"] == pytest.approx(expected["rank1_mated"])
    for rate, fnir in expected["fnir_at_fpir"].items():
        assert result["fnir_at_fpir"][rate] == (None if fnir is None
                                                else pytest.approx(fnir)), rate


def test_open_set_hand_case():
    # Mated: a (best b1 0.9: wrong), b (best b1 0.7: right). Non-mated: z (0.8), y (0.2).
    similarity = np.array([[0.9, 0.1], [0.7, 0.3], [0.8, 0.1], [0.2, 0.1]])
    result = compute_open_set_metrics(similarity, ["a", "b", "z", "y"], ["b", "a"],
                                      fpir=(0.5,))
    # FPIR <= 1/2 for t > 0.2: best t = 0.7, b is found: FNIR 1/2.
    assert result["fnir_at_fpir"] == {0.5: pytest.approx(50.0)}
    assert result["rank1_mated"] == pytest.approx(50.0)


@pytest.mark.parametrize("call,message", [
    (lambda: compute_verification_metrics(np.ones((1, 2)), ["a"], ["a", "b"], far=(0.0,)),
     r"far must be rates strictly between 0 and 1"),
    (lambda: compute_verification_metrics(np.ones((1, 2)), ["a"], ["a", "b"], far=(1.5,)),
     r"far must be rates strictly between 0 and 1"),
    (lambda: compute_verification_metrics(np.ones((2, 2)), ["a", "a"], ["a", "a"]),
     r"no impostor pair"),
    (lambda: compute_verification_metrics(np.ones((1, 2)), ["z"], ["a", "b"]),
     r"no genuine pair"),
    (lambda: compute_open_set_metrics(np.ones((1, 2)), ["a"], ["a", "b"]),
     r"no non-mated search"),
    (lambda: compute_open_set_metrics(np.ones((1, 2)), ["a"], ["a", "b"], fpir=(1,)),
     r"fpir must be rates"),
])
def test_forensic_bad_input_is_a_clear_error(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
