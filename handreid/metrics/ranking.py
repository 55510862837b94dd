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
and every true match is placed by binary search. Ties with a non-match count as the expected
value over their orders (from the same counts: the items above and tied with each match), or
under torchreid's gallery-order rule (ties="gallery_order") take a stable argsort of their rows.
"""
import numpy as np
import torch

from handreid.metrics.inputs import (MetricInputError, check_no_nan, nan_error,
                                     prepare_scores)

# Tie rules of compute_reid_metrics: expected value over the orders of tied items, or
# torchreid's gallery order.
TIES = ("expected", "gallery_order")

# Default chunk: as many query rows as fit in ~4M similarity entries, so each per-chunk
# temporary (sorted values, tie-row sort indices) stays within ~32 MB whatever the gallery size.
CHUNK_ELEMENTS = 1 << 22


def _gallery_by_identity(gallery_codes, num_codes):
    """(gallery indices grouped by identity code, start of each code's group, group sizes)."""
    counts = torch.bincount(gallery_codes, minlength=num_codes)
    return torch.argsort(gallery_codes, stable=True), counts.cumsum(0) - counts, counts


def _rank_terms(rows, ranks):
    """Per true match, from the 1-based ranks of every true match of every query (grouped by
    query, in rank order): (k: its place among its query's matches, n: their number, rank,
    precision at it, its trapezoid AP term), float64."""
    positives = torch.bincount(rows)  # each query's true matches, all of them listed
    starts = positives.cumsum(0) - positives
    k = (torch.arange(len(rows), device=ranks.device) - starts[rows] + 1).to(torch.float64)
    n = positives[rows].to(torch.float64)
    r = ranks.to(torch.float64)
    precision = k / r  # at the k-th true match
    # MBA-Net / CLIP-HandID: mean of the precision just before and at the match; before
    # rank 1 it counts as 1. See compute_reid_metrics.
    trapezoid = (torch.where(r > 1, (k - 1) / (r - 1).clamp(min=1), 1.0) + precision) / 2
    return k, n, r, precision, trapezoid


def _sums(k, n, precision, trapezoid, cmc_rows, inp_rows):
    """Sums over queries of CMC hits [num_ranks], AP (standard, trapezoid) and INP."""
    ap_sums = torch.stack([(precision / n).sum(), (trapezoid / n).sum()])
    return cmc_rows.sum(0), ap_sums.cpu().numpy(), float(inp_rows.sum())


def _first_hits(first_ranks, num_ranks):
    """[queries, num_ranks] 1.0 where the first true match is within the top k: rank-k counts
    a query once its first match is within the top k, so ranks past the gallery length count
    every query (the curve is padded with its last value)."""
    top = torch.arange(1, num_ranks + 1, device=first_ranks.device)
    return (first_ranks[:, None] <= top).to(torch.float64)


def _sums_from_match_ranks(rows, ranks, num_ranks):
    """Sums over queries of CMC hits [num_ranks], AP (standard, trapezoid) and INP, from the
    1-based ranks of every true match of every query; entries are grouped by query (rows) and
    in rank order."""
    k, n, r, precision, trapezoid = _rank_terms(rows, ranks)
    last = k == n  # mINP (fast-reid): true matches / rank of the hardest (last) one
    return _sums(k, n, precision, trapezoid, _first_hits(r[k == 1], num_ranks), n[last] / r[last])


def _log_choose(n, k):
    return torch.lgamma(n + 1) - torch.lgamma(k + 1) - torch.lgamma(n - k + 1)


def _harmonic(x):
    """The harmonic number H(x) up to a constant (only its differences are used)."""
    return torch.special.digamma(x + 1)


def _sums_expected(rows, above, tied, num_ranks):
    """Like _sums_from_match_ranks, with ties counted as the expected value over every order
    of the tied gallery items (all equally likely). Per true match: `above`, the gallery items
    more similar to the query, and `tied`, those exactly as similar (itself included);
    entries grouped by query in descending similarity.

    A tie group of t items holding m true matches, below b items holding K matches, where
    t > m (a non-match among them): its matches sit on a random m-subset of the t places, so
    place p holds a match with probability m/t, and then (m-1)(p-1)/(t-1) other matches are
    expected before it. Summing (matches so far) / rank over the places gives, per match,
    AP term (B t + (K + 1 - B (b+1)) (H(b+t) - H(b))) / t with B = (m-1)/(t-1) and H the
    harmonic numbers; the precision before the match, (K + B (p-1)) / (b+p-1), sums the same
    way. CMC and mINP take the first and last match's place from the hypergeometric law.
    Groups without a non-match have one outcome: those matches keep their exact ranks."""
    positives = torch.bincount(rows)
    k_int = torch.arange(len(rows), device=rows.device) - (positives.cumsum(0) - positives)[rows]
    new_group = torch.ones_like(rows, dtype=torch.bool)
    new_group[1:] = (rows[1:] != rows[:-1]) | (above[1:] != above[:-1])
    group = new_group.cumsum(0) - 1
    in_group = torch.bincount(group)[group]  # m
    matches_above = k_int[new_group][group]  # K
    ranks = above + k_int - matches_above + 1  # exact where no non-match ties
    k, n, r, precision, trapezoid = _rank_terms(rows, ranks)
    first, last = k == 1, k == n
    cmc_rows, inp_rows = _first_hits(r[first], num_ranks), n[last] / r[last]
    mixed = tied > in_group
    if not mixed.any():
        return _sums(k, n, precision, trapezoid, cmc_rows, inp_rows)
    b, t, m, kk = (x[mixed].to(torch.float64) for x in (above, tied, in_group, matches_above))
    spread = (m - 1) / (t - 1)  # B
    ap = (spread * t + (kk + 1 - spread * (b + 1)) * (_harmonic(b + t) - _harmonic(b))) / t
    before = torch.where(
        b > 0,
        spread * t + (kk - spread * b) * (_harmonic(b + t - 1) - _harmonic((b - 1).clamp(min=0))),
        1 + spread * (t - 1)) / t  # b = 0: the first place counts 1, the others B each
    precision[mixed], trapezoid[mixed] = ap, (before + ap) / 2

    # CMC: P(first match within the top r) = 1 - C(t-j, m) / C(t, m), j = r - b places of
    # the first match's group within the top r.
    first_mixed = mixed[first]
    if first_mixed.any():
        b, t, m = (x[first][first_mixed].to(torch.float64)[:, None]
                   for x in (above, tied, in_group))
        top = torch.arange(1, num_ranks + 1, device=rows.device, dtype=torch.float64)
        j = (top - b).clamp(min=0)
        none_yet = torch.where(t - j >= m, torch.exp(_log_choose((t - j).clamp(min=m), m)
                                                     - _log_choose(t, m)), 0.0)
        cmc_rows[first_mixed] = torch.where(j > 0, 1 - none_yet, 0.0)
    # mINP: the last match sits at place p of its group with probability
    # C(p-1, m-1) / C(t, m), p = m..t.
    last_mixed = mixed[last]
    if last_mixed.any():
        b, t, m, count = (x[last][last_mixed].to(torch.float64)
                          for x in (above, tied, in_group, positives[rows]))
        places = (t - m + 1).to(torch.int64)
        owner = torch.repeat_interleave(torch.arange(len(places), device=rows.device), places)
        p = m[owner] + (torch.arange(len(owner), device=rows.device)
                        - (places.cumsum(0) - places)[owner])
        weight = torch.exp(_log_choose(p - 1, m[owner] - 1) - _log_choose(t, m)[owner])
        expected = torch.zeros_like(b).index_add_(0, owner, weight / (b[owner] + p))
        inp_rows[last_mixed] = count * expected
    return _sums(k, n, precision, trapezoid, cmc_rows, inp_rows)


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


def _match_counts(similarity, match_values, in_row):
    """(above, tied) [R, P] of each row's true matches in descending similarity (slots past
    in_row are padding): the gallery items more similar to the query than each match, and
    those exactly as similar (itself included), counted in the row's sorted values."""
    num_gallery = similarity.shape[1]
    values = torch.where(in_row, match_values, float("-inf")).sort(dim=1, descending=True).values
    sorted_rows = _sorted_rows(similarity)
    at_most = torch.searchsorted(sorted_rows, values, right=True)  # items at most as similar
    tied_items = at_most - torch.searchsorted(sorted_rows, values)
    above = torch.where(in_row, num_gallery - at_most, num_gallery + 1)  # ascending per row
    return above, tied_items


def _match_ranks_counting(above, tied_items, in_row):
    """Ranks [R, P] of each row's true matches, ascending, from _match_counts; and a flag per
    row that is True where a match ties with a non-match, so the count cannot place it."""
    # Matches tied with each other take consecutive ranks (which one takes which does not
    # matter): rank_k = max(above_k + 1, rank_(k-1) + 1), a running max.
    k = torch.arange(1, above.shape[1] + 1, device=above.device)
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


def _match_ranks_above_lowest(similarity, match_values, match_index, in_row, ties):
    """(row, rank) of every true match, grouped by row in rank order, for a float32 CPU chunk
    (ties "expected": (row, above, tied), _match_counts' counts); None where sorting whole
    rows is cheaper.

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
    if ties == "expected":  # the keys of one row and similarity: one block of `keys`
        group = (match_keys >> column_bits) << column_bits
        begins = np.searchsorted(keys, group)
        tied = np.searchsorted(keys, group + (1 << column_bits)) - begins
        return tuple(map(torch.from_numpy, (match_rows, begins - row_starts[match_rows], tied)))
    ranks = np.searchsorted(keys, match_keys) - row_starts[match_rows] + 1
    return torch.from_numpy(match_rows), torch.from_numpy(ranks)


def _chunk_sums(similarity, query_codes, gallery_codes, gallery_groups, num_ranks, ties):
    """Metric sums over the valid queries of one chunk: (valid count, CMC hits, AP sums of
    both rules, INP)."""
    by_code, starts, counts = gallery_groups
    positives = counts[query_codes]
    valid = torch.nonzero(positives > 0).squeeze(1)
    if len(valid) == 0:
        check_no_nan(similarity)
        return (0, torch.zeros(num_ranks, dtype=torch.float64, device=similarity.device),
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
        found = _match_ranks_above_lowest(similarity, match_values, match_index, in_row, ties)
    sums = _sums_expected if ties == "expected" else _sums_from_match_ranks
    if found is not None:
        return (len(query_codes),) + sums(*found, num_ranks)
    check_no_nan(similarity)
    above, tied_items = _match_counts(similarity, match_values, in_row)
    if ties == "expected":
        rows, columns = torch.nonzero(in_row, as_tuple=True)
        return (len(query_codes),) + sums(rows, above[rows, columns], tied_items[rows, columns],
                                          num_ranks)
    ranks, tied = _match_ranks_counting(above, tied_items, in_row)
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


def compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=10, chunk_size=None,
                         ties="expected"):
    """CMC rank-1/5/10, the CMC curve, mAP under both AP rules and mINP (all in percent).

    Args:
        similarity: [Q, G] torch tensor or numpy array, higher = more similar (e.g. cosine
            of L2-normalised features). A tensor is evaluated on its own device.
        query_ids, gallery_ids: Q and G identity labels (strings or ints, the same kind for
            both); equal labels are true matches.
        max_rank: length of the returned CMC curve.
        chunk_size: query rows evaluated at once (default: ~4M similarity entries per chunk).
            Results do not depend on it.
        ties: how gallery items exactly as similar as a true match are ordered (TIES).
            "expected" (default): every metric is its expected value over all orders of the
            tied items, equally likely; constant features (a collapsed model) score chance.
            "gallery_order": torchreid's rule, a stable sort: tied items keep their gallery
            order (index order of the columns), so a collapsed model scores whatever the
            gallery order gives its true matches. Without such ties both give the same
            numbers, bit for bit.

    Per query the gallery is ranked by similarity, descending; ties as `ties` says.

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
    if ties not in TIES:
        raise MetricInputError(f"ties must be one of {', '.join(TIES)}, got {ties!r}")
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
    cmc_hits = torch.zeros(num_ranks, dtype=torch.float64, device=similarity.device)
    with torch.no_grad():
        for start in range(0, num_queries, rows):
            chunk = similarity[start:start + rows]
            valid, hits, ap, inp = _chunk_sums(chunk, query_codes[start:start + rows],
                                               gallery_codes, gallery_groups, num_ranks,
                                               ties)
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

