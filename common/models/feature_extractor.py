"""Frozen EfficientNet-Lite0 trunk: preprocessed grayscale image -> feature map, BatchNorm folded.

Input: (B, 1, S, S) float in [0, 1] (the preprocessed mammogram). The grey channel is replicated to RGB
and normalised with the ImageNet mean/std, then runs through the stem and blocks `0..i` (layer
"block<i>") or all blocks plus the 1x1 head conv (layer "head"). Every BatchNorm is folded into its
convolution with the ImageNet eval statistics, so the output equals the original network's activations
(up to float rounding) and no BatchNorm is left. All parameters are frozen; train and eval mode compute the same function (no dropout, no statistics).

`fingerprint` names the weights file digest, layer and normalisation: a feature cache keys on it.
"""

from __future__ import annotations

import functools
import hashlib

import torch
from torch import nn

from common.models.efficientnet_lite import (
    BLOCK_SPECS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    EfficientNetLite0,
    convert_block,
    fold_batchnorm,
    load_pretrained,
    weights_path,
)

HEAD_CHANNELS = 1280


def parse_layer(layer: str) -> int:
    """Number of blocks a layer name includes: "block<i>" -> i + 1, "head" -> all 16."""
    if layer == "head":
        return len(BLOCK_SPECS)
    if layer.startswith("block") and layer[5:].isdigit() and int(layer[5:]) < len(BLOCK_SPECS):
        return int(layer[5:]) + 1
    raise ValueError(f"unknown EfficientNet-Lite0 layer {layer!r}")


def layer_channels(layer: str) -> int:
    return HEAD_CHANNELS if layer == "head" else BLOCK_SPECS[parse_layer(layer) - 1].out_ch


def layer_stride(layer: str) -> int:
    stride = 2  # stem
    for spec in BLOCK_SPECS[: parse_layer(layer)]:
        stride *= spec.stride
    return stride


@functools.lru_cache(maxsize=1)
def weights_digest() -> str:
    return hashlib.sha256(weights_path().read_bytes()).hexdigest()


class FrozenFeatureExtractor(nn.Module):
    """(B, 1, S, S) in [0, 1] -> (B, C, ceil(S / stride), ceil(S / stride)) frozen features."""

    def __init__(self, layer: str = "head", base: EfficientNetLite0 | None = None):
        super().__init__()
        n_blocks = parse_layer(layer)
        base = base if base is not None else load_pretrained()
        self.layer = layer
        self.stem = fold_batchnorm(base._conv_stem, base._bn0)
        self.stem_act = nn.ReLU6(inplace=False)
        self.blocks = nn.ModuleList(convert_block(base._blocks[i], trainable=False) for i in range(n_blocks))
        if layer == "head":
            self.head = nn.Sequential(fold_batchnorm(base._conv_head, base._bn1), nn.ReLU6(inplace=False))
        else:
            self.head = nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.to(memory_format=torch.channels_last)  # ~1.6x faster on CPU than NCHW for this network
        self.eval()

    @property
    def out_channels(self) -> int:
        return layer_channels(self.layer)

    @property
    def stride(self) -> int:
        return layer_stride(self.layer)

    @property
    def fingerprint(self) -> str:
        return f"efficientnet-lite0:{weights_digest()[:16]}:{self.layer}:gray3-imagenet-norm:v1"

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 3:
            images = images.unsqueeze(1)
        x = (images.float().expand(-1, 3, -1, -1) - self.mean) / self.std
        x = self.stem_act(self.stem(x.contiguous(memory_format=torch.channels_last)))
        for block in self.blocks:
            x = block(x)
        return self.head(x).contiguous()
