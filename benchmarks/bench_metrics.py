"""Benchmark reid_metrics.compute_reid_metrics against a per-query loop reference on a random
Market-1501-sized case (3368 queries x 15913 gallery images, 751 query identities).

    python benchmarks/bench_metrics.py [--loop-queries N] [--out results.md] [--rerank-full]

`reference_metrics_loop` is also the reference the tests compare the vectorised code with:
a plain per-query numpy loop with torchreid's python `eval_market1501` semantics (no camera
filtering), fast-reid's mINP and the MBA-Net / CLIP-HandID trapezoid AP; so are the per-pair
verification loop, the per-search open-set loop and torchreid's re-ranking written out loop by
loop. The forensic part times verification and open-set metrics on the full-size case, and
re-ranking against that loop reference on a smaller case (--rerank-full: also full size).
"""
import argparse
import resource
import time
from pathlib import Path

from fractions import Fraction

import numpy as np
import torch
from tqdm import tqdm

from errors import run_cli, UserError
from atomic_files import atomic_write_text
from reid_metrics import (compute_open_set_metrics, compute_reid_metrics,
                          compute_verification_metrics, rerank_k_reciprocal)


def reference_metrics_loop(similarity, query_ids, gallery_ids, max_rank=10):
    """One query at a time, the textbook way. Returns the same dict as compute_reid_metrics."""
    similarity = np.asarray(similarity, dtype=np.float64)
    query_ids, gallery_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    num_ranks = max(max_rank, 10)
    all_cmc, all_ap, all_trapezoid, all_inp = [], [], [], []
    for row, query_id in tqdm(zip(similarity, query_ids), total=len(query_ids), disable=None,
                              desc="loop reference", leave=False):
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


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def bench_forensic(args):
    """Verification, open-set and re-ranking timings on the full-size case; re-ranking also
    side by side with the loop-by-loop torchreid algorithm on a smaller case. -> rows."""
    query, gallery, query_ids, gallery_ids = market_like_case(
        args.queries, args.gallery, args.ids, args.distractor_ids, args.noise, args.seed,
        dim=args.dim, features=True)
    rows = []
    if args.rerank_full:  # first, so the peak memory below is the re-ranking's
        _, rerank_time = timed(rerank_k_reciprocal, query, gallery, 20, 6, 0.3)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
        print(f"\n[re-ranking] {len(query_ids)}x{len(gallery_ids)}, dim {args.dim}: "
              f"{rerank_time:.3f} s, process peak RSS {peak:.2f} GiB")
        rows.append(f"| re-ranking (k1 20, k2 6) | {len(query_ids)}x{len(gallery_ids)}, dim "
                    f"{args.dim} | {torch.get_num_threads()} | {rerank_time:.3f} | | | |\n")
    similarity = query @ gallery.T
    verification, verification_time = timed(compute_verification_metrics, similarity,
                                            query_ids, gallery_ids)
    # Open set: the gallery images of every other query identity leave the gallery.
    kept = np.flatnonzero(~np.isin(gallery_ids, np.arange(0, args.ids, 2)))
    open_set, open_set_time = timed(compute_open_set_metrics, similarity[:, kept], query_ids,
                                    gallery_ids[kept])
    print(f"\n[verification] {len(query_ids)}x{len(gallery_ids)}: "
          f"{verification['num_impostor']} impostor pairs, EER {verification['eer']:.2f}%, "
          f"TAR@FAR=1e-3 {verification['tar_at_far'][1e-3]:.2f}%: {verification_time:.3f} s")
    print(f"[open set] {open_set['num_non_mated']} non-mated searches, FNIR@FPIR=1e-2 "
          f"{open_set['fnir_at_fpir'][0.01]:.2f}%: {open_set_time:.3f} s")
    rows += [f"| verification (EER, TAR@FAR) | {len(query_ids)}x{len(gallery_ids)} | "
             f"{torch.get_num_threads()} | {verification_time:.3f} | | | |\n",
             f"| open set (FNIR@FPIR) | {len(query_ids)}x{len(kept)} | "
             f"{torch.get_num_threads()} | {open_set_time:.3f} | | | |\n"]
    small_queries, small_gallery = args.rerank_reference_size
    small_q, small_g = query[:small_queries], gallery[:small_gallery]
    fast, fast_time = timed(rerank_k_reciprocal, small_q, small_g, 20, 6, 0.3)
    q, g = small_q.numpy(), small_g.numpy()
    slow, slow_time = timed(reference_rerank, 1 - q @ g.T, 1 - q @ q.T, 1 - g @ g.T, 20, 6, 0.3)
    difference = float(np.abs(fast.numpy() - slow).max())
    print(f"[re-ranking] {small_queries}x{small_gallery}: vectorised {fast_time:.3f} s, "
          f"torchreid's algorithm loop by loop {slow_time:.3f} s "
          f"({slow_time / fast_time:.1f}x), max |diff| {difference:.1e}")
    rows.append(f"| re-ranking vs torchreid's algorithm | {small_queries}x{small_gallery} | "
                f"{torch.get_num_threads()} | {fast_time:.3f} | {slow_time:.3f} | "
                f"{slow_time / fast_time:.1f}x | {difference:.1e} |\n")
    return difference < 1e-5, rows


def bench_case(name, similarity, query_ids, gallery_ids, args):
    """Time both implementations on one case, print the result; returns a markdown row."""
    num_queries, num_gallery = similarity.shape
    compute_reid_metrics(similarity[:8], query_ids[:8], gallery_ids)  # one-off torch start-up
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        fast = compute_reid_metrics(similarity, query_ids, gallery_ids, chunk_size=args.chunk_size)
        times.append(time.perf_counter() - start)
    fast_time = min(times)

    loop_queries = min(args.loop_queries or num_queries, num_queries)
    sub_sim, sub_ids = similarity[:loop_queries].numpy(), query_ids[:loop_queries]
    start = time.perf_counter()
    slow = reference_metrics_loop(sub_sim, sub_ids, gallery_ids)
    loop_time = (time.perf_counter() - start) * num_queries / loop_queries
    # Compare on the query subset the loop saw.
    fast_sub = compute_reid_metrics(sub_sim, sub_ids, gallery_ids, chunk_size=args.chunk_size)
    max_diff = max(max(abs(fast_sub[k] - slow[k]) for k in ("mAP", "mINP")),
                   float(np.abs(np.subtract(fast_sub["cmc"], slow["cmc"])).max()))
    agree = max_diff < 1e-6 and fast_sub["num_valid_queries"] == slow["num_valid_queries"]

    extrapolated = (f" (measured on {loop_queries} queries, extrapolated)"
                    if loop_queries < num_queries else "")
    print(f"\n[{name}] rank1 {fast['rank1']:.2f}  rank5 {fast['rank5']:.2f}  "
          f"rank10 {fast['rank10']:.2f}  mAP {fast['mAP']:.2f}  mINP {fast['mINP']:.2f}")
    print(f"  vectorised: {fast_time:.3f} s (best of {args.repeats})")
    print(f"  loop reference: {loop_time:.3f} s{extrapolated}")
    print(f"  speed-up: {loop_time / fast_time:.1f}x")
    print(f"  agreement: max |diff| {max_diff:.1e} percentage points -> "
          f"{'OK' if agree else 'MISMATCH'}")
    row = (f"| {name} | {num_queries}x{num_gallery} | {fast['mAP']:.1f} | "
           f"{torch.get_num_threads()} | {fast_time:.3f} | {loop_time:.3f}"
           f"{' (extrapolated)' if extrapolated else ''} | {loop_time / fast_time:.1f}x | "
           f"{max_diff:.1e} |\n")
    return agree, row


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3368)
    parser.add_argument("--gallery", type=int, default=15913)
    parser.add_argument("--ids", type=int, default=751, help="query identities")
    parser.add_argument("--distractor-ids", type=int, default=750,
                        help="gallery-only identities")
    parser.add_argument("--noise", type=float, default=0.13,
                        help="feature noise of the informative case (0.13: mAP about 80%%)")
    parser.add_argument("--case", choices=("informative", "uninformative", "both"),
                        default="both")
    parser.add_argument("--loop-queries", type=int, default=None,
                        help="run the loop reference on the first N queries only and extrapolate "
                             "its time to all queries (default: all)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of the vectorised code (best is reported)")
    parser.add_argument("--chunk-size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: like the single-threaded loop, and "
                             "steady on a busy machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--forensic", choices=("on", "off"), default="on",
                        help="also time verification, open-set and re-ranking (default on)")
    parser.add_argument("--dim", type=int, default=512,
                        help="feature size of the re-ranking case (CLIP ViT-B/16: 512)")
    parser.add_argument("--rerank-full", action="store_true",
                        help="also re-rank the full --queries x --gallery case (~10 s, 1.3 GB)")
    parser.add_argument("--rerank-reference-size", type=int, nargs=2, default=(200, 800),
                        metavar=("Q", "G"), help="case for re-ranking against the loop "
                        "reference (default: %(default)s)")
    parser.add_argument("--out", type=Path, help="markdown file to append result rows to")
    args = parser.parse_args()
    if args.gallery < args.ids or min(args.queries, args.repeats, args.threads) < 1:
        raise UserError("need --gallery >= --ids and --queries, --repeats, --threads >= 1")
    torch.set_num_threads(args.threads)

    print(f"{args.queries} queries x {args.gallery} gallery, {args.ids} query identities "
          f"+ {args.distractor_ids} distractor identities, torch threads "
          f"{torch.get_num_threads()}")
    cases = {"informative": args.noise, "uninformative": None}
    results = [bench_case(name, *market_like_case(args.queries, args.gallery, args.ids,
                                                  args.distractor_ids, noise, args.seed), args)
               for name, noise in cases.items() if args.case in (name, "both")]
    forensic_ok, forensic_rows = bench_forensic(args) if args.forensic == "on" else (True, [])
    if args.out:
        header = ("Metrics (compute_reid_metrics) against a per-query loop with torchreid's "
                  "semantics:\n\n| case | size | mAP % | threads | vectorised s | loop s | "
                  "speed-up | max diff |\n|---|---|---|---|---|---|---|---|\n")
        existing = args.out.read_text() if args.out.exists() else header
        text = existing + "".join(row for _, row in results)
        if forensic_rows:
            text += ("\n| forensic metric | size | threads | vectorised s | reference s | "
                     "speed-up | max diff |\n|---|---|---|---|---|---|---|\n"
                     + "".join(forensic_rows))
        atomic_write_text(args.out, text)
    return 0 if all(agree for agree, _ in results) and forensic_ok else 1


if __name__ == "__main__":
    run_cli(main)
