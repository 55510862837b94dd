"""Re-identification metrics of a query x gallery similarity matrix: CMC (rank-k), mAP (both
AP rules) and mINP; verification (1:1) and open-set identification (1:N) metrics from the same
scores; k-reciprocal re-ranking.

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

from handreid.core.errors import UserError
from handreid.metrics.score_counts import verification_thresholds

# Default chunk: as many query rows as fit in ~4M similarity entries, so each per-chunk
# temporary (sorted values, tie-row sort indices) stays within ~32 MB whatever the gallery size.
CHUNK_ELEMENTS = 1 << 22


class MetricInputError(UserError, ValueError):
    """Inputs the metrics cannot be computed from (shapes, labels, no valid query).

    A UserError, so scripts print one line; a ValueError, so library callers can catch it as one.
    """


def _label_codes(query_ids, gallery_ids):
    """Integer codes of both label lists under one shared vocabulary (strings or ints)."""
    labels = []
    for name, ids in (("query_ids", query_ids), ("gallery_ids", gallery_ids)):
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu()
        array = np.asarray(ids)
        if array.ndim != 1:
            raise MetricInputError(f"{name} must be a flat sequence of identity labels, got "
                                   f"shape {array.shape}")
        labels.append(array)
    query, gallery = labels
    # numpy would turn 1 and "1" into the same string: a silent match between different types.
    text = [array.dtype.kind in "USO" for array in labels if array.size]
    if len(set(text)) > 1:
        raise MetricInputError(f"query_ids ({query.dtype}) and gallery_ids ({gallery.dtype}) "
                               "hold different label types; pass identity names for both")
    vocabulary, codes = np.unique(np.concatenate([query, gallery]), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    return codes[:len(query)], codes[len(query):], len(vocabulary)


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
        raise _nan_error()
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
        _check_no_nan(similarity)
        return (0, torch.zeros(num_ranks, dtype=torch.int64, device=similarity.device),
                np.zeros(2), 0.0)
    if len(valid) < len(query_codes):
        _check_no_nan(similarity[positives == 0])
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
    _check_no_nan(similarity)
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


def _prepare(similarity, query_ids, gallery_ids):
    """Checked inputs -> (similarity as a float tensor, query codes, gallery codes, number of
    codes); the codes live on the similarity's device."""
    if not isinstance(similarity, torch.Tensor):
        # Through numpy: lists keep float64, and torch refuses negative strides.
        similarity = torch.from_numpy(np.ascontiguousarray(similarity))
    if similarity.ndim != 2:
        raise MetricInputError(f"similarity must be a [num_queries, num_gallery] matrix, got "
                               f"shape {tuple(similarity.shape)}")
    if similarity.is_complex() or similarity.dtype == torch.bool:
        raise MetricInputError(f"similarity must hold real numbers, got {similarity.dtype}")
    if not similarity.is_floating_point():
        similarity = similarity.to(torch.float64)  # exact for any realistic integer score
    num_queries, num_gallery = similarity.shape
    if num_queries == 0 or num_gallery == 0:
        raise MetricInputError(f"nothing to evaluate: {num_queries} queries x {num_gallery} "
                               "gallery images")
    query_codes, gallery_codes, num_codes = _label_codes(query_ids, gallery_ids)
    if len(query_codes) != num_queries or len(gallery_codes) != num_gallery:
        raise MetricInputError(f"similarity is {num_queries} x {num_gallery} but there are "
                               f"{len(query_codes)} query_ids and {len(gallery_codes)} gallery_ids")
    device = similarity.device
    return similarity, query_codes.to(device), gallery_codes.to(device), num_codes


def _nan_error():
    return MetricInputError("similarity contains NaN (features with NaN or a zero vector?); "
                            "cannot rank the gallery")


def _check_no_nan(values):
    if torch.isnan(values.amax()):  # amax propagates NaN: one pass, no mask
        raise _nan_error()


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
    config.UserError) on inconsistent inputs or when no query has a true match.
    """
    _check_count("max_rank", max_rank)
    if chunk_size is not None:
        _check_count("chunk_size", chunk_size)
    similarity, query_codes, gallery_codes, num_codes = _prepare(similarity, query_ids,
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


# ---------------------------------------------------------------- verification and open set

def _check_rates(name, rates):
    rates = tuple(rates)
    if not rates or not all(isinstance(r, (int, float)) and not isinstance(r, bool)
                            and 0 < r < 1 for r in rates):
        raise MetricInputError(f"{name} must be rates strictly between 0 and 1 (e.g. 1e-3), "
                               f"got {rates!r}")
    return rates


def _allowed_false_count(count, rate):
    """The largest m in 0..count with m / count <= rate, compared in floating point as a
    per-score loop would."""
    m = min(count, int(rate * count))
    while m < count and (m + 1) / count <= rate:
        m += 1
    while m > 0 and m / count > rate:
        m -= 1
    return m


def genuine_impostor_scores(similarity, query_ids, gallery_ids):
    """-> (genuine scores, impostor scores): 1-D numpy arrays (float32 or float64, as given;
    other float types as float32) of every query x gallery pair with the same identity, and
    with different identities."""
    similarity, query_codes, gallery_codes, _ = _prepare(similarity, query_ids, gallery_ids)
    _check_no_nan(similarity)
    genuine = (query_codes[:, None] == gallery_codes[None, :]).cpu().numpy()
    if similarity.dtype not in (torch.float32, torch.float64):
        similarity = similarity.float()  # numpy has no bfloat16; float32 holds fp16 exactly
    scores = similarity.detach().cpu().numpy()
    return scores[genuine], scores[~genuine]


def _first_true(values, predicate):
    """Index of the first entry of ascending `values` for which the monotone (False...True)
    `predicate` holds, or len(values); by bisection."""
    low, high = 0, len(values)
    while low < high:
        middle = (low + high) // 2
        if predicate(values[middle]):
            high = middle
        else:
            low = middle + 1
    return low


def compute_verification_metrics(similarity, query_ids, gallery_ids, far=(1e-2, 1e-3, 1e-4)):
    """Verification (1:1) metrics over every query x gallery pair, in percent.

    Genuine pairs have the same identity, impostor pairs different identities. For a score
    threshold t (a pair is accepted when its score >= t):
      FAR(t) = share of impostor scores >= t; FRR(t) = share of genuine scores < t.
    - EER = (FAR + FRR) / 2 at the observed score t that minimises |FAR - FRR| (the lowest
      such t when several do; eer_threshold is that t).
    - TAR@FAR=x = the max over observed scores t with FAR(t) <= x of 1 - FRR(t) (0 when no
      observed score qualifies). None (n/a) when there are fewer than 1/x impostor pairs.
    Observed scores are all genuine and impostor scores; every comparison is exact on ties
    (counts, not interpolation). float32 (and narrower) scores are counted in two passes over
    row blocks (score_counts: no copy of the scores, so 1000 x 1M fits beside its similarity);
    float64 ones are copied out and sorted, with a bisection, as FAR - FRR never increases with
    t. Both give the same results for the same scores.

    Returns dict(eer, eer_threshold, tar_at_far {x: tar or None}, num_genuine, num_impostor).
    Raises MetricInputError when a rate is outside (0, 1) or there is no genuine or no
    impostor pair.
    """
    far = _check_rates("far", far)
    prepared, query_codes, gallery_codes, _ = _prepare(similarity, query_ids, gallery_ids)
    if prepared.dtype != torch.float64:  # float32 and narrower: exact counts, no score copy
        _check_no_nan(prepared)
        return _verification_by_counts(prepared, query_codes, gallery_codes, far)
    genuine, impostor = genuine_impostor_scores(similarity, query_ids, gallery_ids)
    _check_pairs(len(genuine), len(impostor))
    genuine.sort()
    impostor.sort()  # in place: the copy made by the mask is the only one
    n_gen, n_imp = len(genuine), len(impostor)

    def difference(t):
        """(FAR(t) - FRR(t)) * n_imp * n_gen, an exact integer, and the two counts."""
        false_accepts = n_imp - int(np.searchsorted(impostor, t, side="left"))
        false_rejects = int(np.searchsorted(genuine, t, side="left"))
        return false_accepts * n_gen - false_rejects * n_imp, false_accepts, false_rejects

    # FAR - FRR never increases with t, so the minimum of |FAR - FRR| sits where it turns
    # negative: at the last observed t with a difference >= 0 (there is one: at the lowest
    # score FAR = 1 and FRR = 0) or at the first with a difference < 0.
    turns = [(values, _first_true(values, lambda t: difference(t)[0] < 0))
             for values in (genuine, impostor)]
    at_or_above = max(values[index - 1] for values, index in turns if index > 0)
    below = min((values[index] for values, index in turns if index < len(values)), default=None)
    plus = difference(at_or_above)[0]
    if below is not None and -difference(below)[0] < plus:
        threshold = below  # the lowest t of its level: every lower t has a difference >= 0
    else:
        # The lowest observed t with the same difference as at_or_above (ties: lowest t).
        threshold = min(values[index] for values in (genuine, impostor)
                        if (index := _first_true(values, lambda t: difference(t)[0] <= plus))
                        < len(values))
    _, false_accepts, false_rejects = difference(threshold)
    eer = (false_accepts / n_imp + false_rejects / n_gen) / 2

    tar = {}
    for rate in far:
        if n_imp < 1 / rate:
            tar[rate] = None
            continue
        allowed = _allowed_false_count(n_imp, rate)
        # FAR(t) <= rate iff t > the (allowed+1)-th highest impostor score; the best such
        # observed t accepts exactly the genuine scores above it.
        cut = impostor[n_imp - 1 - allowed]
        tar[rate] = 100.0 * (n_gen - int(np.searchsorted(genuine, cut, side="right"))) / n_gen
    return {"eer": 100.0 * eer, "eer_threshold": float(threshold), "tar_at_far": tar,
            "num_genuine": n_gen, "num_impostor": n_imp}


def _verification_by_counts(similarity, query_codes, gallery_codes, far):
    """compute_verification_metrics for float32 (or narrower) scores by score_counts' two
    counting passes: the same results, no copy of the scores."""
    codes = int(max(query_codes.max(), gallery_codes.max())) + 1
    n_gen = int((torch.bincount(query_codes, minlength=codes)
                 * torch.bincount(gallery_codes, minlength=codes)).sum())
    _check_pairs(n_gen, similarity.numel() - n_gen)
    allowed = {rate: _allowed_false_count(similarity.numel() - n_gen, rate) for rate in far
               if similarity.numel() - n_gen >= 1 / rate}
    threshold, false_accepts, false_rejects, n_gen, n_imp, above = verification_thresholds(
        similarity, query_codes, gallery_codes, sorted(set(allowed.values())))
    tar = {rate: 100.0 * above[allowed[rate]] / n_gen if rate in allowed else None
           for rate in far}
    eer = (false_accepts / n_imp + false_rejects / n_gen) / 2
    return {"eer": 100.0 * eer, "eer_threshold": threshold, "tar_at_far": tar,
            "num_genuine": n_gen, "num_impostor": n_imp}


def _check_pairs(n_gen, n_imp):
    if n_imp == 0 or n_gen == 0:
        missing = "impostor pair (every gallery image has the query's identity)" \
            if n_imp == 0 else "genuine pair (no query identity is in the gallery)"
        raise MetricInputError(f"verification needs both kinds of pairs, but there is no "
                               f"{missing}; use a gallery with several identities")


def compute_open_set_metrics(similarity, query_ids, gallery_ids, fpir=(0.1, 0.01)):
    """Open-set identification (1:N, ISO/IEC 19795-1 / NIST FRVT style) at rank 1, in percent.

    A query whose identity has a gallery image is a mated search, otherwise a non-mated one.
    Each search returns its best-scoring gallery image (the first in gallery order on ties);
    it is a candidate when its score >= the threshold t.
      FPIR(t) = share of non-mated searches whose best score >= t;
      FNIR(t) = share of mated searches whose rank-1 candidate is not their identity or
                scores < t.
    - FNIR@FPIR=x = the min over observed t (the searches' best scores) with FPIR(t) <= x of
      FNIR(t) (100 when no observed score qualifies). None (n/a) when there are fewer than
      1/x non-mated searches.
    - rank1_mated: closed-set rank-1 of the mated searches (no threshold).

    Returns dict(fnir_at_fpir {x: fnir or None}, rank1_mated, num_mated, num_non_mated).
    Raises MetricInputError when a rate is outside (0, 1) or there is no mated or no
    non-mated search.
    """
    fpir = _check_rates("fpir", fpir)
    similarity, query_codes, gallery_codes, num_codes = _prepare(similarity, query_ids,
                                                                 gallery_ids)
    _check_no_nan(similarity)
    best_scores, best = similarity.max(dim=1)  # first maximum: the stable-sort rank 1
    in_gallery = torch.bincount(gallery_codes, minlength=num_codes) > 0
    mated = in_gallery[query_codes]
    correct = gallery_codes[best] == query_codes
    best_scores = best_scores.to("cpu", torch.float64).numpy()
    mated, correct = mated.cpu().numpy(), correct.cpu().numpy()
    non_mated_scores = np.sort(best_scores[~mated])
    n_mated, n_non_mated = int(mated.sum()), len(non_mated_scores)
    if n_mated == 0 or n_non_mated == 0:
        missing = "non-mated search (every query identity is in the gallery)" \
            if n_non_mated == 0 else "mated search (no query identity is in the gallery)"
        raise MetricInputError(f"open-set metrics need mated and non-mated searches, but there "
                               f"is no {missing}")
    hit_scores = best_scores[mated & correct]
    fnir = {}
    for rate in fpir:
        if n_non_mated < 1 / rate:
            fnir[rate] = None
            continue
        allowed = _allowed_false_count(n_non_mated, rate)
        cut = non_mated_scores[n_non_mated - 1 - allowed]
        fnir[rate] = 100.0 * (1 - int((hit_scores > cut).sum()) / n_mated)
    return {"fnir_at_fpir": fnir, "rank1_mated": 100.0 * int(correct[mated].sum()) / n_mated,
            "num_mated": n_mated, "num_non_mated": n_non_mated}


# ---------------------------------------------------------------- k-reciprocal re-ranking

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
