"""Compact GroupNorm CNN body trained end to end on the 1-channel preprocessed image.

(B, 1, S, S) -> (B, C, S/32, S/32): a 5x5 stride-2 stem, four 3x3 stride-2 stages and one 3x3
stride-1 conv, each followed by GroupNorm and ReLU (no BatchNorm, no in-place op). Receptive field
129 px, i.e. a 32-px cell sees its neighbourhood. Channels w, 2w, 4w, 8w, 8w, 8w for width w.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.efficientnet_lite import groupnorm_groups

STRIDE = 32


def _stage(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2),
        nn.GroupNorm(groupnorm_groups(out_ch, groups), out_ch),
        nn.ReLU(inplace=False),
    ]


class SmallCNN(nn.Module):
    def __init__(self, width: int = 16, groups: int = 8):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width, 8 * width]
        layers = _stage(1, chans[0], 5, 2, groups)
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += _stage(c_in, c_out, 3, 2, groups)
        layers += _stage(chans[-1], chans[-1], 3, 1, groups)
        self.layers = nn.Sequential(*layers)
        self.out_channels = chans[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
