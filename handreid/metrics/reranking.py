"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) of query and gallery features, in bounded
memory: nearest-neighbour lists and sparse rows instead of (Q + G)^2 matrices."""
import numpy as np
import torch

from handreid.metrics.inputs import MetricInputError


# Work budget per chunk of the re-ranking (entries of the largest temporary).
RERANK_CHUNK_ELEMENTS = 1 << 23
# Distances per chunk of the nearest-neighbour pass (256 MiB of float32): large blocks keep the
# matrix product efficient.
NEAREST_CHUNK_ELEMENTS = 1 << 26
# Candidates kept beyond the needed neighbours, so that ties at the cut are seen.
NEAREST_MARGIN = 8
# The largest re-ranking: its [Q, G] float32 distance matrix is built whole.
RERANK_MAX_PAIRS = 1 << 30


def _nearest_and_row_max(features, count):
    """Per image: the indices of its `count` nearest images and its largest squared cosine
    distance. "Nearest" is the order of a stable sort of the image's row of squared distances
    (1 - cosine)^2 divided by that largest one (torchreid's `original_dist`, float32), so ties
    keep index order, also where the rounding of the division makes two distances equal.

    Each chunk of rows is scored against all images by one matrix product; its `count` +
    NEAREST_MARGIN highest cosines are the candidates, sorted exactly by their normalised
    squared distance. No other image can be nearer than the last candidate (its cosine is
    lower, and (1 - c)^2 falls as c rises to 1), so a row is done unless its cut ties that
    bound (or a cosine above 1 breaks it): such a row is sorted whole."""
    num = len(features)
    nearest = torch.empty(num, count, dtype=torch.long, device=features.device)
    row_max = torch.empty(num, dtype=features.dtype, device=features.device)
    candidates = min(count + NEAREST_MARGIN, num)
    rows = max(1, min(num, NEAREST_CHUNK_ELEMENTS // num))
    buffer = torch.empty(rows, num, dtype=features.dtype, device=features.device)  # reused
    for start in range(0, num, rows):
        cosine = torch.mm(features[start:start + rows], features.T,
                          out=buffer[:min(rows, num - start)])
        top, index = cosine.topk(candidates, dim=1, sorted=True)
        # (1 - c)^2 is largest at the lowest or the highest cosine (c > 1: unnormalised).
        largest = torch.maximum((1 - cosine.amin(1)).square(), (1 - top[:, 0]).square())[:, None]
        row_max[start:start + rows] = largest[:, 0]
        bound = (1 - top[:, -1:]).square() / largest
        index = index.sort(dim=1).values
        values = (1 - cosine.gather(1, index)).square().div_(largest)
        order = values.argsort(dim=1, stable=True)
        chunk_nearest = index.gather(1, order[:, :count])
        if candidates < num:
            cut = values.gather(1, order[:, count - 1:count])
            tied = torch.nonzero((cut[:, 0] >= bound[:, 0]) | (top[:, -1] > 1)).squeeze(1)
            if len(tied):
                whole = (1 - cosine[tied]).square() / largest[tied]
                chunk_nearest[tied] = whole.argsort(dim=1, stable=True)[:, :count]
        nearest[start:start + rows] = chunk_nearest
    return nearest, row_max


def _reciprocal(nearest):
    """[N, k] bool: nearest[i, a] has i among its own k nearest (a k-reciprocal neighbour)."""
    num, k = nearest.shape
    out = torch.empty(num, k, dtype=torch.bool, device=nearest.device)
    rows = max(1, RERANK_CHUNK_ELEMENTS // (k * k))
    for start in range(0, num, rows):
        own = torch.arange(start, min(start + rows, num), device=nearest.device)
        neighbours_of_neighbours = nearest[nearest[start:start + rows]]
        out[start:start + rows] = (neighbours_of_neighbours == own[:, None, None]).any(2)
    return out


def _expansion_sets(nearest, reciprocal, half):
    """(rows, columns) of each image's k-reciprocal set grown by the candidates' half-size
    reciprocal sets that share more than 2/3 of their members with it (Zhong et al.)."""
    num, k = nearest.shape
    near_half = nearest[:, :half]
    reciprocal_half = _reciprocal(near_half)
    sentinel = num  # sorts last; marks an empty slot
    rows_out, columns_out = [], []
    rows = max(1, RERANK_CHUNK_ELEMENTS // (k * half * k))
    for start in range(0, num, rows):
        own, own_mask = nearest[start:start + rows], reciprocal[start:start + rows]
        candidate_sets = near_half[own]  # [r, k, half]
        candidate_masks = reciprocal_half[own] & own_mask[:, :, None]
        # Members of each candidate's set that are also in the image's reciprocal set.
        shared = ((candidate_sets[..., None] == own[:, None, None, :])
                  & own_mask[:, None, None, :]).any(3) & candidate_masks
        sizes = candidate_masks.sum(2)
        accepted = own_mask & (shared.sum(2).double() > 2.0 / 3 * sizes.double())
        members = torch.cat([torch.where(own_mask, own, sentinel),
                             torch.where(candidate_masks & accepted[:, :, None], candidate_sets,
                                         sentinel).flatten(1)], dim=1).sort(dim=1).values
        keep = members != sentinel
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]  # each member once
        chunk_rows, slots = torch.nonzero(keep, as_tuple=True)
        rows_out.append(chunk_rows + start)
        columns_out.append(members[chunk_rows, slots])
    return torch.cat(rows_out), torch.cat(columns_out)


def _row_pointers(rows, num):
    counts = torch.bincount(rows, minlength=num)
    return counts.cumsum(0) - counts, counts


def _gather_segments(starts, counts):
    """Concatenated index ranges [start, start + count) of each segment, and the segment of
    each position."""
    segment = torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)
    offsets = torch.arange(len(segment), device=counts.device) \
        - (counts.cumsum(0) - counts)[segment]
    return starts[segment] + offsets, segment


def _query_expansion(rows, columns, values, nearest_k2, num):
    """Sparse V -> V averaged over each image's k2 nearest images' rows (rows sorted)."""
    starts, counts = _row_pointers(rows, num)
    source = nearest_k2.reshape(-1)  # row i * k2 + b averages V[nearest[i, b]]
    entries, pair = _gather_segments(starts[source], counts[source])
    keys = torch.div(pair, nearest_k2.shape[1], rounding_mode="floor") * num + columns[entries]
    unique_keys, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(len(unique_keys), dtype=values.dtype, device=values.device)
    summed.index_add_(0, inverse, values[entries])
    return (torch.div(unique_keys, num, rounding_mode="floor"), unique_keys % num,
            summed / nearest_k2.shape[1])


def _shared_weight(rows, columns, values, num_queries, num_gallery):
    """[Q, G] sum over images k of min(V[q, k], V[g, k]) for query rows q and gallery rows
    g (rows Q.. of V), pairing the entries of each column."""
    total = torch.zeros(num_queries * num_gallery, dtype=values.dtype, device=values.device)
    is_query = rows < num_queries
    gallery_order = torch.argsort(columns[~is_query], stable=True)
    gallery_rows = rows[~is_query][gallery_order] - num_queries
    gallery_columns = columns[~is_query][gallery_order]
    gallery_values = values[~is_query][gallery_order]
    starts, counts = _row_pointers(gallery_columns, num_queries + num_gallery)
    query_rows, query_columns = rows[is_query], columns[is_query]
    query_values = values[is_query]
    pairs = counts[query_columns]
    cumulative = pairs.cumsum(0)
    begin = 0
    while begin < len(query_rows):  # chunks of about RERANK_CHUNK_ELEMENTS pairs
        done = int(cumulative[begin - 1]) if begin else 0
        end = max(begin + 1, int(torch.searchsorted(
            cumulative, torch.tensor(done + RERANK_CHUNK_ELEMENTS, device=cumulative.device),
            right=True)))
        part = slice(begin, end)
        entries, entry = _gather_segments(starts[query_columns[part]], pairs[part])
        minimum = torch.minimum(query_values[part][entry], gallery_values[entries])
        total.index_add_(0, query_rows[part][entry] * num_gallery + gallery_rows[entries],
                         minimum)
        begin = end
    return total.view(num_queries, num_gallery)


def _pair_distance(features, rows, columns):
    """Squared cosine distance of each listed pair of images, in chunks."""
    out = torch.empty(len(rows), dtype=features.dtype, device=features.device)
    step = max(1, RERANK_CHUNK_ELEMENTS // features.shape[1])
    for start in range(0, len(rows), step):
        pair = slice(start, start + step)
        cosine = (features[rows[pair]] * features[columns[pair]]).sum(1)
        out[pair] = (1 - cosine).square()
    return out


def rerank_k_reciprocal(query_features, gallery_features, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) -> re-ranked distance [Q, G]
    (lower = more similar), float32 on the features' device.

    On L2-normalised features this equals torchreid's `re_ranking(q_g, q_q, g_g, k1, k2,
    lambda_value)` given the cosine distances (1 - cosine) among queries and gallery: over
    all Q + G images, the squared distance of each image to the others, divided by its
    largest one, ranks its neighbours; an image's k-reciprocal set (it is among their k1 + 1
    nearest and they among its) is grown by each member's round(k1/2)-reciprocal set sharing
    more than 2/3 of that set with it; the set's weights exp(-distance), normalised, form the
    image's row of V, averaged over its k2 nearest images (k2 = 1: no averaging); the Jaccard
    distance of a query and a gallery image is 1 - sum min(V_q, V_g) / sum max(V_q, V_g), and
    the result is (1 - lambda_value) * Jaccard + lambda_value * normalised squared distance.

    Ties: neighbours are ranked as a stable sort of each row of normalised squared distances
    (equal values in index order, so an image with exact duplicates of lower index may not be
    its own first neighbour); torchreid's numpy argsort leaves their order to its quicksort.

    Scale: nothing of size (Q + G)^2 is held. Each image's max(k1 + 1, k2) nearest images and
    its largest distance come from one chunked pass of matrix products over all Q + G images
    (time grows as (Q + G)^2, memory as Q + G); the k-reciprocal sets, V and the query
    expansion are sparse rows built from those lists; the Jaccard part pairs the entries of V's
    query rows with the gallery rows sharing their columns. The [Q, G] result is the only
    dense matrix: Q x G is limited to RERANK_MAX_PAIRS (2^30 pairs, 4 GiB).
    """
    for name, value in (("k1", k1), ("k2", k2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise MetricInputError(f"re-ranking needs an integer {name} >= 1, got {value!r}")
    if isinstance(lambda_value, bool) or not isinstance(lambda_value, (int, float)) \
            or not 0 <= lambda_value <= 1:
        raise MetricInputError(f"re-ranking needs lambda_value in [0, 1], got {lambda_value!r}")
    query_features = torch.as_tensor(query_features)
    gallery_features = torch.as_tensor(gallery_features)
    if query_features.ndim != 2 or gallery_features.ndim != 2 \
            or query_features.shape[1] != gallery_features.shape[1] \
            or not len(query_features) or not len(gallery_features):
        raise MetricInputError(f"re-ranking needs [Q, D] and [G, D] feature matrices, got "
                               f"{tuple(query_features.shape)} and "
                               f"{tuple(gallery_features.shape)}")
    num_queries, num_gallery = len(query_features), len(gallery_features)
    if num_queries * num_gallery > RERANK_MAX_PAIRS:
        raise MetricInputError(
            f"re-ranking {num_queries} queries x {num_gallery} gallery images needs a "
            f"{num_queries * num_gallery * 4 / 2**30:.1f} GiB distance matrix, beyond its limit "
            f"of {RERANK_MAX_PAIRS} query x gallery pairs ({RERANK_MAX_PAIRS * 4 / 2**30:g} "
            "GiB); use fewer queries or a smaller gallery, or evaluate without rerank")
    features = torch.cat([query_features, gallery_features.to(query_features.device)]).float()
    if not torch.isfinite(features).all():
        raise MetricInputError("re-ranking needs finite features; these hold NaN or inf")
    num = len(features)
    with torch.no_grad():
        nearest, row_max = _nearest_and_row_max(features, min(max(k1 + 1, k2), num))
        k_nearest = nearest[:, :k1 + 1].contiguous()
        rows, columns = _expansion_sets(k_nearest, _reciprocal(k_nearest),
                                        min(int(np.around(k1 / 2.0)) + 1, num))
        weights = torch.exp(-_pair_distance(features, rows, columns) / row_max[rows])
        sums = torch.zeros(num, device=weights.device).index_add_(0, rows, weights)
        values = weights / sums[rows]
        if k2 != 1:
            rows, columns, values = _query_expansion(rows, columns, values,
                                                     nearest[:, :k2].contiguous(), num)
        shared = _shared_weight(rows, columns, values, num_queries, num_gallery)
        # shared becomes the result in place: Jaccard part, then the weighted distance.
        jaccard = shared.div_(shared.neg().add_(2)).neg_().add_(1)
        result = jaccard.mul_(1 - lambda_value)
        rows_per_chunk = max(1, RERANK_CHUNK_ELEMENTS // num_gallery)
        gallery = features[num_queries:]
        for start in range(0, num_queries, rows_per_chunk):
            stop = min(start + rows_per_chunk, num_queries)
            original = (1 - features[start:stop] @ gallery.T).square() \
                / row_max[start:stop, None]
            result[start:stop] += lambda_value * original
    return result
