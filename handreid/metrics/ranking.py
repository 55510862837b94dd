"""Re-identification (ranking) metrics of a query x gallery similarity matrix: CMC (rank-k),
mAP (both AP rules) and mINP. Verification and open-set identification from the same scores
are in verification.py, k-reciprocal re-ranking in reranking.py.

Semantics follow torchreid's `eval_market1501` (python path, every gallery image kept, as when
query and gallery have different camera ids: hand datasets have no camera ids) and fast-reid's
mINP. The work is vectorised in torch and runs on the similarity's own device, `chunk_size`
query rows at a time, so memory stays bounded on large galleries. Every metric depends only on
the ranks of the true matches, so the whole gallery is never ranked (argsort plus a gather of
labels per query). float32 scores on the CPU: one pass finds the items at least as similar as
each row's least similar match (with informative scores a small share of the row), and one
sort of those few, keyed by (row, score, gallery index), gives every match its exact rank.
Otherwise, or where those items are many, each row's similarities are sorted as bare values
and every true match is placed by binary search; only rows where a true match ties with a
non-match need the full stable argsort.
"""
import numpy as np
import torch

from handreid.metrics.inputs import (MetricInputError, check_no_nan, nan_error,
                                     prepare_scores)

# Default chunk: as many query rows as fit in ~4M similarity entries, so each per-chunk
# temporary (sorted values, tie-row sort indices) stays within ~32 MB whatever the gallery size.
CHUNK_ELEMENTS = 1 << 22


def _gallery_by_identity(gallery_codes, num_codes):
    """(gallery indices grouped by identity code, start of each code's group, group sizes)."""
    counts = torch.bincount(gallery_codes, minlength=num_codes)
    return torch.argsort(gallery_codes, stable=True), counts.cumsum(0) - counts, counts


def _sums_from_match_ranks(rows, ranks, num_ranks):
    """Sums over queries of CMC hits [num_ranks], AP (standard, trapezoid) and INP, from the
    1-based ranks of every true match of every query; entries are grouped by query (rows) and
    in rank order."""
    device = ranks.device
    positives = torch.bincount(rows)  # each query's true matches, all of them listed
    starts = positives.cumsum(0) - positives
    k = (torch.arange(len(rows), device=device) - starts[rows] + 1).to(torch.float64)
    n = positives[rows].to(torch.float64)
    r = ranks.to(torch.float64)
    precision = k / r  # at the k-th true match
    # MBA-Net / CLIP-HandID: mean of the precision just before and at the match; before
    # rank 1 it counts as 1. See compute_reid_metrics.
    trapezoid = (torch.where(r > 1, (k - 1) / (r - 1).clamp(min=1), 1.0) + precision) / 2
    ap_sums = torch.stack([(precision / n).sum(), (trapezoid / n).sum()])
    last = k == n  # mINP (fast-reid): true matches / rank of the hardest (last) one
    inp_sum = (n[last] / r[last]).sum()
    # CMC: rank-k counts a query once its first true match is within the top k, so ranks past
    # the gallery length count every query: the curve is padded with its last value.
    first_ranks = ranks[k == 1]
    cmc_hits = (first_ranks[:, None] <= torch.arange(1, num_ranks + 1, device=device)).sum(0)
    return cmc_hits, ap_sums.cpu().numpy(), float(inp_sum)


def _match_ranks_sorting_rows(similarity, query_codes, gallery_codes):
    """(row, rank) of every true match, by a stable sort of each whole row."""
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)
    rows, positions = torch.nonzero(gallery_codes[order] == query_codes[:, None], as_tuple=True)
    return rows, positions + 1


def _sorted_rows(similarity):
    """Each row's similarities in ascending order."""
    if similarity.device.type == "cpu" and similarity.dtype != torch.bfloat16:
        # numpy's SIMD sort of bare values is 10-20x faster than torch's CPU sort.
        return torch.from_numpy(np.sort(similarity.numpy(), axis=1))
    return torch.sort(similarity, dim=1).values


def _match_ranks_counting(similarity, match_values, in_row):
    """Ranks [R, P] of each row's true matches, ascending (slots past in_row are padding), by
    counting the gallery items more similar to the query than each match; and a flag per row
    that is True where a match ties with a non-match, so the count cannot place it."""
    num_gallery = similarity.shape[1]
    values = torch.where(in_row, match_values, float("-inf")).sort(dim=1, descending=True).values
    sorted_rows = _sorted_rows(similarity)
    at_most = torch.searchsorted(sorted_rows, values, right=True)  # items at most as similar
    tied_items = at_most - torch.searchsorted(sorted_rows, values)
    above = torch.where(in_row, num_gallery - at_most, num_gallery + 1)  # ascending per row
    # Matches tied with each other take consecutive ranks (which one takes which does not
    # matter): rank_k = max(above_k + 1, rank_(k-1) + 1), a running max.
    k = torch.arange(1, values.shape[1] + 1, device=values.device)
    ranks = k + torch.cummax(above + 1 - k, dim=1).values
    # Two matches have equal values iff equal counts above (the more similar one is above the
    # other), so this counts the matches tied with each match.
    tied_matches = (torch.searchsorted(above, above, right=True)
                    - torch.searchsorted(above, above))
    return ranks, ((tied_items > tied_matches) & in_row).any(1)


def _descending_keys(values):
    """uint32-valued int64 keys of float32 values: ascending keys = descending values; -0.0
    and +0.0 get one key (they compare equal)."""
    bits = (values + np.float32(0.0)).view(np.int32)  # + 0: -0.0 -> +0.0
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # float order as int32 order
    return (~ordered).view(np.uint32).astype(np.int64) ^ 0x80000000  # reversed, from 0


# Entries per block of _not_below: its bool mask stays in the CPU cache.
NOT_BELOW_BLOCK_ELEMENTS = 1 << 19


def _not_below(scores, lowest):
    """(flat indices ascending, values) of the entries of `scores` [R, G] that are not below
    their row's `lowest` value: >= it, or NaN. None as soon as they are more than an eighth of
    the entries scanned (then sorting whole rows is cheaper)."""
    num_rows, num_gallery = scores.shape
    rows = max(1, NOT_BELOW_BLOCK_ELEMENTS // num_gallery)
    buffer = np.empty(rows * num_gallery, dtype=bool)  # one, reused: no fresh pages per block
    found, values, total = [], [], 0
    for start in range(0, num_rows, rows):
        block = scores[start:start + rows].reshape(-1)
        mask = buffer[:block.size]
        np.less(block.reshape(-1, num_gallery), lowest[start:start + rows, None],
                out=mask.reshape(-1, num_gallery))
        where = np.flatnonzero(np.logical_not(mask, out=mask))
        values.append(block[where])  # while the block is in the cache
        found.append(where + start * num_gallery)
        total += len(where)
        if total > (start * num_gallery + block.size) // 8:  # so far: give up early
            return None
    return np.concatenate(found), np.concatenate(values)


def _match_ranks_above_lowest(similarity, match_values, match_index, in_row):
    """(row, rank) of every true match, grouped by row in rank order, for a float32 CPU chunk;
    None where sorting whole rows is cheaper.

    Only the gallery items at least as similar as a row's least similar true match can rank
    before one of its matches, and with informative scores they are a small share of the
    row. They are found in one pass, then ordered by one sort of int64 keys (row, similarity
    descending, gallery index: the stable-sort rank order, ties exact); each match's rank is
    the position of its own key in its row."""
    scores = similarity.numpy()
    num_rows, num_gallery = scores.shape
    column_bits = max(1, (num_gallery - 1).bit_length())
    row_shift = 32 + column_bits
    if row_shift + max(1, (num_rows - 1).bit_length()) > 63:
        return None  # keys would not fit: a very large user chunk_size
    values = match_values.numpy()
    lowest = np.where(in_row.numpy(), values, np.inf).min(axis=1)  # NaN stays NaN
    found = _not_below(scores, lowest)
    if found is None:
        return None
    flat, candidate_values = found
    if np.isnan(candidate_values).any():
        raise nan_error()
    row_ends = np.searchsorted(flat, np.arange(1, num_rows + 1) * num_gallery)
    rows = np.repeat(np.arange(num_rows, dtype=np.int64), np.diff(row_ends, prepend=0))
    keys = np.sort((rows << row_shift) | (_descending_keys(candidate_values) << column_bits)
                   | (flat - rows * num_gallery))
    match_rows, slots = np.nonzero(in_row.numpy())
    match_keys = np.sort((match_rows << row_shift)
                         | (_descending_keys(values[match_rows, slots]) << column_bits)
                         | match_index.numpy()[match_rows, slots])
    match_rows = match_keys >> row_shift
    row_starts = np.searchsorted(keys, np.arange(num_rows, dtype=np.int64) << row_shift)
    ranks = np.searchsorted(keys, match_keys) - row_starts[match_rows] + 1
    return torch.from_numpy(match_rows), torch.from_numpy(ranks)


def _chunk_sums(similarity, query_codes, gallery_codes, gallery_groups, num_ranks):
    """Metric sums over the valid queries of one chunk: (valid count, CMC hits, AP sums of
    both rules, INP)."""
    by_code, starts, counts = gallery_groups
    positives = counts[query_codes]
    valid = torch.nonzero(positives > 0).squeeze(1)
    if len(valid) == 0:
        check_no_nan(similarity)
        return (0, torch.zeros(num_ranks, dtype=torch.int64, device=similarity.device),
                np.zeros(2), 0.0)
    if len(valid) < len(query_codes):
        check_no_nan(similarity[positives == 0])
        similarity = similarity.index_select(0, valid)
        query_codes, positives = query_codes[valid], positives[valid]
    # The metrics depend only on the ranks of the true matches: look each one up in its sorted
    # row instead of ranking the whole gallery.
    slots = torch.arange(int(positives.max()), device=similarity.device)
    in_row = slots < positives[:, None]
    match_index = by_code[(starts[query_codes][:, None] + slots).clamp(max=len(by_code) - 1)]
    match_values = similarity.gather(1, match_index)
    found = None
    if similarity.device.type == "cpu" and similarity.dtype == torch.float32:
        found = _match_ranks_above_lowest(similarity, match_values, match_index, in_row)
    if found is not None:
        cmc_hits, ap_sum, inp_sum = _sums_from_match_ranks(*found, num_ranks)
        return len(query_codes), cmc_hits, ap_sum, inp_sum
    check_no_nan(similarity)
    ranks, tied = _match_ranks_counting(similarity, match_values, in_row)
    rows, columns = torch.nonzero(in_row & ~tied[:, None], as_tuple=True)
    cmc_hits, ap_sum, inp_sum = _sums_from_match_ranks(rows, ranks[rows, columns], num_ranks)
    tied_rows = torch.nonzero(tied).squeeze(1)
    if len(tied_rows):
        # A match tied with a non-match: only a stable sort of the row gives its rank.
        rows, row_ranks = _match_ranks_sorting_rows(similarity.index_select(0, tied_rows),
                                                    query_codes[tied_rows], gallery_codes)
        tied_cmc, tied_ap, tied_inp = _sums_from_match_ranks(rows, row_ranks, num_ranks)
        cmc_hits, ap_sum, inp_sum = cmc_hits + tied_cmc, ap_sum + tied_ap, inp_sum + tied_inp
    return len(query_codes), cmc_hits, ap_sum, inp_sum


def _check_count(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MetricInputError(f"{name} must be a positive integer, got {value!r}")


def compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=10, chunk_size=None):
    """CMC rank-1/5/10, the CMC curve, mAP under both AP rules and mINP (all in percent).

    Args:
        similarity: [Q, G] torch tensor or numpy array, higher = more similar (e.g. cosine
            of L2-normalised features). A tensor is evaluated on its own device.
        query_ids, gallery_ids: Q and G identity labels (strings or ints, the same kind for
            both); equal labels are true matches.
        max_rank: length of the returned CMC curve.
        chunk_size: query rows evaluated at once (default: ~4M similarity entries per chunk).
            Results do not depend on it.

    Per query the gallery is ranked by similarity, descending. Ties are broken by a stable
    sort: tied gallery items keep their gallery order (index order of the columns).

    - CMC rank-k: 1 if a true match is within the top k. When the gallery is shorter than
      max_rank the curve is padded with its last value (torchreid shortens it instead); a
      valid query's match is always found within the gallery, so the padding is 100%.
    - mAP (torchreid / fast-reid): uninterpolated average precision over the full ranking,
      the mean over the true matches of (matches up to its rank) / its rank.
    - mAP_trapezoid: `compute_mAP` of MBA-Net (github.com/nathanlem1/MBA-Net,
      evaluation_metrics.py) and CLIP-HandID (github.com/nathanlem1/CLIP-HandID,
      utils/evaluation_metrics.py), inherited from the Market-1501 baseline evaluation
      (layumi/Person_reID_baseline_pytorch): for the k-th of n true matches at rank r it adds
      (1/n) * ((k-1)/(r-1) + k/r) / 2, with (k-1)/(r-1) read as 1 when r = 1, i.e. the
      trapezoid area under the precision-recall steps. It reads lower than the standard AP;
      the published hand tables use it. (Their code also divides by all queries, valid or
      not, and orders ties by numpy's unstable argsort; on their protocol every query has a
      match, and exact ties are rare.)
    - mINP (fast-reid): mean over queries of (number of true matches) / (rank of the last one).
    - Queries without a true match in the gallery are left out of every mean; they are
      counted in num_queries but not in num_valid_queries. No camera-id filtering.

    Returns dict(rank1, rank5, rank10, cmc (list of max_rank floats), mAP, mAP_trapezoid,
    mINP, num_valid_queries, num_queries). Raises MetricInputError (a ValueError and a
    UserError) on inconsistent inputs or when no query has a true match.
    """
    _check_count("max_rank", max_rank)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size)
    similarity, query_codes, gallery_codes, num_codes = prepare_scores(similarity, query_ids,
                                                                 gallery_ids)
    num_queries, num_gallery = similarity.shape
    gallery_groups = _gallery_by_identity(gallery_codes, num_codes)

    num_ranks = max(max_rank, 10)  # rank10 is always reported
    # float32 on the CPU keeps only a small share of each chunk (_match_ranks_above_lowest):
    # larger chunks there cost little memory and save per-chunk work.
    elements = CHUNK_ELEMENTS * (4 if similarity.device.type == "cpu"
                                 and similarity.dtype == torch.float32 else 1)
    rows = chunk_size or max(1, elements // num_gallery)
    num_valid, ap_sums, inp_sum = 0, np.zeros(2), 0.0
    cmc_hits = torch.zeros(num_ranks, dtype=torch.int64, device=similarity.device)
    with torch.no_grad():
        for start in range(0, num_queries, rows):
            chunk = similarity[start:start + rows]
            valid, hits, ap, inp = _chunk_sums(chunk, query_codes[start:start + rows],
                                               gallery_codes, gallery_groups, num_ranks)
            num_valid += valid
            cmc_hits += hits
            ap_sums += ap
            inp_sum += inp
    if num_valid == 0:
        raise MetricInputError(f"none of the {num_queries} queries has a true match in the "
                               "gallery: check that query and gallery labels are the same "
                               "identity names")

    cmc = (cmc_hits.to(torch.float64) * (100.0 / num_valid)).tolist()
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "cmc": cmc[:max_rank],
            "mAP": 100.0 * float(ap_sums[0]) / num_valid,
            "mAP_trapezoid": 100.0 * float(ap_sums[1]) / num_valid,
            "mINP": 100.0 * inp_sum / num_valid,
            "num_valid_queries": num_valid, "num_queries": num_queries}

