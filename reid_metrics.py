"""Re-identification metrics: CMC (rank-k), mAP and mINP of a query x gallery similarity matrix.

Semantics follow torchreid's `eval_market1501` (python path, every gallery image kept, as when
query and gallery have different camera ids: hand datasets have no camera ids) and fast-reid's
mINP. The work is vectorised in torch and runs on the similarity's own device, `chunk_size`
query rows at a time, so memory stays bounded on large galleries. Every metric depends only on
the ranks of the true matches, so rather than ranking the whole gallery (argsort plus a gather
of labels per query), each row's similarities are sorted as bare values and every true match
is placed by binary search; only rows where a true match ties with a non-match need the full
stable argsort.
"""
import numpy as np
import torch

from config import UserError

AP_MODES = ("standard", "trapezoid")
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


def _sums_from_match_ranks(rows, ranks, num_ranks, ap_mode):
    """Sums over queries of CMC hits [num_ranks], AP and INP, from the 1-based ranks of every
    true match of every query; entries are grouped by query (rows) and in rank order."""
    device = ranks.device
    positives = torch.bincount(rows)  # each query's true matches, all of them listed
    starts = positives.cumsum(0) - positives
    k = (torch.arange(len(rows), device=device) - starts[rows] + 1).to(torch.float64)
    n = positives[rows].to(torch.float64)
    r = ranks.to(torch.float64)
    precision = k / r  # at the k-th true match
    if ap_mode == "standard":
        per_match = precision
    else:
        # MBA-Net / CLIP-HandID: mean of the precision just before and at the match; before
        # rank 1 it counts as 1. See compute_reid_metrics.
        per_match = (torch.where(r > 1, (k - 1) / (r - 1).clamp(min=1), 1.0) + precision) / 2
    ap_sum = (per_match / n).sum()
    last = k == n  # mINP (fast-reid): true matches / rank of the hardest (last) one
    inp_sum = (n[last] / r[last]).sum()
    # CMC: rank-k counts a query once its first true match is within the top k, so ranks past
    # the gallery length count every query: the curve is padded with its last value.
    first_ranks = ranks[k == 1]
    cmc_hits = (first_ranks[:, None] <= torch.arange(1, num_ranks + 1, device=device)).sum(0)
    return cmc_hits, float(ap_sum), float(inp_sum)


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


def _chunk_sums(similarity, query_codes, gallery_codes, gallery_groups, num_ranks, ap_mode):
    """Metric sums over the valid queries of one chunk: (valid count, CMC hits, AP, INP)."""
    by_code, starts, counts = gallery_groups
    positives = counts[query_codes]
    valid = torch.nonzero(positives > 0).squeeze(1)
    if len(valid) == 0:
        return 0, torch.zeros(num_ranks, dtype=torch.int64, device=similarity.device), 0.0, 0.0
    if len(valid) < len(query_codes):
        similarity = similarity.index_select(0, valid)
        query_codes, positives = query_codes[valid], positives[valid]
    # The metrics depend only on the ranks of the true matches: look each one up in its sorted
    # row instead of ranking the whole gallery.
    slots = torch.arange(int(positives.max()), device=similarity.device)
    in_row = slots < positives[:, None]
    match_index = by_code[(starts[query_codes][:, None] + slots).clamp(max=len(by_code) - 1)]
    ranks, tied = _match_ranks_counting(similarity, similarity.gather(1, match_index), in_row)
    rows, columns = torch.nonzero(in_row & ~tied[:, None], as_tuple=True)
    cmc_hits, ap_sum, inp_sum = _sums_from_match_ranks(rows, ranks[rows, columns], num_ranks,
                                                       ap_mode)
    tied_rows = torch.nonzero(tied).squeeze(1)
    if len(tied_rows):
        # A match tied with a non-match: only a stable sort of the row gives its rank.
        rows, row_ranks = _match_ranks_sorting_rows(similarity.index_select(0, tied_rows),
                                                    query_codes[tied_rows], gallery_codes)
        tied_cmc, tied_ap, tied_inp = _sums_from_match_ranks(rows, row_ranks, num_ranks,
                                                             ap_mode)
        cmc_hits, ap_sum, inp_sum = cmc_hits + tied_cmc, ap_sum + tied_ap, inp_sum + tied_inp
    return len(query_codes), cmc_hits, ap_sum, inp_sum


def compute_reid_metrics(similarity, query_ids, gallery_ids, max_rank=10, ap_mode="standard",
                         chunk_size=None):
    """CMC rank-1/5/10, the CMC curve, mAP and mINP (all in percent) of a retrieval.

    Args:
        similarity: [Q, G] torch tensor or numpy array, higher = more similar (e.g. cosine
            of L2-normalised features). A tensor is evaluated on its own device.
        query_ids, gallery_ids: Q and G identity labels (strings or ints, the same kind for
            both); equal labels are true matches.
        max_rank: length of the returned CMC curve.
        ap_mode: "standard" or "trapezoid" (see below).
        chunk_size: query rows evaluated at once (default: ~4M similarity entries per chunk).
            Results do not depend on it.

    Per query the gallery is ranked by similarity, descending. Ties are broken by a stable
    sort: tied gallery items keep their gallery order (index order of the columns).

    - CMC rank-k: 1 if a true match is within the top k. When the gallery is shorter than
      max_rank the curve is padded with its last value (torchreid shortens it instead); a
      valid query's match is always found within the gallery, so the padding is 100%.
    - AP "standard" (torchreid / fast-reid): uninterpolated average precision over the full
      ranking, the mean over the true matches of (matches up to its rank) / its rank.
    - AP "trapezoid": `compute_mAP` of MBA-Net (github.com/nathanlem1/MBA-Net,
      evaluation_metrics.py) and CLIP-HandID (github.com/nathanlem1/CLIP-HandID,
      utils/evaluation_metrics.py), inherited from the Market-1501 baseline evaluation
      (layumi/Person_reID_baseline_pytorch): for the k-th of n true matches at rank r it adds
      (1/n) * ((k-1)/(r-1) + k/r) / 2, with (k-1)/(r-1) read as 1 when r = 1, i.e. the
      trapezoid area under the precision-recall steps. It reads lower than the standard AP;
      it is offered to set our numbers beside those papers' tables. (Their code also divides
      by all queries, valid or not, and orders ties by numpy's unstable argsort; on their
      protocol every query has a match, and exact ties are rare.)
    - mINP (fast-reid): mean over queries of (number of true matches) / (rank of the last one).
    - Queries without a true match in the gallery are left out of every mean; they are
      counted in num_queries but not in num_valid_queries. No camera-id filtering.

    Returns dict(rank1, rank5, rank10, cmc (list of max_rank floats), mAP, mINP,
    num_valid_queries, num_queries). Raises MetricInputError (a ValueError and a
    config.UserError) on inconsistent inputs or when no query has a true match.
    """
    if ap_mode not in AP_MODES:
        raise MetricInputError(f"ap_mode must be one of {', '.join(AP_MODES)}, got {ap_mode!r}")
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise MetricInputError(f"max_rank must be a positive integer, got {max_rank!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise MetricInputError(f"chunk_size must be a positive integer, got {chunk_size!r}")
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
    query_codes, gallery_codes = query_codes.to(device), gallery_codes.to(device)
    gallery_groups = _gallery_by_identity(gallery_codes, num_codes)

    num_ranks = max(max_rank, 10)  # rank10 is always reported
    rows = chunk_size or max(1, CHUNK_ELEMENTS // num_gallery)
    num_valid, ap_sum, inp_sum = 0, 0.0, 0.0
    cmc_hits = torch.zeros(num_ranks, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, num_queries, rows):
            chunk = similarity[start:start + rows]
            if torch.isnan(chunk.amax()):  # amax propagates NaN: one pass, no mask
                raise MetricInputError("similarity contains NaN (features with NaN or a zero "
                                       "vector?); cannot rank the gallery")
            valid, hits, ap, inp = _chunk_sums(chunk, query_codes[start:start + rows],
                                               gallery_codes, gallery_groups, num_ranks, ap_mode)
            num_valid += valid
            cmc_hits += hits
            ap_sum += ap
            inp_sum += inp
    if num_valid == 0:
        raise MetricInputError(f"none of the {num_queries} queries has a true match in the "
                               "gallery: check that query and gallery labels are the same "
                               "identity names")

    cmc = (cmc_hits.to(torch.float64) * (100.0 / num_valid)).tolist()
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "cmc": cmc[:max_rank],
            "mAP": 100.0 * ap_sum / num_valid, "mINP": 100.0 * inp_sum / num_valid,
            "num_valid_queries": num_valid, "num_queries": num_queries}
