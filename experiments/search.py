"""Search a gallery for the identity of query images with a trained (or the baseline) model.

    python experiments/search.py --config <eval config> (--gallery <dir | features.npz> | --index <gallery index>) --query <image | dir> [--top-k 10] [--threshold T] [--chunk-size N] [--out DIR]

Prints, per query, the top-k gallery images with their identity (first sub-folder of the
gallery folder, or the identities stored in features.npz) and score (cosine similarity of the
L2-normalised features, 1 = same image). With --threshold T (e.g. the EER threshold of an
evaluation), a query whose best score is below T is reported as "no match in gallery".
The gallery is scored --chunk-size images at a time and only each query's top k are kept
(memory about queries x chunk size x 12 bytes, whatever the gallery's size); equal scores keep
gallery order.

Outputs in --out (default: <results_dir>/search): search.csv (query, rank, score, gallery
image, identities, match) and search_ranking.png (one row per query, first 100: query in blue,
then its top-k, green frame = the query's identity, red = another, grey = query identity
unknown). A re-run keeps the previous files as <name>.<their mtime>.<suffix>.
With --index (a gallery index from index_gallery.py) the gallery is read from the index as it
was last updated, and searched exactly or through its faiss structure; otherwise the features
of a gallery folder are cached in <out>/gallery_cache/, keyed by the model
fingerprint and each file's content, so a second search against the same (or a grown)
gallery encodes only the images it has not seen.
When the model has a calibration file (experiments/calibrate.py), each candidate also gets its
calibrated log10 likelihood ratio (printed and in search.csv's log10_lr column).
"""
import csv
import io
import sys
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.casework import likelihood_ratio
from handreid.core.atomic_files import atomic_write_text, keep_previous
from handreid.core.errors import check_writable, run_cli, UserError
from handreid.data.image_files import list_images
from handreid.evaluation.encoder import Encoder
from handreid.evaluation.plots import (OTHER_COLOUR, QUERY_COLOUR, SAME_COLOUR,
                                       save_ranking_grid, score_decimals)
from handreid.search import gallery_index
from handreid.search.feature_cache import cached_features
from handreid.search.feature_files import EXPORT_COMMAND, load_features
from handreid.search.topk import DEFAULT_CHUNK_SIZE, check_chunk_size, top_k

UNKNOWN_COLOUR = "#808080"
MAX_GRID_ROWS = 100
CSV_FIELDS = ["query", "query_identity", "rank", "score", "gallery", "gallery_identity", "match",
              "log10_lr"]


def load_gallery(encoder, gallery, out):
    """-> (features, paths, identities) of a gallery folder (cached) or a features.npz made by
    the same model."""
    if gallery.is_file() and gallery.suffix == ".npz":
        features, paths, identities, description = load_features(gallery)
        if description.get("fingerprint") != encoder.description["fingerprint"]:
            made = f"{description.get('model')} ({description.get('variant')}" + (
                f", checkpoint {description['checkpoint']['path']})"
                if description.get("checkpoint") else ")")
            raise UserError(f"{gallery} holds features of another model or feature definition "
                            f"({made}); re-export it with {EXPORT_COMMAND} (this config) or "
                            "pass the gallery folder")
        print(f"gallery: {len(paths)} images from {gallery}")
        return features, paths, identities
    items = list_images(gallery, "--gallery")
    paths = [p for p, _ in items]
    features, encoded, cache_path = cached_features(encoder, paths, out / "gallery_cache")
    print(f"gallery: {len(paths)} images, {len(paths) - encoded} features from the cache "
          f"{cache_path}, {encoded} encoded")
    return features, paths, [i for _, i in items]


def frame_colour(query_identity, gallery_identity):
    if not query_identity:
        return UNKNOWN_COLOUR
    return SAME_COLOUR if gallery_identity == query_identity else OTHER_COLOUR


def report(queries, gallery, scores, order, threshold, calibration=None):
    """Print the ranking of each query (with a calibration file, each candidate's log10 LR);
    -> (CSV rows, grid rows, number of matched queries)."""
    (query_paths, query_ids), (gallery_paths, gallery_ids) = queries, gallery
    csv_rows, grid_rows, matched = [], [], 0
    for q, (path, identity) in enumerate(zip(query_paths, query_ids)):
        best = float(scores[q, 0])
        found = threshold is None or best >= threshold
        matched += found
        print(f"\nquery {q + 1}/{len(query_paths)}: {path}"
              + (f" (identity {identity})" if identity else ""))
        if not found:
            print(f"  no match in gallery (best score {best:.4f} < threshold {threshold:.4f}); "
                  "closest:")
        print(f"  {'rank':>4}  {'score':>7}  " + ("log10 LR  " if calibration else "")
              + f"{'identity':<20} image")
        ranked = []
        decimals = score_decimals(scores[q].tolist())  # enough to tell candidates apart
        for r, (score, g) in enumerate(zip(scores[q].tolist(), order[q].tolist()), start=1):
            match = "" if threshold is None else "yes" if score >= threshold else "no"
            llr = float(calibration.llr(score)) if calibration else None
            print(f"  {r:>4}  {score:7.4f}  " + (f"{llr:+8.3f}  " if calibration else "")
                  + f"{gallery_ids[g] or '-':<20} {gallery_paths[g]}")
            csv_rows.append({"query": path, "query_identity": identity, "rank": r,
                             "score": f"{score:.6f}", "gallery": gallery_paths[g],
                             "gallery_identity": gallery_ids[g], "match": match,
                             "log10_lr": "" if llr is None else f"{llr:.4f}"})
            ranked.append((gallery_paths[g], frame_colour(identity, gallery_ids[g]),
                           f"{r}: {score:.{decimals}f}\n{gallery_ids[g]}"))
        grid_rows.append(((path, QUERY_COLOUR, ("query" if found else "no match") +
                           f"\n{identity}"), ranked))
    return csv_rows, grid_rows, matched


def write_outputs(out, csv_rows, grid_rows):
    """search.csv and search_ranking.png in `out`, earlier ones kept aside."""
    csv_path, png_path = out / "search.csv", out / "search_ranking.png"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(csv_rows)
    kept = [keep_previous(csv_path)]
    atomic_write_text(csv_path, buffer.getvalue())
    missing = [p for (q, _, _), ranked in grid_rows for p in [q] + [t[0] for t in ranked]
               if not Path(p).is_file()]
    if missing:
        print(f"warning: no ranking grid: {missing[0]} (and {len(missing) - 1} more) no longer "
              "exist; re-export the gallery features", file=sys.stderr)
    else:
        kept.append(keep_previous(png_path))
        save_ranking_grid(png_path, grid_rows[:MAX_GRID_ROWS])
    kept = [str(k) for k in kept if k]
    print(f"\nranking: {csv_path}" + ("" if missing else f", {png_path}")
          + (f" (previous kept as {', '.join(kept)})" if kept else ""))


def main(argv=None):
    parser = make_parser(__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gallery", type=Path,
                        help="a folder of gallery images (identity = first sub-folder) or a "
                             "features.npz from extract_features.py")
    source.add_argument("--index", type=Path, help="a gallery index from index_gallery.py "
                                                   "(searched as it was last updated)")
    parser.add_argument("--query", required=True, type=Path,
                        help="a query image, or a folder of them (identity = first sub-folder)")
    parser.add_argument("--top-k", type=int, default=10, help="gallery images shown per query "
                                                              "(default: 10)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="score under which a query has no match in the gallery (e.g. an "
                             "evaluation's EER threshold)")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="gallery images scored per block; memory is about queries x this "
                             f"x 12 bytes (default: {DEFAULT_CHUNK_SIZE})")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: <results_dir>/search)")
    args = parser.parse_args(argv)
    if args.top_k < 1:
        parser.error(f"--top-k must be >= 1, got {args.top_k}")
    check_chunk_size(args.chunk_size)
    config = config_from_args(args)
    out = args.out or Path(config["results_dir"]) / "search"
    check_writable(out / "search.csv")  # before any image is encoded
    if args.gallery and not args.gallery.exists():
        raise UserError(f"--gallery {args.gallery} does not exist; give a folder of images or a "
                        "features.npz")
    queries = list_images(args.query, "--query")
    encoder = Encoder(config)
    calibration_path = likelihood_ratio.calibration_path(config)
    calibration = likelihood_ratio.load_calibration(calibration_path, encoder.description) \
        if calibration_path.exists() else None
    if args.index:
        index = gallery_index.open_for_search(args.index, encoder.description)
        gallery_paths, gallery_ids, search = index.paths, index.identities, index.search
    else:
        gallery_features, gallery_paths, gallery_ids = load_gallery(encoder, args.gallery, out)
        search = lambda query, k, chunk: top_k(query, gallery_features, k, chunk)  # noqa: E731
    query_features = encoder.encode([p for p, _ in queries])
    scores, order = search(query_features, min(args.top_k, len(gallery_paths)), args.chunk_size)
    csv_rows, grid_rows, matched = report(
        ([p for p, _ in queries], [i for _, i in queries]), (gallery_paths, gallery_ids),
        scores, order, args.threshold, calibration)
    write_outputs(out, csv_rows, grid_rows)
    print(f"{len(queries)} queries" + ("" if args.threshold is None else
                                      f", {matched} with a match at threshold {args.threshold}")
          + (f"; log10 LR from {calibration_path}" if calibration else
             f"; no calibration at {calibration_path}, so no LRs"))


if __name__ == "__main__":
    run_cli(main)
