"""Sanity check by model randomisation (Adebayo et al. 2018, "Sanity checks for saliency maps").

An explanation that still looks the same when the trained weights are replaced by random ones explains the
input, not the model. `randomised_head` re-draws the trained classifier's cell head (its layers' default
PyTorch initialisation, seeded) and leaves everything below it: the frozen backbone, and for "cnn" /
"effnet_finetune" the trained body. `model_randomisation_check` compares a method's maps of the trained model and
of the randomised-head model image by image with the Spearman rank correlation of their pixel values (signed
values, inside the breast when masks are given) and returns the mean over images: the report number. Near 1 =
the method ignores the head (it fails the check); near 0 or below = the map depends on what the model learned.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from common.explanations.explainable import MALIGNANT, Target, cell_classifier, explainable
from common.explanations.registry import explain


def randomised_head(model: nn.Module, seed: int = 0) -> nn.Module:
    """An `explainable()` copy of `model` whose cell head is re-initialised with `seed`; `model` is untouched."""
    clone = explainable(model)
    head = cell_classifier(clone).head
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for module in head.modules():
            if module is not head and hasattr(module, "reset_parameters"):
                module.reset_parameters()
    return clone


def rank_correlation(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Spearman rank correlation of two maps of the same shape (ties get their mean rank), over `mask`'s pixels
    when given; nan when either map is constant there."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"maps differ in shape: {a.shape} vs {b.shape}")
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        a, b = a[mask], b[mask]
    a, b = a.ravel(), b.ravel()
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(np.corrcoef(rankdata(a), rankdata(b))[0, 1])


def model_randomisation_check(method: str, model: nn.Module, inputs: torch.Tensor, target: Target = MALIGNANT, *,
                              seed: int = 0, masks: Sequence[np.ndarray] | None = None,
                              attributions: torch.Tensor | None = None, **options) -> float:
    """Mean over images of the rank correlation between `method`'s maps of `model` (from `explainable()`) and of
    its randomised-head copy; `attributions`: the trained model's maps when already computed (same order);
    `masks`: per-image pixels to compare (the breast); nan when no image gives a correlation."""
    if attributions is None:
        attributions = explain(method, model, inputs, target, **options)
    randomised = explain(method, randomised_head(model, seed), inputs, target, **options)
    correlations = [rank_correlation(a.numpy(), b.numpy(), None if masks is None else masks[i])
                    for i, (a, b) in enumerate(zip(attributions, randomised))]
    valid = [c for c in correlations if not np.isnan(c)]
    return float(np.mean(valid)) if valid else float("nan")
