"""Training loss of the lesion-aware models, one value per example.

loss_i = CE(image_logits_i, label_i) + cell_weight * cell_loss_i

cell_loss_i balances lesion and normal cells of image i: the mean cross-entropy over its cells with a
target > 0 and the mean over its cells with target 0, averaged when both exist (cells with -1 are
ignored; an image with no known cell contributes only the image term). Per-example values keep the
batch loss a mean of independent terms, which DP-SGD (per-sample clipping) and the FedAvg check need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lesion_aware_loss(image_logits: torch.Tensor, cell_logits: torch.Tensor, labels: torch.Tensor,
                      cell_targets: torch.Tensor, *, cell_weight: float = 1.0) -> torch.Tensor:
    """(B,) per-example loss; cell_logits (B, K, H, W), cell_targets (B, H, W) with -1 = unknown."""
    image_term = F.cross_entropy(image_logits, labels.long(), reduction="none")
    if cell_weight == 0:
        return image_term
    targets = cell_targets.long()
    if targets.shape[1:] != cell_logits.shape[2:]:
        raise ValueError(f"cell targets {tuple(targets.shape[1:])} do not match the model's cell grid "
                         f"{tuple(cell_logits.shape[2:])}")
    ce = F.cross_entropy(cell_logits, targets.clamp(min=0), reduction="none")  # (B, H, W)
    lesion = (targets > 0).flatten(1).to(ce.dtype)
    normal = (targets == 0).flatten(1).to(ce.dtype)
    ce = ce.flatten(1)
    n_lesion, n_normal = lesion.sum(1), normal.sum(1)
    lesion_mean = (ce * lesion).sum(1) / n_lesion.clamp(min=1)
    normal_mean = (ce * normal).sum(1) / n_normal.clamp(min=1)
    both = (n_lesion > 0) & (n_normal > 0)
    cell_term = torch.where(both, 0.5 * (lesion_mean + normal_mean), lesion_mean + normal_mean)
    return image_term + cell_weight * cell_term
