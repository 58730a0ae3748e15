"""Grad-CAM (Selvaraju et al. 2017) on the feature map the cell head sees, with Captum's `LayerGradCam`.

The layer is the trained classifier's `body`: for "effnet_head" the (standardised) frozen EfficientNet features,
for "effnet_finetune" the trainable tail's output, for "cnn" the CNN body's output; shape (B, C, G, G). Per image,
each channel's weight is the mean over cells of d(target logit) / d(feature); the map is ReLU(sum over channels
of weight x feature), (B, G, G), upsampled to the S x S image frame (bilinear, align_corners False, as Captum's
`LayerAttribution.interpolate`; "nearest" on request).

The body's output depends only on the frozen features, so the map is the same whether the model is given the
images (an `InferenceModel`) or the cached features (the `CellClassifier`, with `size`): hospitals that cache
features compute it without the backbone.
"""

from __future__ import annotations

import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from common.explanations.explainable import MALIGNANT, Target, as_model_inputs, as_target, cell_classifier, frame_size


def grad_cam(model: nn.Module, inputs: torch.Tensor, target: Target = MALIGNANT, *, size: int | None = None,
             upsample: str = "bilinear", relu: bool = True) -> torch.Tensor:
    """(B, S, S) ReLU'd Grad-CAM of class `target`'s image logit (`relu=False`: the signed map before the ReLU).

    `model`: from `explainable()`; an `InferenceModel` with images (B, 1, S, S), or the `CellClassifier` with its
    own inputs (cached features: give `size`, the image frame's side).
    """
    side = frame_size(model, inputs, size)
    inputs = as_model_inputs(model, inputs).requires_grad_(True)  # the graph must reach the body's output
    with torch.enable_grad():
        cam = LayerGradCam(model, cell_classifier(model).body).attribute(inputs, target=as_target(target, len(inputs)),
                                                                         relu_attributions=relu)
    return LayerAttribution.interpolate(cam.detach(), (side, side), interpolate_mode=upsample)[:, 0]
