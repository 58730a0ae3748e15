"""Training/evaluation data sets: `(inputs, label, cell_target)` items for every model kind.

`inputs` is what `build_model(config)` eats (see `factory`), `label` an int in `CLASS_NAMES` order,
`cell_target` a (G, G) int64 tensor (-1 = unknown, see `cell_targets`). Plain torch Datasets, so the
same training functions serve simulation, deployment and baselines.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from common.models.cell_targets import cell_targets, circle_mask
from common.models.config import ModelConfig
from common.models.factory import cell_grid, prepare_inputs
from common.models.feature_extractor import FrozenFeatureExtractor
from common.records import LesionCircle


@dataclass(frozen=True)
class LabelledImage:
    """One preprocessed image and its supervision, all in preprocessed (S x S) coordinates.

    lesion_mask: True on lesion pixels (mapped circles or ROI masks); None = no annotation.
    breast_mask: True on breast tissue (from preprocessing); None = unknown.
    """

    image: np.ndarray
    label: int
    lesion_mask: np.ndarray | None = None
    breast_mask: np.ndarray | None = None


def mapped_lesion_mask(geometry, lesions: Sequence[LesionCircle] = (),
                       roi_mask: np.ndarray | None = None) -> np.ndarray | None:
    """Lesion pixels in the preprocessed frame from annotations in the original image's frame.

    `geometry`: the image's `common.preprocessing.Geometry`; `lesions`: circles in original pixels;
    `roi_mask`: boolean mask of the original image's shape. None when there is no annotation.
    """
    if not lesions and roi_mask is None:
        return None
    mask = circle_mask([geometry.map_circle(c) for c in lesions], (geometry.size, geometry.size))
    if roi_mask is not None:
        mask |= geometry.map_mask(np.asarray(roi_mask, dtype=bool))
    return mask


class CellDataset(Dataset):
    """Tensors in memory: inputs (N, ...), labels (N,), cell targets (N, G, G)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, cell_targets: torch.Tensor):
        if not len(inputs) == len(labels) == len(cell_targets):
            raise ValueError(f"lengths differ: {len(inputs)}, {len(labels)}, {len(cell_targets)}")
        self.inputs = inputs
        self.labels = labels.long()
        self.cell_targets = cell_targets.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        return self.inputs[index], int(self.labels[index]), self.cell_targets[index]


def targets_for(items: Sequence[LabelledImage], config: ModelConfig) -> torch.Tensor:
    grid = cell_grid(config)
    return torch.from_numpy(np.stack([
        cell_targets(item.label, grid=grid, lesion_mask=item.lesion_mask, breast_mask=item.breast_mask,
                     outside_lesion=config.outside_lesion, min_lesion_cover=config.min_lesion_cover)
        for item in items
    ])) if items else torch.empty((0, grid, grid), dtype=torch.long)


def compute_inputs(images: Sequence[np.ndarray], config: ModelConfig,
                   extractor: FrozenFeatureExtractor | None = None, *, batch_size: int = 8,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Model inputs of preprocessed images, batch by batch (frozen features for the effnet kinds)."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images[start:start + batch_size]]))
        out.append(prepare_inputs(batch, config, extractor).cpu().to(dtype))
    return torch.cat(out) if out else torch.empty(0)


def build_dataset(items: Sequence[LabelledImage], config: ModelConfig, *,
                  inputs: torch.Tensor | None = None,
                  extractor: FrozenFeatureExtractor | None = None) -> CellDataset:
    """Data set for `config` from labelled images; `inputs` (e.g. cached features, same order) skips
    computing them."""
    if inputs is None:
        inputs = compute_inputs([item.image for item in items], config, extractor)
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    return CellDataset(inputs, labels, targets_for(items, config))
