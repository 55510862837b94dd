"""The features file (features.npz) that extract_features.py writes and search.py reads.

It holds: features (float32 [N, D], L2-normalised), paths (absolute), identities ('' where
the layout has none), and model, a JSON string describing what made them (see
encoder.describe_model), whose fingerprint search.py compares with its own model's.
"""
import json
import zipfile

import numpy as np

from handreid.core.atomic_files import atomic_write
from handreid.core.errors import UserError
from handreid.evaluation.protocol import check_finite

EXPORT_COMMAND = "python experiments/extract_features.py --config <eval config>"
# What np.load raises for a file that is no .npz of ours (not a zip, truncated, keys missing).
UNREADABLE_NPZ = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def save_features(path, features, paths, identities, description):
    """Write features.npz atomically (a kill mid-write leaves no partial file)."""
    arrays = {"features": np.asarray(features, dtype=np.float32),
              "paths": np.array(paths, dtype=str), "identities": np.array(identities, dtype=str),
              "model": np.array(json.dumps(description, sort_keys=True))}
    atomic_write(path, lambda handle: np.savez(handle, **arrays))


def load_features(path):
    """-> (features, paths, identities, description) of a features.npz written here."""
    try:
        with np.load(path, allow_pickle=False) as data:
            features, paths = data["features"], data["paths"].tolist()
            identities, description = data["identities"].tolist(), json.loads(str(data["model"]))
    except UNREADABLE_NPZ as err:
        raise UserError(f"{path} is not a features file of this project ({type(err).__name__}); "
                        f"make one with {EXPORT_COMMAND} --images <dir> --out {path}") from None
    check_finite(features, paths.__getitem__, f"{path} was made by a broken model; make it "
                 f"again with a sound checkpoint: {EXPORT_COMMAND}")
    return features, paths, identities, description
