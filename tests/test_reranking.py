"""metrics.reranking.rerank_k_reciprocal (nearest-neighbour lists, sparse V) against torchreid's
re-ranking written out loop by loop on dense matrices (benchmarks/reference_metrics.py), on
random features and on features with exact ties; its chunking, tie fallback and size limit."""
import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from handreid.core.errors import UserError
from handreid.metrics import reranking
from handreid.metrics.inputs import MetricInputError
from handreid.metrics.reranking import rerank_k_reciprocal

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "reference_metrics", ROOT / "benchmarks/reference_metrics.py")
reference_metrics = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_metrics)

# Unit vectors whose dot products are exact in float32 (multiples of 1/4): every distance
# between two of them is computed exactly, so equal distances are exact ties.
TIED_POOL = np.concatenate([np.array(list(itertools.product([-0.5, 0.5], repeat=4))),
                            np.eye(4), -np.eye(4)]).astype(np.float32)


def reference(query, gallery, k1, k2, lambda_value):
    return reference_metrics.reference_rerank(1 - query @ gallery.T, 1 - query @ query.T,
                                          1 - gallery @ gallery.T, k1, k2, lambda_value)


def rerank(query, gallery, k1, k2, lambda_value):
    return rerank_k_reciprocal(torch.from_numpy(query), torch.from_numpy(gallery), k1, k2,
                               lambda_value).numpy()


def normalised(rng, count, dim):
    features = rng.normal(size=(count, dim)).astype(np.float32)
    return features / np.linalg.norm(features, axis=1, keepdims=True)


def tied_case(seed, num_queries, num_gallery):
    """Features drawn with repeats from TIED_POOL: duplicates and equal distances throughout."""
    rng = np.random.default_rng(seed)
    return (TIED_POOL[rng.integers(0, len(TIED_POOL), num_queries)],
            TIED_POOL[rng.integers(0, len(TIED_POOL), num_gallery)])


@pytest.mark.parametrize("k1,k2,lambda_value", [
    (20, 6, 0.3),   # the defaults
    (5, 3, 0.5),
    (3, 1, 0.0),    # k2 = 1: no query expansion; lambda 0: Jaccard only
    (1, 2, 1.0),    # round(k1 / 2) = 0: one-image half sets; lambda 1: distance only
    (7, 60, 0.3),   # k2 beyond the number of images
])
def test_ties_are_ranked_as_the_stable_dense_sort(k1, k2, lambda_value):
    # With more duplicates of one image than k1 + 1, some images are not among their own
    # nearest: their k-reciprocal sets are empty.
    for seed in range(6):
        query, gallery = tied_case(seed, 10, 40)
        expected = reference(query, gallery, k1, k2, lambda_value)
        assert np.abs(rerank(query, gallery, k1, k2, lambda_value) - expected).max() < 1e-5, seed


@pytest.mark.parametrize("num_queries,num_gallery,k1,k2,lambda_value", [
    (12, 60, 20, 6, 0.3), (30, 90, 6, 3, 0.7), (5, 120, 10, 10, 0.2)])
def test_random_features_equal_the_dense_algorithm(num_queries, num_gallery, k1, k2,
                                                   lambda_value):
    rng = np.random.default_rng(num_gallery)
    query, gallery = normalised(rng, num_queries, 16), normalised(rng, num_gallery, 16)
    expected = reference(query, gallery, k1, k2, lambda_value)
    assert np.abs(rerank(query, gallery, k1, k2, lambda_value) - expected).max() < 1e-5


@pytest.mark.parametrize("margin", [0, 1, 40])
def test_chunks_and_tie_fallback_do_not_change_the_result(monkeypatch, margin):
    # Margin 0: every row whose cut ties the last candidate is sorted whole (the fallback);
    # tiny chunks: many chunks of the nearest-neighbour pass and of the sparse steps.
    query, gallery = tied_case(11, 9, 50)
    expected = reference(query, gallery, 6, 3, 0.3)
    monkeypatch.setattr(reranking, "NEAREST_MARGIN", margin)
    monkeypatch.setattr(reranking, "NEAREST_CHUNK_ELEMENTS", 150)
    monkeypatch.setattr(reranking, "RERANK_CHUNK_ELEMENTS", 37)
    assert np.abs(rerank(query, gallery, 6, 3, 0.3) - expected).max() < 1e-5


def test_size_beyond_the_limit_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(reranking, "RERANK_MAX_PAIRS", 100)
    with pytest.raises(MetricInputError, match=r"^re-ranking 11 queries x 10 gallery images "
                       r"needs a .* GiB distance matrix, beyond its limit of 100 query x "
                       r"gallery pairs") as error:
        rerank_k_reciprocal(torch.ones(11, 3), torch.ones(10, 3))
    assert isinstance(error.value, UserError) and "\n" not in str(error.value)
    assert rerank_k_reciprocal(torch.eye(10, 3), torch.eye(10, 3)).shape == (10, 10)


def test_features_with_nan_are_refused():
    gallery = torch.eye(5, 3)
    gallery[2, 1] = float("nan")
    with pytest.raises(MetricInputError, match="re-ranking needs finite features"):
        rerank_k_reciprocal(torch.eye(2, 3), gallery)


def test_unnormalised_features_equal_the_dense_algorithm():
    # Cosines above 1 (longer vectors): (1 - c)^2 grows again, so the highest cosines are not
    # always the nearest; the rows where that matters are sorted whole.
    rng = np.random.default_rng(5)
    query = (rng.normal(size=(10, 8)) * rng.uniform(0.2, 2, (10, 1))).astype(np.float32)
    gallery = (rng.normal(size=(50, 8)) * rng.uniform(0.2, 2, (50, 1))).astype(np.float32)
    expected = reference(query, gallery, 5, 3, 0.3)
    assert np.abs(rerank(query, gallery, 5, 3, 0.3) - expected).max() < 1e-5


@pytest.mark.parametrize("num_queries,num_gallery,dim,k1,k2,lambda_value", [
    (8, 30, 6, 20, 6, 0.3),   # k1 + 1 > Q + G: every image is a neighbour
    (15, 45, 4, 5, 3, 0.5),
    (6, 20, 3, 3, 1, 0.0),    # k2 = 1: no query expansion
    (10, 40, 8, 2, 9, 1.0),   # k2 > k1 + 1
])
def test_rerank_equals_torchreid_algorithm(num_queries, num_gallery, dim, k1, k2, lambda_value):
    rng = np.random.default_rng(num_queries + k1)
    query, gallery = normalised(rng, num_queries, dim), normalised(rng, num_gallery, dim)
    expected = reference_metrics.reference_rerank(1 - query @ gallery.T, 1 - query @ query.T,
                                                  1 - gallery @ gallery.T, k1, k2, lambda_value)
    result = rerank_k_reciprocal(torch.from_numpy(query), torch.from_numpy(gallery), k1, k2,
                                 lambda_value)
    assert result.shape == (num_queries, num_gallery)
    assert np.abs(result.numpy() - expected).max() < 1e-5


def test_rerank_chunks_do_not_change_the_result(monkeypatch):
    rng = np.random.default_rng(0)
    query, gallery = torch.from_numpy(normalised(rng, 20, 8)), torch.from_numpy(
        normalised(rng, 70, 8))
    whole = rerank_k_reciprocal(query, gallery, 6, 3, 0.3)
    monkeypatch.setattr(reranking, "RERANK_CHUNK_ELEMENTS", 37)
    assert torch.allclose(rerank_k_reciprocal(query, gallery, 6, 3, 0.3), whole, atol=1e-6)


@pytest.mark.parametrize("call,message", [
    (lambda: rerank_k_reciprocal(torch.ones(2, 3), torch.ones(4, 3), k1=0),
     r"re-ranking needs an integer k1 >= 1, got 0"),
    (lambda: rerank_k_reciprocal(torch.ones(2, 3), torch.ones(4, 2)),
     r"re-ranking needs \[Q, D\] and \[G, D\] feature matrices"),
])
def test_bad_parameters_are_a_clear_error(call, message):
    with pytest.raises(MetricInputError, match=message):
        call()
