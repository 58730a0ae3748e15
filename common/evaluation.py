"""Evaluate a model on a `(inputs, label, cell_target)` data set: loss and classification metrics.

Pure (no Flower, no files): hospitals use it for their validation split, a coordinator for a held-out
test set in simulation. The loss is the image-level cross-entropy (the same number at every site,
whatever annotations a site has).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.metrics import classification_metrics
from common.operating_point import ScoreHistogram


@dataclass(frozen=True)
class EvalOutcome:
    """num_examples; loss = mean image cross-entropy (NaN when empty); metrics of `classification_metrics`
    (values None where undefined; empty dict when there is no example); the score histogram that operating
    points and curves are computed from (``common.operating_point``)."""

    num_examples: int
    loss: float
    metrics: dict[str, Any]
    score_histogram: ScoreHistogram = field(default_factory=ScoreHistogram.empty)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def _predict_logits(model: nn.Module, dataset: Dataset, device: torch.device | str,
                    batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    model.to(device).eval()
    labels, logits = [], []
    for inputs, label, _ in _loader(dataset, batch_size):
        logits.append(model(inputs.to(device)).float().cpu())
        labels.append(torch.as_tensor(label).long())
    if not labels:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(labels), torch.cat(logits)


def predict_proba(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
                  batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), class probabilities (N, K)) in data set order; the model is left in eval mode."""
    labels, logits = _predict_logits(model, dataset, device, batch_size)
    return labels.numpy(), F.softmax(logits, dim=1).numpy() if len(labels) else np.zeros((0, 0))


def evaluate_model(model: nn.Module, dataset: Dataset, *, device: torch.device | str = "cpu",
                   batch_size: int = 32) -> EvalOutcome:
    labels, logits = _predict_logits(model, dataset, device, batch_size)
    if len(labels) == 0:
        return EvalOutcome(num_examples=0, loss=math.nan, metrics={})
    loss = float(F.cross_entropy(logits, labels))
    probs = F.softmax(logits, dim=1).numpy()
    return EvalOutcome(num_examples=len(labels), loss=loss,
                       metrics=classification_metrics(labels.numpy(), probs),
                       score_histogram=ScoreHistogram.of(labels.numpy(), probs))
