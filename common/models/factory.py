"""Build the trainable model, its frozen input stage and the image -> logits pipeline for a config.

Per kind, what a training example's `inputs` is and what the trainable model (`build_model`) eats:

| kind            | frozen input stage (`build_feature_extractor`) | inputs per image (S = 512)  |
|-----------------|-------------------------------------------------|-----------------------------|
| cnn             | none                                            | (1, S, S) image in [0, 1]   |
| effnet_head     | EfficientNet-Lite0 up to `feature_layer`        | (192, S/32, S/32), block14  |
| effnet_finetune | EfficientNet-Lite0 blocks 0..finetune_from-1    | (192, S/32, S/32), from 15  |

`prepare_inputs` applies the frozen stage to images (hospitals cache its output); `InferenceModel`
chains both for screening and explanations: (B, 1, S, S) preprocessed image -> (B, 3) logits.
Only the trainable model's weights are exchanged; the frozen stage is rebuilt from the shipped weights.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from common.models import cnn
from common.models.cell_classifier import CellClassifier, CellHead
from common.models.config import ModelConfig
from common.models.feature_extractor import FrozenFeatureExtractor, layer_channels, layer_stride
from common.models.finetune import EfficientNetTail


def model_stride(config: ModelConfig) -> int:
    """Pixels of the model-size image per cell side."""
    if config.kind == "effnet_head":
        return layer_stride(config.feature_layer)
    return cnn.STRIDE if config.kind == "cnn" else 32


def cell_grid(config: ModelConfig) -> int:
    """Cells per side of the model's cell grid."""
    return math.ceil(config.image_size / model_stride(config))


def build_model(config: ModelConfig) -> nn.Module:
    """The trainable model (a `CellClassifier`): `forward(inputs) -> (B, num_classes)` image logits,
    `forward(inputs, return_cells=True) -> (image logits, cell logits)`."""
    if config.kind == "cnn":
        body: nn.Module = cnn.SmallCNN(config.cnn_width, config.groupnorm_groups)
        channels = body.out_channels
    elif config.kind == "effnet_head":
        channels = layer_channels(config.feature_layer)
        body = nn.GroupNorm(1, channels, affine=False) if config.input_norm else nn.Identity()
    else:
        body = EfficientNetTail(config.finetune_from, groups=config.groupnorm_groups)
        channels = body.out_channels
    head = CellHead(channels, config.num_classes, hidden=config.head_hidden, groups=config.groupnorm_groups)
    return CellClassifier(body, head, top_k=config.top_k, pooling=config.pooling)


def build_feature_extractor(config: ModelConfig) -> FrozenFeatureExtractor | None:
    """The frozen stage whose output the model trains on (None for "cnn")."""
    layer = config.extractor_layer
    return None if layer is None else FrozenFeatureExtractor(layer)


def resize_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) or (B, 1, S, S) -> (B, 1, size, size) float32 (area/bilinear with antialias)."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    images = images.float()
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images


def prepare_inputs(images: torch.Tensor, config: ModelConfig,
                   extractor: FrozenFeatureExtractor | None = None) -> torch.Tensor:
    """Preprocessed images (B, [1,] S, S) in [0, 1] -> the trainable model's inputs (no gradient)."""
    x = resize_images(images, config.image_size)
    if config.extractor_layer is None:
        return x
    if extractor is None or extractor.layer != config.extractor_layer:
        raise ValueError(f"kind {config.kind!r} needs FrozenFeatureExtractor({config.extractor_layer!r})")
    with torch.no_grad():
        return extractor(x.to(next(extractor.parameters()).device))


class InferenceModel(nn.Module):
    """Preprocessed image (B, 1, S, S) -> image logits; frozen stage + trained model, differentiable
    with respect to the image (for attribution methods)."""

    def __init__(self, config: ModelConfig, model: nn.Module,
                 extractor: FrozenFeatureExtractor | None = None):
        super().__init__()
        self.config = config
        self.extractor = extractor if extractor is not None else build_feature_extractor(config)
        self.model = model

    def forward(self, images: torch.Tensor, return_cells: bool = False):
        x = resize_images(images, self.config.image_size)
        if self.extractor is not None:
            x = self.extractor(x)
        return self.model(x, return_cells=return_cells)
