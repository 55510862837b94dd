"""A persistent gallery index: the features of a gallery folder, built once, updated
incrementally, searched exactly (topk.top_k) or through faiss.

The index file (an .npz written atomically) holds the features, the absolute paths, the
identities (first sub-folder of the gallery folder, '' for images directly in it), the
description of the model that made them (encoder.describe_model: its fingerprint, the
feature definition and the flip rule) and, per file, its size, mtime_ns, inode and sha256.

An update lists the folder and stats every file: a file whose (size, mtime_ns, inode) equals
the stored one keeps its feature without being read; only the others are hashed (sha256),
and of those only content not seen before is decoded and encoded (a touched or moved file
keeps its feature: feature_cache's content rule). A file modified within RACY_NS of the scan that recorded it is hashed
again at the next update, since a file system's mtime has a coarse tick and a same-size
rewrite in that tick would look unchanged (git's "racily clean" rule). Removed files leave
the index; an image that does not decode is named on stderr and skipped (the rest proceeds).

Search: exact by default; an index built with a faiss structure ("flat": faiss' exact brute-force search (faiss.knn, as IndexFlatIP);
"ivf": IndexIVFFlat; "hnsw": IndexHNSWFlat, both approximate) is searched through it. The
structure's recall@k against exact search is measured on the index's own features whenever
it is built, printed and stored.
"""
import json
import math
import os
import sys
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from handreid.core.atomic_files import atomic_write
from handreid.data.image_files import IMAGE_SUFFIXES, WORKERS, image_problem
from handreid.core.errors import UserError
from handreid.evaluation.protocol import check_finite
from handreid.search.feature_cache import file_digests
from handreid.search.topk import top_k

FORMAT_VERSION = 1
RACY_NS = 2 * 10 ** 9  # FAT's mtime tick; ext4/NTFS/APFS ticks are finer
FAISS_KINDS = ("flat", "ivf", "hnsw")
RECALL_K, RECALL_QUERIES = 10, 1000
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
INDEX_COMMAND = "python experiments/index_gallery.py --config <eval config>"
# What np.load raises for a file that is no index of ours (not a zip, truncated, keys missing).
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


@dataclass(frozen=True)
class GalleryIndex:
    features: np.ndarray  # float32 [N, D], L2-normalised
    paths: list           # absolute paths, sorted
    identities: list      # first sub-folder, '' where none
    stats: np.ndarray     # int64 [N, 3]: size, mtime_ns, inode
    digests: list         # sha256 hex of each file
    description: dict     # encoder.describe_model of the model that made them
    gallery: str          # the gallery folder (absolute)
    scanned_ns: int       # time.time_ns() when the scan that recorded the stats began
    faiss: dict = None    # {"kind", settings, "recall": {"k", "queries", "value"}} or None
    faiss_bytes: np.ndarray = None  # the serialized ivf / hnsw structure

    def search(self, query_features, k, chunk_size):
        """-> (scores [queries, k], gallery indices [queries, k]), best first: exact
        (topk.top_k, ties in gallery order) or through the index's faiss structure
        (queries it returns fewer than k results for are searched exactly)."""
        if not self.faiss:
            return top_k(query_features, self.features, k, chunk_size)
        query = np.ascontiguousarray(query_features, dtype=np.float32)
        if self.faiss["kind"] == "flat":  # faiss' brute-force search, on the features in place
            faiss = _faiss()
            scores, order = faiss.knn(query, np.ascontiguousarray(self.features), k,
                                      metric=faiss.METRIC_INNER_PRODUCT)
        else:
            scores, order = faiss_structure(self).search(query, k)
        short = (order < 0).any(axis=1)
        if short.any():
            scores[short], order[short] = top_k(query[short], self.features, k, chunk_size)
        return scores, order


def scan(folder):
    """[(absolute path, identity, (size, mtime_ns, inode))] of the images under `folder`
    (hidden files and folders left out), sorted by path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--gallery {folder} is not a folder; give the folder of gallery "
                        "images (identity = first sub-folder)")
    items = []
    for path in sorted(folder.rglob("*")):
        parts = path.relative_to(folder).parts
        if path.suffix.lower() not in IMAGE_SUFFIXES or any(p.startswith(".") for p in parts) \
                or not path.is_file():
            continue
        stat = path.stat()
        items.append((os.path.abspath(path), parts[0] if len(parts) > 1 else "",
                      (stat.st_size, stat.st_mtime_ns, stat.st_ino)))
    return items


def _threaded(function, items):
    with ThreadPoolExecutor(WORKERS) as pool:  # decoding releases the GIL
        return list(pool.map(function, items))


def update(index, folder, encoder):
    """-> (the index of `folder` now, summary dict): features of `index` (None: build anew)
    reused where the file (or its content elsewhere) is unchanged, the rest encoded with
    `encoder` (an evaluation.encoder.Encoder of the index's model). Prints what it skipped."""
    scanned_ns = time.time_ns()
    items = scan(folder)
    old = {} if index is None else {p: i for i, p in enumerate(index.paths)}
    by_digest = {} if index is None else {d: i for i, d in enumerate(index.digests)}
    same = [None] * len(items)  # row of the old index whose feature the item keeps
    to_hash = []
    for n, (path, _, stat) in enumerate(items):
        row = old.get(path)
        if row is not None and tuple(index.stats[row]) == stat \
                and stat[1] < index.scanned_ns - RACY_NS:
            same[n] = row
        else:
            to_hash.append(n)
    digests = [None if row is None else index.digests[row] for row in same]
    for n, digest in zip(to_hash, file_digests([items[n][0] for n in to_hash])):
        digests[n] = digest
        if digest is not None and digest in by_digest:
            same[n] = by_digest[digest]
    to_encode = [n for n in range(len(items)) if same[n] is None]
    unreadable = _threaded(image_problem, [items[n][0] for n in to_encode])
    skipped = [f"{items[n][0]} ({bad})" for n, bad in zip(to_encode, unreadable) if bad]
    if skipped:
        print(f"warning: skipped {len(skipped)} gallery images that do not decode (replace or "
              f"remove them, then update the index again): {', '.join(skipped)}",
              file=sys.stderr)
    to_encode = [n for n, bad in zip(to_encode, unreadable) if not bad]
    encoding = set(to_encode)
    keep = [n for n in range(len(items)) if same[n] is not None or n in encoding]
    if not keep:
        raise UserError(f"--gallery {folder} holds no readable image "
                        f"({', '.join(IMAGE_SUFFIXES)}); give the folder of gallery images")
    encoded = encoder.encode([items[n][0] for n in to_encode]) if to_encode else None
    dim = encoded.shape[1] if encoded is not None else index.features.shape[1]
    features = np.empty((len(keep), dim), dtype=np.float32)
    source = np.array([-1 if n in encoding else same[n] for n in keep], dtype=np.int64)
    if encoded is not None:
        features[source < 0] = encoded  # to_encode is in `keep`'s order
    if index is not None:
        features[source >= 0] = index.features[source[source >= 0]]
    kept_paths = {items[n][0] for n in keep}
    summary = {"encoded": [items[n][0] for n in to_encode],
               "new": sum(items[n][0] not in old for n in to_encode),
               "hashed": len(to_hash), "skipped": skipped,
               "removed": sorted(p for p in old if p not in kept_paths)}
    summary["changed"] = len(to_encode) - summary["new"]
    built = GalleryIndex(
        features=features, paths=[items[n][0] for n in keep],
        identities=[items[n][1] for n in keep],
        stats=np.array([items[n][2] for n in keep], dtype=np.int64).reshape(-1, 3),
        digests=[digests[n] for n in keep], description=encoder.description,
        gallery=os.path.abspath(folder), scanned_ns=scanned_ns,
        faiss=index and index.faiss, faiss_bytes=index and index.faiss_bytes)
    summary["modified"] = index is None or bool(to_encode or summary["removed"] or to_hash)
    return built, summary


def check_model(index, description, index_path, fix):
    """UserError unless `index` was made by the model `description` describes."""
    made, now = index.description["fingerprint"], description["fingerprint"]
    if made != now:
        by = index.description
        raise UserError(f"{index_path} was built with another model (fingerprint {made[:12]}: "
                        f"{by.get('model')} {by.get('variant')}, flip {by['feature']['flip']}); "
                        f"this config's model has fingerprint {now[:12]}; {fix}")


def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("faiss is not installed: pip install faiss-cpu (or faiss-gpu), or "
                        "index without --faiss for exact search") from None
    return faiss


def faiss_settings(kind, count, nlist=None, nprobe=None, hnsw_m=None, ef_search=None):
    """The settings of a faiss structure over `count` features, defaults filled in: IVF with
    nlist ~ sqrt(N) lists (at least 39 training points each, faiss' minimum) probing 1/16 of
    them (at least 8); HNSW with M=32 links, efConstruction 80, efSearch 128."""
    if kind == "ivf":
        nlist = nlist or max(1, min(round(math.sqrt(count)), count // 39))
        if not 1 <= nlist <= count:
            raise UserError(f"--nlist {nlist} must be in 1..{count} (the gallery size)")
        nprobe = nprobe or min(nlist, max(8, nlist // 16))
        if not 1 <= nprobe <= nlist:
            raise UserError(f"--nprobe {nprobe} must be in 1..{nlist} (--nlist)")
        return {"kind": kind, "nlist": nlist, "nprobe": nprobe}
    if kind == "hnsw":
        hnsw_m, ef_search = hnsw_m or HNSW_M, ef_search or HNSW_EF_SEARCH
        if hnsw_m < 2 or ef_search < 1:
            raise UserError(f"--hnsw-m must be >= 2 and --ef-search >= 1, got {hnsw_m} and "
                            f"{ef_search}")
        return {"kind": kind, "hnsw_m": hnsw_m, "ef_construction": HNSW_EF_CONSTRUCTION,
                "ef_search": ef_search}
    return {"kind": kind}


def faiss_structure(index, source="the gallery index"):
    """The stored ivf / hnsw faiss index serving `index` (from `source`, a file), with its
    search settings. An index file is trusted only as far as it is checked: the structure
    must be the kind its settings name, over exactly its features (count, size, inner
    product), or a search would return rows the index does not hold."""
    settings = index.faiss
    faiss = _faiss()
    try:
        structure = faiss.deserialize_index(index.faiss_bytes)  # of its own class
    except RuntimeError as err:  # faiss' own error for bytes it cannot read
        raise _not_an_index(source, f"its faiss structure does not load: "
                                    f"{str(err).splitlines()[0]}") from None
    kind = {"ivf": faiss.IndexIVFFlat, "hnsw": faiss.IndexHNSWFlat}[settings["kind"]]
    count, dim = index.features.shape
    if not isinstance(structure, kind) or structure.ntotal != count or structure.d != dim \
            or structure.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise _not_an_index(source, f"its faiss structure ({type(structure).__name__}, "
                                    f"{structure.ntotal} x {structure.d}) is not the "
                                    f"{settings['kind']} index of its {count} x {dim} features")
    if settings["kind"] == "ivf":
        structure.nprobe = settings["nprobe"]
    else:
        structure.hnsw.efSearch = settings["ef_search"]
    return structure


def _build_structure(features, settings):
    faiss = _faiss()
    dim = features.shape[1]
    if settings["kind"] == "ivf":
        structure = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, settings["nlist"],
                                       faiss.METRIC_INNER_PRODUCT)
        structure.train(features)
    else:
        structure = faiss.IndexHNSWFlat(dim, settings["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        structure.hnsw.efConstruction = settings["ef_construction"]
    structure.add(features)
    return faiss.serialize_index(structure)


def measure_recall(index, chunk_size):
    """recall@k of the index's search against exact search: up to RECALL_QUERIES of its own
    features (seeded sample) as queries, each query's own entry left out of both lists."""
    count = len(index.paths)
    k = min(RECALL_K, count - 1)
    if k < 1:
        return {"k": 0, "queries": 0, "value": None}
    rows = np.sort(np.random.default_rng(0).choice(count, min(count, RECALL_QUERIES),
                                                   replace=False))
    query = index.features[rows]
    _, exact = top_k(query, index.features, k + 1, chunk_size)
    _, found = index.search(query, k + 1, chunk_size)
    hits = sum(len(set(f[f != row]) & set(e[e != row][:k]))
               for row, e, f in zip(rows, exact, found))
    return {"k": k, "queries": len(rows), "value": hits / (k * len(rows))}


def with_faiss(index, settings, chunk_size):
    """`index` served by the faiss structure of `settings` (None: exact search), built anew
    and its recall@k measured (printed)."""
    if settings is None:
        return replace(index, faiss=None, faiss_bytes=None)
    blob = None
    if settings["kind"] != "flat":
        started = time.perf_counter()
        blob = _build_structure(np.ascontiguousarray(index.features), settings)
        settings = {**settings, "build_seconds": round(time.perf_counter() - started, 3)}
    served = replace(index, faiss=settings, faiss_bytes=blob)
    recall = measure_recall(served, chunk_size)
    print(f"faiss {settings_text(settings)}: recall@{recall['k']} against exact search "
          + (f"{recall['value']:.4f} ({recall['queries']} of the gallery's own features as "
             "queries, each one's own entry left out)" if recall["queries"] else
             "not measured (one image)"))
    return replace(served, faiss={**settings, "recall": recall})


def settings_text(settings):
    return settings["kind"] + "".join(f", {key} {settings[key]}" for key in
                                      ("nlist", "nprobe", "hnsw_m", "ef_search") if key in settings)


def save_index(path, index):
    """Write the index file atomically (a kill mid-write leaves the previous one intact)."""
    meta = {"format_version": FORMAT_VERSION, "gallery": index.gallery,
            "scanned_ns": index.scanned_ns, "faiss": index.faiss}
    arrays = {"features": index.features, "paths": np.array(index.paths, dtype=str),
              "identities": np.array(index.identities, dtype=str), "stats": index.stats,
              "digests": np.array(index.digests, dtype=str),
              "model": np.array(json.dumps(index.description, sort_keys=True)),
              "meta": np.array(json.dumps(meta, sort_keys=True)),
              "faiss_index": (index.faiss_bytes if index.faiss_bytes is not None
                              else np.zeros(0, dtype=np.uint8))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def _not_an_index(path, reason):
    return UserError(f"{path} is not a gallery index of this project ({reason}); build one "
                     f"with {INDEX_COMMAND} --gallery <folder> --index <file>, or pass "
                     f"--rebuild to replace it")


def _is_count(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _check_structure(index):
    """ValueError unless the arrays, model description and faiss settings of a loaded index
    fit together."""
    description = index.description
    if not isinstance(description, dict) or not isinstance(description.get("fingerprint"), str) \
            or not isinstance(description.get("feature"), dict):
        raise ValueError("no model description")
    features, count = index.features, len(index.paths)
    if features.dtype != np.float32 or features.ndim != 2 or features.shape[0] != count \
            or features.shape[1] < 1:
        raise ValueError(f"features {features.dtype} {features.shape} for {count} paths")
    if len(index.identities) != count or len(index.digests) != count \
            or index.stats.shape != (count, 3) or index.stats.dtype.kind != "i":
        raise ValueError("paths, identities, file stats and digests of different lengths")
    settings = index.faiss
    if settings is None:
        return
    kind = settings.get("kind") if isinstance(settings, dict) else None
    if kind not in FAISS_KINDS:
        raise ValueError(f"faiss kind {kind!r}")
    if kind == "ivf" and not (_is_count(settings.get("nlist"), 1, count) and
                              _is_count(settings.get("nprobe"), 1, settings["nlist"])):
        raise ValueError(f"ivf nlist {settings.get('nlist')!r}, nprobe "
                         f"{settings.get('nprobe')!r} for {count} features")
    if kind == "hnsw" and not (_is_count(settings.get("hnsw_m"), 2, 4096) and
                               _is_count(settings.get("ef_search"), 1, 1 << 20)):
        raise ValueError(f"hnsw M {settings.get('hnsw_m')!r}, efSearch "
                         f"{settings.get('ef_search')!r}")
    if (kind == "flat") != (index.faiss_bytes is None):
        raise ValueError(f"faiss {kind} with{'out' if index.faiss_bytes is None else ''} "
                         "its structure")


def load_index(path):
    """-> the GalleryIndex stored in `path` (UserError if it is not one, or its parts do not
    fit together; its features must be finite)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            version = meta.get("format_version") if isinstance(meta, dict) else None
            if version != FORMAT_VERSION:
                raise ValueError(f"format {version}")
            blob = data["faiss_index"]
            if blob.dtype != np.uint8 or blob.ndim != 1:
                raise ValueError(f"faiss structure {blob.dtype} {blob.shape}")
            index = GalleryIndex(
                features=data["features"], paths=data["paths"].tolist(),
                identities=data["identities"].tolist(), stats=data["stats"],
                digests=data["digests"].tolist(), description=json.loads(str(data["model"])),
                gallery=meta["gallery"], scanned_ns=meta["scanned_ns"], faiss=meta["faiss"],
                faiss_bytes=blob if len(blob) else None)
            _check_structure(index)
    except _UNREADABLE as err:
        raise _not_an_index(path, f"{type(err).__name__}: {err}") from None
    check_finite(index.features, index.paths.__getitem__,
                 f"the model that built {path} was broken; build it again with a sound "
                 f"checkpoint (--rebuild)")
    if index.faiss and index.faiss["kind"] != "flat":
        faiss_structure(index, path)  # checked now, before any search
    return index


def open_for_search(path, description):
    """The index in `path`, refused unless the model `description` describes made it."""
    if not Path(path).is_file():
        raise UserError(f"--index {path} does not exist; build it with {INDEX_COMMAND} "
                        f"--gallery <folder> --index {path}")
    index = load_index(path)
    check_model(index, description, path, f"index the gallery with this config: "
                f"{INDEX_COMMAND} --gallery <folder> --index <another file> (or --rebuild)")
    recall = (index.faiss or {}).get("recall", {})
    print(f"gallery: {len(index.paths)} images from the index {path} (folder {index.gallery}, "
          f"scanned {time.strftime('%Y-%m-%d %H:%M', time.localtime(index.scanned_ns / 1e9))}); "
          "search: " + (settings_text(index.faiss) if index.faiss else "exact")
          + (f", recall@{recall['k']} {recall['value']:.4f}" if recall.get("value") is not None
             else ""))
    return index
