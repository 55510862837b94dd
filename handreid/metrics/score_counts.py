"""Exact verification counts over a query x gallery similarity without copying its scores.

`verification_thresholds(similarity, query_codes, gallery_codes, rates)` gives what
verification.compute_verification_metrics needs (the EER threshold with its false-accept and
false-reject counts, and per FAR rate the impostor score to stay above) from two passes over
the float32 scores in row blocks, a two-level radix count: pass 1 counts genuine and impostor
scores per value of the high 16 bits of their order-preserving 32-bit key; pass 2 counts, only
inside the few high-bit bins where the answers lie, per full 32-bit key. Every count is exact
(ties included: equal floats share a key; -0.0 counts as +0.0). Extra memory: the blocks
(BLOCK_ELEMENTS entries at ~10 bytes) and 65536-entry count tables, whatever the similarity's
size.
"""
import torch

BLOCK_ELEMENTS = 1 << 22
_BINS = 1 << 16


def _keys(scores):
    """float32 -> int64 keys in 0..2^32-1 ordered as the floats (-0.0 as +0.0)."""
    bits = (scores.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) + (1 << 31)


def _float_of_key(key):
    bits = key - (1 << 31)
    bits = bits ^ 0x7FFFFFFF if bits < 0 else bits
    return float(torch.tensor([bits], dtype=torch.int32).view(torch.float32)[0])


def _blocks(similarity, query_codes, gallery_codes):
    """(keys, genuine mask) of each row block."""
    rows = max(1, BLOCK_ELEMENTS // similarity.shape[1])
    for start in range(0, len(similarity), rows):
        yield (_keys(similarity[start:start + rows]),
               query_codes[start:start + rows, None] == gallery_codes[None, :])


def _coarse_counts(similarity, query_codes, gallery_codes):
    genuine = torch.zeros(_BINS, dtype=torch.int64, device=similarity.device)
    impostor = torch.zeros_like(genuine)
    for keys, mask in _blocks(similarity, query_codes, gallery_codes):
        genuine += torch.bincount(keys[mask] >> 16, minlength=_BINS)
        impostor += torch.bincount(keys[~mask] >> 16, minlength=_BINS)
    return genuine.cpu(), impostor.cpu()


def _fine_counts(similarity, query_codes, gallery_codes, bins):
    """{bin: (genuine counts [65536], impostor counts [65536])} per low 16 bits."""
    slot = torch.full((_BINS,), -1, dtype=torch.int64, device=similarity.device)
    slot[torch.tensor(bins, device=slot.device)] = torch.arange(len(bins), device=slot.device)
    size = len(bins) * _BINS
    genuine = torch.zeros(size, dtype=torch.int64, device=similarity.device)
    impostor = torch.zeros_like(genuine)
    for keys, mask in _blocks(similarity, query_codes, gallery_codes):
        where = slot[keys >> 16]
        inside = where >= 0
        flat = where * _BINS + (keys & (_BINS - 1))
        genuine += torch.bincount(flat[inside & mask], minlength=size)
        impostor += torch.bincount(flat[inside & ~mask], minlength=size)
    genuine, impostor = genuine.cpu().view(-1, _BINS), impostor.cpu().view(-1, _BINS)
    return {b: (genuine[i], impostor[i]) for i, b in enumerate(bins)}


def verification_thresholds(similarity, query_codes, gallery_codes, allowed_false_accepts):
    """-> (eer threshold, false accepts and false rejects at it, n_genuine, n_impostor,
    {allowed: the number of genuine scores above the (allowed+1)-th highest impostor score}).

    Same rule as verification.py: the EER threshold is the observed score where FAR - FRR turns
    negative that minimises |FAR - FRR| (accepted: score >= t), the lower one on a tie."""
    coarse_gen, coarse_imp = _coarse_counts(similarity, query_codes, gallery_codes)
    n_gen, n_imp = int(coarse_gen.sum()), int(coarse_imp.sum())
    gen_below = coarse_gen.cumsum(0) - coarse_gen  # genuine scores in lower bins
    imp_from = n_imp - (coarse_imp.cumsum(0) - coarse_imp)  # impostor scores in this bin or up
    difference = imp_from * n_gen - gen_below * n_imp  # at each bin's lowest key
    nonempty = (coarse_gen + coarse_imp) > 0
    turn = int(torch.nonzero(nonempty & (difference >= 0)).max())
    later = torch.nonzero(nonempty[turn + 1:])
    after = turn + 1 + int(later[0]) if len(later) else None
    cuts = {}
    for allowed in allowed_false_accepts:  # the bin of the (allowed+1)-th highest impostor
        cuts[allowed] = int(torch.nonzero(imp_from >= allowed + 1).max())
    bins = sorted({turn, *cuts.values(), *([after] if after is not None else [])})
    fine = _fine_counts(similarity, query_codes, gallery_codes, bins)

    def observed(b):
        """(keys, false accepts, false rejects, difference) at each observed key of bin b."""
        gen, imp = fine[b]
        low = torch.nonzero(gen + imp).flatten()
        false_accepts = int(imp_from[b]) - (imp.cumsum(0) - imp)[low]
        false_rejects = int(gen_below[b]) + (gen.cumsum(0) - gen)[low]
        return (b * _BINS + low, false_accepts, false_rejects,
                false_accepts * n_gen - false_rejects * n_imp)

    keys, accepts, rejects, diffs = observed(turn)
    last = int(torch.nonzero(diffs >= 0).max())  # the last observed key with a difference >= 0
    chosen = (int(keys[last]), int(accepts[last]), int(rejects[last]))
    plus = int(diffs[last])
    if last + 1 < len(keys):
        below = (int(keys[last + 1]), int(accepts[last + 1]), int(rejects[last + 1]),
                 int(diffs[last + 1]))
    elif after is not None:
        k2, a2, r2, d2 = observed(after)
        below = (int(k2[0]), int(a2[0]), int(r2[0]), int(d2[0]))
    else:
        below = None
    # The difference falls strictly from one observed score to the next, so the lowest score
    # with the difference at `last` is `last` itself.
    if below is not None and -below[3] < plus:
        chosen = below[:3]
    tar = {}
    for allowed, b in cuts.items():
        gen, imp = fine[b]
        above_bin = int(imp_from[b]) - int(imp.sum())
        from_top = imp.flip(0).cumsum(0) + above_bin  # impostor scores >= each key, from top
        low = _BINS - 1 - int(torch.nonzero(from_top >= allowed + 1).min())
        genuine_above = n_gen - int(gen_below[b]) - int(gen[:low + 1].sum())
        tar[allowed] = genuine_above
    return _float_of_key(chosen[0]), chosen[1], chosen[2], n_gen, n_imp, tar
