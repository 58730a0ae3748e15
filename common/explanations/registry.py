"""The attribution methods by name, and one entry point for all of them.

| name                   | needs                                   | map (B, S, S)                          |
|------------------------|-----------------------------------------|----------------------------------------|
| `grad_cam`             | images or cached features (+ `size`)    | ReLU'd Grad-CAM on the head's input    |
| `integrated_gradients` | images (through the backbone)           | signed, black baseline                 |
| `occlusion`            | images (through the backbone)           | signed, black windows                  |
| `cell_scores`          | images or cached features (+ `size`)    | the model's cell probabilities         |
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn

from common.explanations.cell_scores import cell_score_map
from common.explanations.explainable import MALIGNANT, Target
from common.explanations.grad_cam import grad_cam
from common.explanations.integrated_gradients import integrated_gradients
from common.explanations.occlusion import occlusion

METHODS: Mapping[str, Callable[..., torch.Tensor]] = MappingProxyType({
    "grad_cam": grad_cam,
    "integrated_gradients": integrated_gradients,
    "occlusion": occlusion,
    "cell_scores": cell_score_map,
})


def explain(method: str, model: nn.Module, inputs: torch.Tensor, target: Target = MALIGNANT,
            **options) -> torch.Tensor:
    """(B, S, S) attribution map of `method` for class `target` (one class, or one per image); `model` comes from
    `common.explanations.explainable` (eval mode, no Opacus hooks); `options` go to the method."""
    if method not in METHODS:
        raise ValueError(f"unknown explanation method {method!r}; choose one of {tuple(METHODS)}")
    if model.training:
        raise ValueError("model is in training mode: pass it through common.explanations.explainable() first")
    return METHODS[method](model, inputs, target, **options)
