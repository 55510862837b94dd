"""Benchmark metrics.ranking.compute_reid_metrics against torchreid's python loop on a random
Market-1501-sized case (3368 queries x 15913 gallery images, 751 query identities).

    python benchmarks/bench_metrics.py [--loop-queries N] [--out results.md] [--rerank-full]

The references (benchmarks/reference_metrics.py) are also what the tests compare the vectorised
code with: torchreid's python `eval_market1501` as it runs (the goal: >= 100x faster), and a
lean per-query numpy loop with its semantics (no camera filtering), fast-reid's mINP and the
MBA-Net / CLIP-HandID trapezoid AP (about 12x faster than torchreid's); so are the per-pair
verification loop, the per-search open-set loop and torchreid's re-ranking written out loop by
loop. The forensic part times verification and open-set metrics on the full-size case, and
re-ranking against that loop reference on a smaller case (--rerank-full: also full size).
"""
import argparse
import resource
import time
from pathlib import Path

from handreid.core.startup import start

start()

import numpy as np
import torch

from handreid.core.errors import run_cli, UserError
from handreid.core.atomic_files import atomic_write_text
from reference_metrics import (market_like_case, reference_metrics_loop,
                               reference_rerank, torchreid_python_loop)
from handreid.metrics.ranking import compute_reid_metrics
from handreid.metrics.reranking import rerank_k_reciprocal
from handreid.metrics.verification import compute_open_set_metrics, compute_verification_metrics


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
    scale = num_queries / loop_queries  # per-query cost is even: a subset's time scales
    slow, lean_time = timed(reference_metrics_loop, sub_sim, sub_ids, gallery_ids)
    (torchreid_cmc, torchreid_map), torchreid_time = timed(torchreid_python_loop, sub_sim,
                                                           sub_ids, gallery_ids)
    lean_time, torchreid_time = lean_time * scale, torchreid_time * scale
    # Compare on the query subset the loops saw.
    fast_sub = compute_reid_metrics(sub_sim, sub_ids, gallery_ids, chunk_size=args.chunk_size)
    max_diff = max(max(abs(fast_sub[k] - slow[k]) for k in ("mAP", "mINP")),
                   float(np.abs(np.subtract(fast_sub["cmc"], slow["cmc"])).max()))
    agree = max_diff < 1e-6 and fast_sub["num_valid_queries"] == slow["num_valid_queries"]
    # torchreid returns its CMC curve in float32 and breaks ties arbitrarily.
    torchreid_diff = max(abs(fast_sub["mAP"] - 100 * torchreid_map),
                         float(np.abs(np.subtract(fast_sub["cmc"], 100 * torchreid_cmc)).max()))
    agree = agree and torchreid_diff < 1e-4

    extrapolated = (f" (measured on {loop_queries} queries, extrapolated)"
                    if loop_queries < num_queries else "")
    speed_up = torchreid_time / fast_time
    print(f"\n[{name}] rank1 {fast['rank1']:.2f}  rank5 {fast['rank5']:.2f}  "
          f"rank10 {fast['rank10']:.2f}  mAP {fast['mAP']:.2f}  mINP {fast['mINP']:.2f}")
    print(f"  vectorised: {fast_time:.3f} s (best of {args.repeats})")
    print(f"  torchreid's python loop: {torchreid_time:.3f} s{extrapolated}: {speed_up:.1f}x "
          f"(goal >= 100x: {'met' if speed_up >= 100 else 'NOT met'})")
    print(f"  lean numpy loop, same semantics: {lean_time:.3f} s: "
          f"{lean_time / fast_time:.1f}x")
    print(f"  agreement: max |diff| {max_diff:.1e} (lean loop), {torchreid_diff:.1e} "
          f"(torchreid) percentage points -> {'OK' if agree else 'MISMATCH'}")
    mark = " (extrapolated)" if extrapolated else ""
    row = (f"| {name} | {num_queries}x{num_gallery} | {fast['mAP']:.1f} | "
           f"{torch.get_num_threads()} | {fast_time:.3f} | {torchreid_time:.2f}{mark} | "
           f"{speed_up:.0f}x | {lean_time:.2f}{mark} | {lean_time / fast_time:.0f}x | "
           f"{max(max_diff, torchreid_diff):.1e} |\n")
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
                        help="run the loop references on the first N queries only and "
                             "extrapolate their times to all queries (default: all; torchreid's "
                             "loop takes about a minute per case on the full size)")
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
        header = ("Metrics (compute_reid_metrics) against torchreid's python eval_market1501 "
                  "loop and a lean numpy loop with its semantics:\n\n| case | size | mAP % | "
                  "threads | vectorised s | torchreid loop s | speed-up | lean loop s | "
                  "speed-up | max diff |\n|---|---|---|---|---|---|---|---|---|---|\n")
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
