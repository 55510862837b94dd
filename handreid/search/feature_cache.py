"""Features by file content: each image file's sha256 -> its feature under one model, so an
image seen before, under any path, is not encoded again.

The gallery index reuses its own rows by these digests; search.py keeps a cache of the gallery
folders and lists it has searched, one file per model (<cache_dir>/<fingerprint[:16]>.npz:
digests, features, fingerprint), that only grows.
"""
import hashlib
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from handreid.core.atomic_files import atomic_write
from handreid.data.image_files import WORKERS
from handreid.search.feature_files import UNREADABLE_NPZ


def file_digest(path):
    """sha256 hex of the file; None if it cannot be read (e.g. removed since the scan)."""
    try:
        with open(path, "rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError:
        return None


def file_digests(paths):
    """file_digest of each path, in order (threads: hashing releases the GIL)."""
    with ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(file_digest, paths))


def cached_features(encoder, paths, cache_dir):
    """-> (features [N, D] of `paths`, number of distinct contents encoded, cache file): from
    the cache file of the encoder's model where the content was seen before; the rest is
    encoded and added to it (written atomically)."""
    fingerprint = encoder.description["fingerprint"]
    cache_path = cache_dir / f"{fingerprint[:16]}.npz"
    digests = file_digests(paths)
    cached = {}
    if cache_path.is_file():
        try:
            with np.load(cache_path, allow_pickle=False) as data:
                if str(data["fingerprint"]) == fingerprint:
                    cached = dict(zip(data["digests"].tolist(), data["features"]))
        except UNREADABLE_NPZ:
            print(f"warning: ignoring the unreadable gallery cache {cache_path}", file=sys.stderr)
    todo = sorted({d: p for p, d in zip(paths, digests) if d not in cached}.items())
    if todo:
        cached.update(zip([d for d, _ in todo], encoder.encode([p for _, p in todo])))
        arrays = {"digests": np.array(list(cached), dtype=str),
                  "features": np.stack(list(cached.values())).astype(np.float32),
                  "fingerprint": np.array(fingerprint)}
        atomic_write(cache_path, lambda handle: np.savez(handle, **arrays))
    return np.stack([cached[d] for d in digests]), len(todo), cache_path
