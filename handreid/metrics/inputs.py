"""The checks every metric of a query x gallery similarity runs first: the matrix, the identity
labels under one vocabulary, NaN; and the error they raise (MetricInputError). Shared by
ranking.py and verification.py."""
import numpy as np
import torch

from handreid.core.errors import UserError


class MetricInputError(UserError, ValueError):
    """Inputs the metrics cannot be computed from (shapes, labels, no valid query).

    A UserError, so scripts print one line; a ValueError, so library callers can catch it as one.
    """


def _label_codes(query_ids, gallery_ids):
    """Integer codes of both label lists under one shared vocabulary (strings or ints)."""
    labels = []
    for name, ids in (("query_ids", query_ids), ("gallery_ids", gallery_ids)):
        if isinstance(ids, torch.Tensor):
            ids = ids.cpu()
        array = np.asarray(ids)
        if array.ndim != 1:
            raise MetricInputError(f"{name} must be a flat sequence of identity labels, got "
                                   f"shape {array.shape}")
        labels.append(array)
    query, gallery = labels
    # numpy would turn 1 and "1" into the same string: a silent match between different types.
    text = [array.dtype.kind in "USO" for array in labels if array.size]
    if len(set(text)) > 1:
        raise MetricInputError(f"query_ids ({query.dtype}) and gallery_ids ({gallery.dtype}) "
                               "hold different label types; pass identity names for both")
    vocabulary, codes = np.unique(np.concatenate([query, gallery]), return_inverse=True)
    codes = torch.from_numpy(codes.reshape(-1).astype(np.int64))
    return codes[:len(query)], codes[len(query):], len(vocabulary)


def prepare_scores(similarity, query_ids, gallery_ids):
    """Checked inputs -> (similarity as a float tensor, query codes, gallery codes, number of
    codes); the codes live on the similarity's device."""
    if not isinstance(similarity, torch.Tensor):
        # Through numpy: lists keep float64, and torch refuses negative strides.
        similarity = torch.from_numpy(np.ascontiguousarray(similarity))
    if similarity.ndim != 2:
        raise MetricInputError(f"similarity must be a [num_queries, num_gallery] matrix, got "
                               f"shape {tuple(similarity.shape)}")
    if similarity.is_complex() or similarity.dtype == torch.bool:
        raise MetricInputError(f"similarity must hold real numbers, got {similarity.dtype}")
    if not similarity.is_floating_point():
        similarity = similarity.to(torch.float64)  # exact for any realistic integer score
    num_queries, num_gallery = similarity.shape
    if num_queries == 0 or num_gallery == 0:
        raise MetricInputError(f"nothing to evaluate: {num_queries} queries x {num_gallery} "
                               "gallery images")
    query_codes, gallery_codes, num_codes = _label_codes(query_ids, gallery_ids)
    if len(query_codes) != num_queries or len(gallery_codes) != num_gallery:
        raise MetricInputError(f"similarity is {num_queries} x {num_gallery} but there are "
                               f"{len(query_codes)} query_ids and {len(gallery_codes)} gallery_ids")
    device = similarity.device
    return similarity, query_codes.to(device), gallery_codes.to(device), num_codes


def nan_error():
    return MetricInputError("similarity contains NaN (features with NaN or a zero vector?); "
                            "cannot rank the gallery")


def check_no_nan(values):
    if torch.isnan(values.amax()):  # amax propagates NaN: one pass, no mask
        raise nan_error()

