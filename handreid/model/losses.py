"""Loss functions any method can use (cross-entropy comes from torch)."""
import torch
import torch.nn.functional as F


def batch_hard_triplet(features, labels, margin=0.3, soft_margin=False):
    """Batch-hard triplet loss (Hermans et al. 2017) on Euclidean distances of `features`:
    for each anchor, its farthest same-identity sample and its nearest other-identity sample.
    max(0, d_ap - d_an + margin), or log(1 + exp(d_ap - d_an)) with soft_margin. Anchors
    without a positive or a negative in the batch are left out (0 when none is left)."""
    features = features.float()
    squared = features.pow(2).sum(1)
    # Clamped before the square root: zero distances (an image and itself) get no gradient.
    distances = (squared[:, None] + squared[None, :] - 2 * features @ features.T) \
        .clamp_min(1e-12).sqrt()
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    positives, negatives = same & ~eye, ~same
    hardest_positive = distances.masked_fill(~positives, float("-inf")).amax(1)
    hardest_negative = distances.masked_fill(~negatives, float("inf")).amin(1)
    valid = positives.any(1) & negatives.any(1)
    gap = (hardest_positive - hardest_negative)[valid]
    if gap.numel() == 0:
        return features.sum() * 0.0  # keeps the graph: every rank runs the same backward
    if soft_margin:
        return F.softplus(gap).mean()
    return F.relu(gap + margin).mean()


def image_text_contrastive(anchors, candidates, anchor_labels, candidate_labels):
    """Supervised contrastive loss (Khosla et al. 2020) from each anchor to a set of candidates
    of the other modality (CLIP-ReID's image-to-text and text-to-image losses): minus the
    mean log-softmax over all candidates of the candidates sharing the anchor's label,
    averaged over the anchors. Similarities are raw dot products (temperature 1), as
    CLIP-ReID uses them; every anchor needs at least one candidate with its label."""
    log_prob = torch.log_softmax(anchors.float() @ candidates.float().T, dim=1)
    positive = (anchor_labels[:, None] == candidate_labels[None, :]).float()
    return -((log_prob * positive).sum(1) / positive.sum(1)).mean()
