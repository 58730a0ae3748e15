"""Integrated Gradients (Sundararajan et al. 2017) on the preprocessed image, with Captum's `IntegratedGradients`.

Attribution of pixel p: (x_p - x'_p) x the path integral of d(target logit) / d(x_p) along the straight line
from the baseline x' to the image x, approximated by Captum's Gauss-Legendre rule with `steps` points. The
baseline is the black image (0: background after preprocessing). The gradient runs through the whole model,
frozen backbone included, so it needs the images (an `InferenceModel`), never cached features; `steps` x B
passes are evaluated `internal_batch_size` at a time (memory). Summed over the input channel (one grey channel)
-> (B, S, S); signed (negative = evidence against the target).

Cost: `steps` forward and backward passes per image through the backbone (about 0.2 s each for
EfficientNet-Lite0 to block 14 at 512 px on one CPU thread, `internal_batch_size` 2; larger internal batches
were slower there).
"""

from __future__ import annotations

import torch
from captum.attr import IntegratedGradients
from torch import nn

from common.explanations.explainable import MALIGNANT, Target, as_model_inputs, as_target


def integrated_gradients(model: nn.Module, images: torch.Tensor, target: Target = MALIGNANT, *, steps: int = 32,
                         internal_batch_size: int | None = 8) -> torch.Tensor:
    """(B, S, S) Integrated Gradients of class `target`'s image logit with respect to the image, black baseline.

    `model`: from `explainable()`; an `InferenceModel` (or a classifier fed images, the "cnn" kind).
    """
    images = as_model_inputs(model, images)
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"expected images (B, 1, S, S), got {tuple(images.shape)}")
    with torch.enable_grad():
        attributions = IntegratedGradients(model).attribute(
            images, baselines=torch.zeros_like(images), target=as_target(target, len(images)), n_steps=steps,
            internal_batch_size=internal_batch_size)
    return attributions.detach().sum(dim=1)
