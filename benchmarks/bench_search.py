"""Benchmark gallery search: the dense stable sort search.py used before, gallery_search.top_k
(chunked matrix products + top-k) and faiss IndexFlatIP, at several gallery sizes.

    python benchmarks/bench_search.py [--sizes 10000 100000 1000000] [--queries 1000] [--out results.md]

Random L2-normalised 512-d features, top 10. Each (method, size) runs once in a fresh child
process, so its peak memory is its own: "+memory" is the child's peak resident memory minus
its peak after making the features (the search's extra memory). The dense sort is skipped
where its similarity and int64 index array would need more than --dense-limit-gib.
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from handreid.core.startup import start

start()

import torch

from handreid.core.errors import run_cli, UserError
from handreid.core.atomic_files import atomic_write_text
from handreid.search.topk import top_k

DIM, K = 512, 10
METHODS = ("dense stable sort", "chunked top-k", "faiss IndexFlatIP")


def features(count, seed):
    generator = torch.Generator().manual_seed(seed)
    out = torch.randn(count, DIM, generator=generator)
    return out.div_(out.norm(dim=1, keepdim=True)).numpy()  # in place: no second copy


def dense_sort(query, gallery):
    similarity = torch.from_numpy(query) @ torch.from_numpy(gallery).T
    order = torch.argsort(similarity, dim=1, descending=True, stable=True)[:, :K]
    return order.numpy()


def faiss_flat(query, gallery):
    import faiss
    index = faiss.IndexFlatIP(DIM)
    index.add(gallery)
    return index.search(query, K)[1]


def peak_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # KiB -> GiB


def one(method, size, queries):
    """Child process: time one search, print JSON."""
    query, gallery = features(queries, 0), features(size, 1)
    before = peak_gib()
    search = {"dense stable sort": dense_sort, "faiss IndexFlatIP": faiss_flat,
              "chunked top-k": lambda q, g: top_k(q, g, K)[1]}[method]
    start = time.perf_counter()
    order = search(query, gallery)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "extra_gib": max(0.0, peak_gib() - before),
                      "first": order[:, 0].tolist()}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dense-limit-gib", type=float, default=6.0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--one", nargs=2, metavar=("METHOD", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        return one(args.one[0], int(args.one[1]), args.queries)
    if min(args.sizes) < K or args.queries < 1:
        raise UserError(f"--sizes must be >= {K} and --queries >= 1")
    lines = [f"## Gallery search ({args.queries} queries, {DIM}-d, top {K}; one run each)", "",
             "| gallery | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for size in args.sizes:
        cells, firsts = [], []
        for method in METHODS:
            if method == "dense stable sort" and args.queries * size * 12 / 2 ** 30 \
                    > args.dense_limit_gib:
                cells.append(f"skipped (> {args.dense_limit_gib:g} GiB)")
                continue
            proc = subprocess.run([sys.executable, __file__, "--queries", str(args.queries),
                                   "--one", method, str(size)], capture_output=True, text=True)
            if proc.returncode:
                cells.append(f"failed ({proc.stderr.strip().splitlines()[-1][:60]})")
                continue
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            firsts.append(result["first"])
            cells.append(f"{result['seconds']:.2f} s, +{result['extra_gib']:.2f} GiB")
            print(f"{size} {method}: {cells[-1]}", flush=True)
        agree = all(f == firsts[0] for f in firsts)
        lines.append(f"| {size:,} | " + " | ".join(cells) + " |"
                     + ("" if agree else " (rank-1 differs!)"))
    lines += ["", "+GiB: the search's peak resident memory above the features'. The rank-1 "
              "results of the methods that ran agree unless marked."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        atomic_write_text(args.out, text)  # creates the folder


if __name__ == "__main__":
    run_cli(main)
