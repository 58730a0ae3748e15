"""Lesion-aware classifier: a body produces a feature map, a 1x1 head scores every cell, top-k pooling
turns cell scores into image logits (a fully convolutional patch classifier in the spirit of Shen et al.
2019, "Deep learning to improve breast cancer detection on screening mammography").

Shapes: body output (B, C, H, W) -> cell logits (B, K, H, W) -> image logits (B, K), K classes in
`CLASS_NAMES` order (normal first).

Pooling (per image, so the loss stays a sum of per-example terms, as DP-SGD and the FedAvg check need):
- "classwise" (default): from cell log-probabilities, each abnormal class scores the mean of its top_k
  cells, "normal" the mean of its bottom_k cells (an image is as normal as its least normal cells). The
  image's malignancy then follows its most malignant-looking cells.
- "abnormal": each cell gets an abnormality score, logsumexp(abnormal logits) - normal logit; the image
  logits are the mean logit vectors of the top_k most abnormal cells.
README ("Model quality") compares the two on mini-MIAS.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.efficientnet_lite import groupnorm_groups


def topk_abnormal_pool(cell_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, K, H, W) cell logits -> (B, K) image logits: mean logits of the top_k most abnormal cells."""
    batch, classes = cell_logits.shape[:2]
    flat = cell_logits.reshape(batch, classes, -1)
    score = torch.logsumexp(flat[:, 1:], dim=1) - flat[:, 0]
    k = min(top_k, flat.shape[-1])
    index = score.topk(k, dim=1).indices  # (B, k)
    chosen = torch.gather(flat, 2, index.unsqueeze(1).expand(-1, classes, -1))
    return chosen.mean(dim=2)


def classwise_topk_pool(cell_logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(B, K, H, W) -> (B, K) image log-scores from cell log-probabilities: for each abnormal class the
    mean of its top_k cell log-probabilities, for "normal" the mean of its bottom_k (an image is as normal
    as its least normal cells)."""
    logp = torch.log_softmax(cell_logits, dim=1).flatten(2)
    k = min(top_k, logp.shape[-1])
    abnormal = logp[:, 1:].topk(k, dim=2).values.mean(dim=2)
    normal = -(-logp[:, :1]).topk(k, dim=2).values.mean(dim=2)
    return torch.cat([normal, abnormal], dim=1)


POOLINGS = {"abnormal": topk_abnormal_pool, "classwise": classwise_topk_pool}


class CellHead(nn.Module):
    """1x1 convolutions: (B, C, H, W) features -> (B, K, H, W) cell logits."""

    def __init__(self, in_channels: int, num_classes: int, *, hidden: int = 0, groups: int = 8):
        super().__init__()
        if hidden > 0:
            self.net = nn.Sequential(
                nn.Conv2d(in_channels, hidden, 1),
                nn.GroupNorm(groupnorm_groups(hidden, groups), hidden),
                nn.ReLU(inplace=False),
                nn.Conv2d(hidden, num_classes, 1),
            )
        else:
            self.net = nn.Conv2d(in_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CellClassifier(nn.Module):
    """body -> cell head -> top-k pooling. `forward(x)` returns image logits (B, K);
    `forward(x, return_cells=True)` returns (image logits, cell logits)."""

    def __init__(self, body: nn.Module, head: CellHead, *, top_k: int, pooling: str = "abnormal"):
        super().__init__()
        self.body = body
        self.head = head
        self.top_k = top_k
        self.pool = POOLINGS[pooling]

    def forward(self, x: torch.Tensor, return_cells: bool = False):
        cells = self.head(self.body(x.float()))
        image = self.pool(cells, self.top_k)
        return (image, cells) if return_cells else image
