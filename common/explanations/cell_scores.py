"""The model's own explanation: its cell probabilities of one class, drawn on the image frame.

The classifier scores every cell of its G x G grid (softmax over classes per cell); the image logits pool the
most telling cells (`common.models.cell_classifier`). The map of class `target` is each cell's probability,
spread nearest over the cell's square of the S x S frame (`common.inference.cell_map_to_frame`, the same mapping
screening uses). Computable from cached features (the `CellClassifier` with `size`) or from images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from common.explanations.explainable import MALIGNANT, Target, as_model_inputs, as_target, frame_size
from common.inference import cell_map_to_frame


def cell_score_map(model: nn.Module, inputs: torch.Tensor, target: Target = MALIGNANT, *,
                   size: int | None = None) -> torch.Tensor:
    """(B, S, S) cell probabilities of class `target`; `model` from `explainable()` (see `grad_cam` for inputs)."""
    side = frame_size(model, inputs, size)
    with torch.no_grad():
        _, cells = model(as_model_inputs(model, inputs), return_cells=True)
    targets = as_target(target, len(inputs))
    index = torch.tensor([targets] * len(inputs) if isinstance(targets, int) else targets)
    probabilities = torch.softmax(cells.float(), dim=1)[torch.arange(len(inputs)), index].cpu().numpy()
    return torch.from_numpy(np.stack([cell_map_to_frame(p, side) for p in probabilities]))
