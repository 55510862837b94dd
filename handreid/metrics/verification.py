"""Verification (1:1: EER, TAR@FAR) and open-set identification (1:N: FNIR@FPIR) metrics of a
query x gallery similarity matrix, and its genuine and impostor scores. Comparisons on ties are
exact (counts, not interpolation)."""
import numpy as np
import torch

from handreid.metrics.inputs import MetricInputError, check_no_nan, prepare_scores
from handreid.metrics.score_counts import verification_thresholds


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
    similarity, query_codes, gallery_codes, _ = prepare_scores(similarity, query_ids, gallery_ids)
    check_no_nan(similarity)
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
    prepared, query_codes, gallery_codes, _ = prepare_scores(similarity, query_ids, gallery_ids)
    if prepared.dtype != torch.float64:  # float32 and narrower: exact counts, no score copy
        check_no_nan(prepared)
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
    similarity, query_codes, gallery_codes, num_codes = prepare_scores(similarity, query_ids,
                                                                 gallery_ids)
    check_no_nan(similarity)
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
