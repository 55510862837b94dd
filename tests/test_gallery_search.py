"""gallery_search.top_k: chunked top-k equals the stable dense ranking, ties included."""
import numpy as np
import pytest
import torch

from config import UserError
from gallery_search import top_k


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
