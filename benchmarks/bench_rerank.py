"""Benchmark k-reciprocal re-ranking: metrics.reranking.rerank_k_reciprocal (nearest-neighbour lists,
sparse V) beside torchreid's algorithm on dense (Q+G)^2 matrices, and alone on a large gallery.

    python benchmarks/bench_rerank.py [--queries 1000] [--dense-gallery 10000]
                                      [--gallery 100000] [--out results.md]

Identity-clustered L2-normalised 512-d features (bench_metrics.market_like_case: every query
identity has images in the gallery, the rest of the gallery are distractor identities, about
ten images per identity), k1 20, k2 6, lambda 0.3. The dense side is
bench_metrics.reference_rerank, torchreid's re_ranking written out on dense numpy matrices (the
tests' yardstick). Each run is a fresh child process, so its peak memory is its own: "+GiB" is
the child's peak resident memory minus its peak after making the features. The dense and the
sparse result at --dense-gallery are compared entry by entry (max |diff|); mAP is that of the
cosine ranking and of the re-ranked one.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from handreid.core.startup import start

start()

import numpy as np
import torch

from handreid.core.errors import run_cli, UserError
from handreid.core.atomic_files import atomic_write_text
from reference_metrics import market_like_case, reference_rerank
from handreid.metrics.ranking import compute_reid_metrics
from handreid.metrics.reranking import rerank_k_reciprocal

K1, K2, LAMBDA, DIM = 20, 6, 0.3, 512
METHODS = ("dense (torchreid's algorithm)", "sparse (rerank_k_reciprocal)")


def case(queries, gallery):
    """Query and gallery features and identities: two queries per query identity, ~10 gallery
    images per identity, the rest distractor identities."""
    query_ids = max(1, queries // 2)
    identities = max(query_ids + 1, gallery // 10)
    return market_like_case(queries, gallery, query_ids, identities - query_ids, noise=0.09,
                            seed=0, dim=DIM, features=True)


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def one(method, queries, gallery, save):
    """Child process: re-rank once, save the distance, print JSON."""
    query, gallery_features, query_ids, gallery_ids = case(queries, gallery)
    before = peak_gib()
    start = time.perf_counter()
    if method == METHODS[0]:
        q, g = query.numpy(), gallery_features.numpy()
        distance = torch.from_numpy(reference_rerank(1 - q @ g.T, 1 - q @ q.T, 1 - g @ g.T,
                                                     K1, K2, LAMBDA))
    else:
        distance = rerank_k_reciprocal(query, gallery_features, K1, K2, LAMBDA)
    seconds = time.perf_counter() - start
    extra = max(0.0, peak_gib() - before)
    cosine = compute_reid_metrics(query @ gallery_features.T, query_ids, gallery_ids)["mAP"]
    reranked = compute_reid_metrics(-distance, query_ids, gallery_ids)["mAP"]
    if save:
        np.save(save, distance.numpy())
    print(json.dumps({"seconds": seconds, "extra_gib": extra, "map_cosine": cosine,
                      "map_reranked": reranked}))


def run_child(method, queries, gallery, save=None):
    command = [sys.executable, __file__, "--queries", str(queries), "--one", method, str(gallery)]
    proc = subprocess.run(command + (["--save", str(save)] if save else []),
                          capture_output=True, text=True)
    if proc.returncode:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:80]
        return None, f"failed ({tail})"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    return result, f"{result['seconds']:.1f} s, +{result['extra_gib']:.2f} GiB"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dense-gallery", type=int, default=10_000,
                        help="gallery size of the side-by-side run (0: skip it)")
    parser.add_argument("--gallery", type=int, default=100_000,
                        help="gallery size of the sparse-only run (0: skip it)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    parser.add_argument("--save", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(args.one[0], args.queries, int(args.one[1]), args.save)
    if args.queries < 2 or min(args.dense_gallery, args.gallery) < 0:
        raise UserError("--queries must be >= 2 and gallery sizes >= 0")
    lines = [f"## Re-ranking (k-reciprocal, k1 {K1}, k2 {K2}, lambda {LAMBDA}; {args.queries} "
             f"queries, {DIM}-d; one run each)", "",
             "| gallery | method | time, +memory | mAP cosine -> re-ranked | max diff vs dense |",
             "|---|---|---|---|---|"]
    agree = True
    if args.dense_gallery:
        with tempfile.TemporaryDirectory() as folder:
            saved = [Path(folder) / f"{i}.npy" for i in range(len(METHODS))]
            results = [run_child(method, args.queries, args.dense_gallery, path)
                       for method, path in zip(METHODS, saved)]
            difference = (float(np.abs(np.load(saved[0]) - np.load(saved[1])).max())
                          if all(result for result, _ in results) else None)
        agree = difference is not None and difference < 1e-5
        for method, (result, cell) in zip(METHODS, results):
            scores = (f"{result['map_cosine']:.2f} -> {result['map_reranked']:.2f}"
                      if result else "")
            lines.append(f"| {args.dense_gallery:,} | {method} | {cell} | {scores} | "
                         + (f"{difference:.1e}" if difference is not None and method == METHODS[1]
                            else "") + " |")
            print(lines[-1], flush=True)
    if args.gallery:
        result, cell = run_child(METHODS[1], args.queries, args.gallery)
        agree = agree and result is not None
        scores = f"{result['map_cosine']:.2f} -> {result['map_reranked']:.2f}" if result else ""
        lines.append(f"| {args.gallery:,} | {METHODS[1]} | {cell} | {scores} | |")
        print(lines[-1], flush=True)
    lines += ["", "+GiB: the run's peak resident memory above the features'. Time and memory "
              "grow as (Q + G)^2 for the dense algorithm; the sparse one's time grows as "
              "(Q + G)^2 (one pass of matrix products) and its memory as Q x G (the result)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)  # creates the folder
    return 0 if agree else 1


if __name__ == "__main__":
    run_cli(main)
