"""Top-k gallery search in bounded memory: chunked matrix products and top-k selection.

`top_k(query, gallery, k, chunk_size)` returns the same order as a stable descending sort of
each full query x gallery similarity row, cut at k (scores equal up to the last float32 bit:
a block's matrix product may round differently from the full one), without ever building that matrix
or sorting it: the gallery is scored `chunk_size` images at a time and only the best k of each
block are kept and merged.

Tie rule: equal scores keep gallery order (the lower gallery index ranks first), exactly as
the stable sort did; -0.0 and +0.0 are equal. Exactness comes from ranking by one unique
integer key per (score, index): the float's bits mapped to a monotone integer in the high 32
bits and the reversed gallery index in the low 32, so `torch.topk` has no ties to break.

Extra memory: about queries x chunk_size x 12 bytes (the block's float32 scores and int64
keys) plus queries x k x 16 bytes, independent of the gallery size.
"""
import torch

from handreid.core.errors import UserError

DEFAULT_CHUNK_SIZE = 16384
_LOW = (1 << 32) - 1


def check_chunk_size(chunk_size, what="--chunk-size"):
    if chunk_size < 1:
        raise UserError(f"{what} must be >= 1 gallery image per block, got {chunk_size} "
                        f"(default {DEFAULT_CHUNK_SIZE}; smaller uses less memory)")
    return chunk_size


def _keys(scores, index):
    """int64 keys ordering (score descending, gallery index ascending) as one descending order;
    `index` is the gallery index of each score (same shape)."""
    bits = (scores + 0.0).contiguous().view(torch.int32).to(torch.int64)  # + 0.0: -0.0 -> +0.0
    monotone = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # float order as signed int order
    return monotone * (1 << 32) + (_LOW - index)


def _block_top(scores, start, k):
    """-> (keys, scores) of the best k of one block [queries, n]: a float top-(k+1), and the
    exact key order only for the rows whose (k+1)-th score ties the k-th (where top-k could
    pick any of the tied)."""
    values, where = torch.topk(scores, min(k + 1, scores.shape[1]), dim=1, sorted=True)
    tied = values[:, k] == values[:, k - 1] if values.shape[1] > k else None
    values, where = values[:, :k].contiguous(), where[:, :k].contiguous()
    if tied is not None and tied.any():
        rows = scores[tied]
        index = torch.arange(start, start + scores.shape[1]).expand_as(rows)
        _, where[tied] = torch.topk(_keys(rows, index), k, dim=1, sorted=False)
        values[tied] = torch.gather(rows, 1, where[tied])
    return _keys(values, where + start), values


def top_k(query_features, gallery_features, k, chunk_size=DEFAULT_CHUNK_SIZE):
    """-> (scores float32 [queries, k], gallery indices int64 [queries, k]), best first, ties in
    gallery order. Features are numpy or torch float32 arrays [n, d]; k <= gallery size."""
    check_chunk_size(chunk_size)
    query = torch.as_tensor(query_features, dtype=torch.float32)
    gallery = torch.as_tensor(gallery_features, dtype=torch.float32)
    if not 1 <= k <= len(gallery):
        raise ValueError(f"k={k} must be in 1..{len(gallery)} (the gallery size)")
    if len(gallery) >= 1 << 31:
        raise UserError(f"a gallery of {len(gallery)} images is beyond the 2^31 this search "
                        "indexes; split it into several galleries")
    best_keys = torch.empty(len(query), 0, dtype=torch.int64)
    best_scores = torch.empty(len(query), 0, dtype=torch.float32)
    for start in range(0, len(gallery), chunk_size):
        scores = query @ gallery[start:start + chunk_size].T
        block_keys, block_scores = _block_top(scores, start, min(k, scores.shape[1]))
        keys = torch.cat([best_keys, block_keys], dim=1)
        values = torch.cat([best_scores, block_scores], dim=1)
        best_keys, where = torch.topk(keys, min(k, keys.shape[1]), dim=1, sorted=True)
        best_scores = torch.gather(values, 1, where)
    return best_scores.numpy(), (_LOW - (best_keys & _LOW)).numpy()
