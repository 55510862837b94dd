"""The references the fast metrics are measured and tested against, written out loop by loop:
torchreid's python `eval_market1501` as it runs (the speed goal's yardstick); its semantics per
query in a lean numpy loop (no camera filtering), with fast-reid's mINP and the MBA-Net /
CLIP-HandID trapezoid AP; verification per pair; open-set identification
per search; torchreid's k-reciprocal re-ranking on dense matrices; and a Market-1501-like case
of noisy identity features. Used by benchmarks/bench_metrics.py, bench_rerank.py and the tests.
"""
from fractions import Fraction
from math import comb

import numpy as np
import torch
from tqdm import tqdm


def expected_query_metrics(row, matches, num_ranks):
    """One query's (CMC [num_ranks], AP, trapezoid AP, INP), each the expected value over all
    orders of tied gallery items, place by place: a tie group of t items with m true matches,
    below b items holding K matches, has a match at each place p with probability m/t, and
    then (m-1)(p-1)/(t-1) other matches before it on average (hypergeometric); its first
    match is past place j with probability C(t-j, m)/C(t, m), its last one at place p with
    probability C(p-1, m-1)/C(t, m)."""
    num_rel = int(matches.sum())
    cmc, ap, trapezoid, inp = np.zeros(num_ranks), 0.0, 0.0, 0.0
    order = np.argsort(-row, kind="stable")
    values, in_order = row[order], matches[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # of each tie group
    ends = np.r_[starts[1:], len(row)]
    in_group = np.add.reduceat(in_order.astype(np.int64), starts)
    found = 0  # true matches above the group
    for group in np.flatnonzero(in_group).tolist():  # the groups holding a true match
        b, t, m = int(starts[group]), int(ends[group] - starts[group]), int(in_group[group])
        if m:  # b: items above the group
            for p in range(1, t + 1):
                before = (m - 1) * (p - 1) / (t - 1) if t > 1 else 0.0
                ap += m / t * (found + 1 + before) / (b + p)
                old = 1.0 if b + p == 1 else (found + before) / (b + p - 1)
                trapezoid += m / t * old
            if found == 0:  # the first match is in this group
                for rank in range(1, num_ranks + 1):
                    j = min(max(rank - b, 0), t)
                    cmc[rank - 1] = 0.0 if j == 0 else 1 - comb(t - j, m) / comb(t, m)
            if found + m == num_rel:  # the last one too
                inp = sum(comb(p - 1, m - 1) / comb(t, m) * num_rel / (b + p)
                          for p in range(m, t + 1))
            found += m
    return cmc, ap / num_rel, (ap + trapezoid) / 2 / num_rel, inp


def reference_metrics_loop(similarity, query_ids, gallery_ids, max_rank=10,
                           ties="expected"):
    """One query at a time, the textbook way. Returns the same dict as compute_reid_metrics;
    ties as its `ties` says."""
    similarity = np.asarray(similarity, dtype=np.float64)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    num_ranks = max(max_rank, 10)
    all_cmc, all_ap, all_trapezoid, all_inp = [], [], [], []
    for row, query_id in tqdm(zip(similarity, query_ids), total=len(query_ids), disable=None,
                              desc="loop reference", leave=False):
        if ties == "expected":
            matches = gallery_ids == query_id
            if matches.any():
                for values, value in zip((all_cmc, all_ap, all_trapezoid, all_inp),
                                         expected_query_metrics(row, matches, num_ranks)):
                    values.append(value)
            continue
        # torchreid ranks by ascending distance; -similarity with a stable sort keeps tied
        # gallery items in gallery order, the documented tie rule.
        order = np.argsort(-row, kind="stable")
        raw_cmc = (gallery_ids[order] == query_id).astype(np.int64)
        if not raw_cmc.any():
            continue
        cmc = np.minimum(raw_cmc.cumsum(), 1)[:num_ranks]
        # torchreid shortens the curve when the gallery is short; we pad it with its last value.
        all_cmc.append(np.pad(cmc, (0, num_ranks - len(cmc)), mode="edge"))

        match_ranks = np.flatnonzero(raw_cmc) + 1  # 1-based ranks of the true matches
        num_rel = len(match_ranks)
        all_inp.append(num_rel / match_ranks[-1])
        precisions = [k / rank for k, rank in enumerate(match_ranks, start=1)]
        all_ap.append(sum(precisions) / num_rel)
        trapezoid = 0.0
        for k, rank in enumerate(match_ranks, start=1):
            old_precision = (k - 1) / (rank - 1) if rank > 1 else 1.0
            trapezoid += (old_precision + k / rank) / 2 / num_rel
        all_trapezoid.append(trapezoid)
    if not all_cmc:
        raise ValueError("no query has a true match in the gallery")
    cmc = 100.0 * np.mean(all_cmc, axis=0)
    return {"rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "cmc": cmc[:max_rank].tolist(),
            "mAP": 100.0 * np.mean(all_ap), "mAP_trapezoid": 100.0 * np.mean(all_trapezoid),
            "mINP": 100.0 * np.mean(all_inp),
            "num_valid_queries": len(all_cmc), "num_queries": len(query_ids)}


def torchreid_python_loop(similarity, query_ids, gallery_ids, max_rank=10):
    """torchreid's python `eval_market1501` (torchreid/metrics/rank.py, the path taken without
    its Cython extension), step by step and at its cost: an argsort of every whole row of
    distances up front, then per query a keep-mask, cumulative sums over the whole gallery
    and the precision at every gallery position in a python list. Every gallery image is kept
    (hand datasets have no camera ids: query and gallery get different ones). torchreid's
    quicksort orders tied distances arbitrarily. The yardstick of the speed goal: -> (CMC
    [max_rank] as fractions, mAP as a fraction), as torchreid returns them."""
    distance = 1 - np.asarray(similarity, dtype=np.float64)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    query_cameras, gallery_cameras = np.zeros(len(query_ids)), np.ones(len(gallery_ids))
    order = np.argsort(distance, axis=1)
    matches = (gallery_ids[order] == query_ids[:, None]).astype(np.int32)
    cmc_curves, average_precisions = [], []
    for index, query_id in enumerate(query_ids):
        same_camera = (gallery_ids[order[index]] == query_id) & (
            gallery_cameras[order[index]] == query_cameras[index])
        hits = matches[index][~same_camera]
        if not hits.any():
            continue
        cmc = np.minimum(hits.cumsum(), 1)
        cmc_curves.append(cmc[:max_rank])
        precision_at = [found / (position + 1.0) for position, found in enumerate(hits.cumsum())]
        average_precisions.append((np.asarray(precision_at) * hits).sum() / hits.sum())
    if not cmc_curves:
        raise ValueError("no query has a true match in the gallery")
    return (np.asarray(cmc_curves).astype(np.float32).sum(0) / len(cmc_curves),
            float(np.mean(average_precisions)))


def reference_verification_loop(similarity, query_ids, gallery_ids, far):
    """Every query x gallery pair, every observed threshold, exact fractions: the
    definitions of compute_verification_metrics written out."""
    genuine, impostor = [], []
    for row, query_id in zip(np.asarray(similarity, dtype=np.float64).tolist(), query_ids):
        for score, gallery_id in zip(row, gallery_ids):
            (genuine if gallery_id == query_id else impostor).append(score)
    best = None
    tar = {rate: (None if len(impostor) < 1 / rate else 0.0) for rate in far}
    for t in sorted(set(genuine + impostor)):
        far_t = Fraction(sum(s >= t for s in impostor), len(impostor))
        frr_t = Fraction(sum(s < t for s in genuine), len(genuine))
        if best is None or abs(far_t - frr_t) < best[0]:  # ascending t: ties keep the lowest
            best = (abs(far_t - frr_t), (far_t + frr_t) / 2, t)
        for rate in far:
            if tar[rate] is not None and float(far_t) <= rate:
                tar[rate] = max(tar[rate], 100.0 * float(1 - frr_t))
    return {"eer": 100.0 * float(best[1]), "eer_threshold": best[2], "tar_at_far": tar}


def reference_open_set_loop(similarity, query_ids, gallery_ids, fpir):
    """One search at a time, every observed threshold: the definitions of
    compute_open_set_metrics written out."""
    mated, non_mated = [], []  # (best score, rank-1 is the searched identity)
    for row, query_id in zip(np.asarray(similarity, dtype=np.float64).tolist(), query_ids):
        best = max(range(len(row)), key=lambda j: (row[j], -j))  # first of the maxima
        entry = (row[best], gallery_ids[best] == query_id)
        (mated if query_id in gallery_ids else non_mated).append(entry)
    fnir = {rate: (None if len(non_mated) < 1 / rate else 100.0) for rate in fpir}
    for t in sorted({score for score, _ in mated + non_mated}):
        fpir_t = sum(score >= t for score, _ in non_mated) / len(non_mated)
        fnir_t = sum(not hit or score < t for score, hit in mated) / len(mated)
        for rate in fpir:
            if fnir[rate] is not None and fpir_t <= rate:
                fnir[rate] = min(fnir[rate], 100.0 * fnir_t)
    rank1 = 100.0 * sum(hit for _, hit in mated) / len(mated)
    return {"fnir_at_fpir": fnir, "rank1_mated": rank1}


def reference_rerank(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value):
    """torchreid's re_ranking (torchreid/utils/rerank.py, after Zhong et al.'s code), written
    out loop by loop on dense [N, N] matrices: the yardstick for rerank_k_reciprocal. Only
    the neighbour sort is stable here (numpy's default quicksort orders ties arbitrarily)."""
    original = np.block([[q_q_dist, q_g_dist], [q_g_dist.T, g_g_dist]])
    original = np.square(original).astype(np.float32)
    original = (original / original.max(axis=0)).T
    num_queries, num = q_g_dist.shape[0], original.shape[0]
    rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = rank[i, :k + 1]
        return forward[[i in rank[j, :k + 1] for j in forward]]

    weights = np.zeros_like(original)
    for i in range(num):
        members = reciprocal(i, k1)
        expansion = list(members)
        for candidate in members:
            candidate_set = reciprocal(candidate, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(candidate_set, members)) > 2.0 / 3 * len(candidate_set):
                expansion += list(candidate_set)
        expansion = np.unique(np.asarray(expansion, dtype=np.int64))  # may be empty
        weight = np.exp(-original[i, expansion])
        weights[i, expansion] = weight / weight.sum()
    if k2 != 1:
        weights = np.stack([weights[rank[i, :k2]].mean(axis=0) for i in range(num)])
    jaccard = np.zeros((num_queries, num), dtype=np.float32)
    images_of_column = [np.flatnonzero(column) for column in weights.T]  # torchreid's invIndex
    for i in range(num_queries):
        shared = np.zeros(num, dtype=np.float32)
        for column in np.flatnonzero(weights[i]):
            rows = images_of_column[column]
            shared[rows] += np.minimum(weights[i, column], weights[rows, column])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + original[:num_queries] * lambda_value
    return final[:, num_queries:]


def market_like_case(num_queries, num_gallery, num_ids, num_distractor_ids, noise, seed,
                     dim=64, features=False):
    """Cosine similarities of noisy identity features: several true matches per query (every
    query identity is in the gallery) and gallery-only distractor identities. noise=None gives
    uninformative similarities, the worst case: every true match is spread over the ranking.
    With features=True (needs a noise level), the query and gallery features come first."""
    gen = torch.Generator().manual_seed(seed)
    query_ids = torch.arange(num_queries) % num_ids
    gallery_ids = torch.cat([torch.arange(num_ids), torch.randint(
        0, num_ids + num_distractor_ids, (num_gallery - num_ids,), generator=gen)])
    if noise is None:
        similarity = torch.rand(num_queries, num_gallery, generator=gen) * 2 - 1
        return similarity, query_ids.numpy(), gallery_ids.numpy()
    centres = torch.nn.functional.normalize(torch.randn(num_ids + num_distractor_ids, dim,
                                                        generator=gen), dim=1)

    def encode(ids):
        noisy = centres[ids] + noise * torch.randn(len(ids), dim, generator=gen)
        return torch.nn.functional.normalize(noisy, dim=1)

    query, gallery = encode(query_ids), encode(gallery_ids)
    if features:
        return query, gallery, query_ids.numpy(), gallery_ids.numpy()
    return query @ gallery.T, query_ids.numpy(), gallery_ids.numpy()
