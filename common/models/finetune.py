"""Trainable tail of EfficientNet-Lite0 for partial fine-tuning under DP.

Blocks `first..15` and the 1x1 head conv keep their ImageNet weights; each BatchNorm becomes a GroupNorm
whose affine parameters start from the BatchNorm's (the function changes: GroupNorm normalises per
image, which per-sample gradients need). Input: the output of the frozen block `first - 1`
(see `FrozenFeatureExtractor(layer=f"block{first - 1}")`); output: (B, 1280, H, W) after ReLU6.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.efficientnet_lite import BLOCK_SPECS, convert_block, groupnorm_from_batchnorm, load_pretrained
from common.models.feature_extractor import HEAD_CHANNELS


class EfficientNetTail(nn.Module):
    def __init__(self, first: int, *, groups: int = 8):
        super().__init__()
        if not 1 <= first < len(BLOCK_SPECS):
            raise ValueError(f"first trainable block must be in 1..{len(BLOCK_SPECS) - 1}")
        base = load_pretrained()
        self.first = first
        self.in_channels = BLOCK_SPECS[first].in_ch
        self.blocks = nn.ModuleList(
            convert_block(base._blocks[i], trainable=True, groups=groups) for i in range(first, len(BLOCK_SPECS))
        )
        self.head_conv = base._conv_head
        self.head_norm = groupnorm_from_batchnorm(base._bn1, groups)
        self.head_act = nn.ReLU6(inplace=False)
        self.out_channels = HEAD_CHANNELS
        for p in self.parameters():
            p.requires_grad_(True)
        self.train()  # the pretrained network was loaded in eval mode; a new module starts in train mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.head_act(self.head_norm(self.head_conv(x)))
