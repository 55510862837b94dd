"""Build or update the persistent index of a gallery folder, for search.py --index.

    python experiments/index_gallery.py --config <eval config> --gallery <dir> --index gallery_index.npz [--faiss {none,flat,ivf,hnsw}] [--rebuild]

The first run encodes every image under --gallery (identity = first sub-folder) with the
config's model and writes --index: features, paths, identities, the model's fingerprint and
feature/flip rule, and each file's size, mtime, inode and sha256. A later run with the same
--index (--gallery may then be left out) lists the folder again and encodes only what is new:
an unchanged file is recognised by its size, mtime and inode without being read; a file whose
stat changed is hashed, and re-encoded only if its content is new (a replaced file is; a
touched or moved one keeps its feature); removed files leave the index. An image that does
not decode is named on stderr and skipped, the rest is indexed. An index made by another model
or for another folder is refused: --rebuild re-encodes the gallery into it, or choose another
--index. The index file is written atomically: an interrupted run leaves the previous one.
One update of an index runs at a time: a second one started meanwhile stops with one line
naming the first (the OS lock on <index>.lock that training takes on <save_path>.lock).

Search (python experiments/search.py --config <eval config> --index <file> --query ...) is exact
(chunked top-k, as for a folder) unless the index has a faiss structure (--faiss, kept by later
updates; --faiss none removes it):
  flat  faiss' exact brute-force search (faiss.knn, as IndexFlatIP; equals the exact search
        but for the order of equal scores);
  ivf   IndexIVFFlat, approximate: --nlist lists (default ~sqrt(N)), --nprobe of them
        searched (default nlist/16, at least 8);
  hnsw  IndexHNSWFlat, approximate: --hnsw-m links per node (default 32), --ef-search
        (default 128); builds slowly, searches fast.
Whenever the structure is built (and after every update that changes the gallery), its
recall@10 against exact search is measured on the gallery's own features, printed and stored.
"""
import argparse
import os
from pathlib import Path

from handreid.core.startup import start

start()

from handreid.core.config_files import config_from_args, make_parser
from handreid.core.errors import run_cli, UserError
from handreid.core.runtime import run_lock
from handreid.search import gallery_index
from handreid.evaluation.encoder import Encoder
from handreid.search.topk import DEFAULT_CHUNK_SIZE, check_chunk_size

SETTING_ARGS = ("nlist", "nprobe", "hnsw_m", "ef_search")


def faiss_request(args, index):
    """-> (kind or None, requested settings) from the arguments, else as the index has them."""
    if args.faiss is None:
        stored = index.faiss if index else None
        requested = (stored or {}).get("requested", {})
        kind = stored and stored["kind"]
    else:
        kind = None if args.faiss == "none" else args.faiss
        requested = {}
    given = {key: getattr(args, key) for key in SETTING_ARGS if getattr(args, key) is not None}
    if given and kind is None:
        raise UserError(f"--{next(iter(given)).replace('_', '-')} sets a faiss structure; pass "
                        "--faiss ivf or --faiss hnsw with it")
    return kind, {**requested, **given}


def update_index(args, config):
    """Load (unless --rebuild), update and write --index; -> (index, summary, gallery folder,
    encoder)."""
    index = None
    if args.index.exists() and not args.rebuild:
        index = gallery_index.load_index(args.index)
    gallery = args.gallery or (index and Path(index.gallery))
    if gallery is None:
        raise UserError(f"--index {args.index} does not exist yet; pass --gallery <folder> to "
                        "build it")
    if index and index.gallery != os.path.abspath(gallery):
        raise UserError(f"{args.index} indexes the gallery {index.gallery}, not {gallery}; pass "
                        "--rebuild to index this folder into it, or another --index path")
    kind, requested = faiss_request(args, index)
    encoder = Encoder(config)
    if index:
        gallery_index.check_model(index, encoder.description, args.index,
                                  "pass --rebuild to re-encode the gallery with this model, or "
                                  "another --index path")
    built, summary = gallery_index.update(index, gallery, encoder)
    settings = kind and {**gallery_index.faiss_settings(kind, len(built.paths), **requested),
                         "requested": requested}
    stored = index and index.faiss and {k: v for k, v in index.faiss.items()
                                        if k not in ("recall", "build_seconds")}
    gallery_changed = index is None or summary["encoded"] or built.paths != index.paths
    if gallery_changed or settings != stored:
        built = gallery_index.with_faiss(built, settings, args.chunk_size)
        summary["modified"] = True
    if summary["modified"]:
        gallery_index.save_index(args.index, built)
    return built, summary, gallery, encoder


def main(argv=None):
    parser = make_parser(__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter  # the docstring as written
    parser.add_argument("--gallery", type=Path, default=None,
                        help="folder of gallery images, identity = first sub-folder (default "
                             "for an update: the folder the index was built for)")
    parser.add_argument("--index", required=True, type=Path, help="the index file to build or "
                                                                   "update (.npz)")
    parser.add_argument("--rebuild", action="store_true",
                        help="encode the whole gallery anew (e.g. with another model), "
                             "replacing --index")
    parser.add_argument("--faiss", choices=("none",) + gallery_index.FAISS_KINDS, default=None,
                        help="faiss structure serving the search (default: as the index has "
                             "it; a new index: none, i.e. exact chunked top-k)")
    parser.add_argument("--nlist", type=int, help="ivf: number of lists (default ~sqrt(N))")
    parser.add_argument("--nprobe", type=int,
                        help="ivf: lists searched per query (default nlist/16, at least 8)")
    parser.add_argument("--hnsw-m", type=int, help=f"hnsw: links per node (default "
                                                   f"{gallery_index.HNSW_M})")
    parser.add_argument("--ef-search", type=int, help=f"hnsw: search breadth (default "
                                                      f"{gallery_index.HNSW_EF_SEARCH})")
    parser.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                        help="gallery images per block of the exact search that recall is "
                             f"measured against (default: {DEFAULT_CHUNK_SIZE})")
    args = parser.parse_args(argv)
    check_chunk_size(args.chunk_size)
    config = config_from_args(args)
    # One update of an index at a time (the lock training takes): a second one would
    # encode the same images again and replace the first one's file.
    with run_lock(args.index, doing="updated", fix="choose another --index"):
        built, summary, gallery, encoder = update_index(args, config)
    identities = len(set(built.identities) - {""})
    print(f"{args.index}: {len(built.paths)} images of {identities} identities from {gallery}, "
          f"{len(summary['encoded'])} encoded ({summary['new']} new, {summary['changed']} "
          f"changed), {len(summary['removed'])} removed, {len(summary['skipped'])} skipped, "
          f"{summary['hashed']} hashed; model {config['model']} ({config['variant']}), "
          f"fingerprint {encoder.description['fingerprint'][:12]}, flip "
          f"{encoder.description['feature']['flip']}; search: "
          + (gallery_index.settings_text(built.faiss) if built.faiss else "exact")
          + ("" if summary["modified"] else "; index unchanged"))


if __name__ == "__main__":
    run_cli(main)
