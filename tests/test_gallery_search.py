"""gallery_search.top_k: chunked top-k equals the stable dense ranking, ties included."""
import numpy as np
import pytest
import torch

from handreid.core.errors import UserError
from handreid.search.topk import top_k


def dense_ranking(query, gallery, k):
    """The reference: full similarity, stable descending sort of each row, cut at k."""
    similarity = torch.from_numpy(query) @ torch.from_numpy(gallery).T
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :k]
    return torch.gather(similarity, 1, order).numpy(), order.numpy()


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_chunked_top_k_equals_the_dense_stable_ranking(seed, ties):
    rng = np.random.default_rng(seed)
    if ties:  # few distinct values: many equal scores, also at the k-th place, and -0.0 vs 0.0
        query = rng.integers(-2, 3, (9, 4)).astype(np.float32) / 2
        gallery = rng.integers(-2, 3, (97, 4)).astype(np.float32) / 2
        gallery[:5] = gallery[5]  # duplicates of one image
    else:
        query = rng.standard_normal((9, 16)).astype(np.float32)
        gallery = rng.standard_normal((97, 16)).astype(np.float32)
        query, gallery = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (query, gallery))
    for k in (1, 7, 97):
        expected_scores, expected_order = dense_ranking(query, gallery, k)
        for chunk_size in (1, 6, 50, 97, 1000):
            scores, order = top_k(query, gallery, k, chunk_size)
            np.testing.assert_array_equal(order, expected_order, err_msg=f"{k} {chunk_size}")
            # the block products may round the last bit differently from the full product;
            # with the exact halves of the tie case they cannot
            np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=0 if ties else 1e-6)


def test_chunk_size_zero_is_one_line():
    features = np.eye(3, dtype=np.float32)
    with pytest.raises(UserError) as caught:
        top_k(features, features, 1, 0)
    assert "\n" not in str(caught.value) and "must be >= 1" in str(caught.value)


@pytest.mark.parametrize("seed", range(4))
def test_verification_by_counts_equals_the_sorting_implementation(seed, monkeypatch):
    """float32 scores go through score_counts' two counting passes; the same scores as
    float64 (exact copies) through the sorting implementation: every result must be equal,
    ties (few distinct values, -0.0 beside 0.0, one high-bit bin) included."""
    from handreid.metrics import score_counts
    from handreid.metrics.verification import compute_verification_metrics
    rng = np.random.default_rng(seed)
    monkeypatch.setattr(score_counts, "BLOCK_ELEMENTS", int(rng.integers(1, 300)))
    num_queries, num_gallery = int(rng.integers(5, 40)), int(rng.integers(20, 80))
    query_ids, gallery_ids = rng.integers(0, 6, num_queries), rng.integers(0, 6, num_gallery)
    cases = [rng.integers(-4, 5, (num_queries, num_gallery)) / 4,
             0.5 + rng.integers(-50, 50, (num_queries, num_gallery)) * 2.0 ** -23,
             rng.standard_normal((num_queries, num_gallery))]
    cases[0][0, :5] = -0.0
    for scores in cases:
        scores = scores.astype(np.float32)
        counted = compute_verification_metrics(torch.from_numpy(scores), query_ids, gallery_ids,
                                               far=(0.1, 0.01, 1e-3))
        sorted_ = compute_verification_metrics(torch.from_numpy(scores.astype(np.float64)),
                                               query_ids, gallery_ids, far=(0.1, 0.01, 1e-3))
        assert counted == sorted_
