"""Per-cell supervision from image labels and lesion annotations.

The model scores a grid of G x G cells over the preprocessed S x S image (cell side S / G). Targets, one
integer per cell, -1 = unknown (no loss):

- normal image: every cell 0 (normal).
- abnormal image with lesion pixels: a cell is a lesion cell, target = the image's class, when a lesion
  covers at least `min_lesion_cover` of it; the best-covered cell of every connected lesion region is a
  lesion cell in any case (lesions smaller than a cell still count). Cells touched by a lesion below the
  threshold are -1. Other cells are -1 (`outside_lesion="ignore"`) or 0 (`"normal"`).
- abnormal image without annotation: every cell -1 (the image-level loss still uses it).
- with a breast mask: cells with less than `min_breast_cover` breast tissue (background, padding) are 0
  in every image unless they are lesion cells.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from common.records import LesionCircle

UNKNOWN = -1
NORMAL = 0


def cell_coverage(mask: np.ndarray, grid: int) -> np.ndarray:
    """Fraction of each of the grid x grid cells covered by a boolean mask (S, S) -> (grid, grid)."""
    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]
    return F.adaptive_avg_pool2d(t, grid)[0, 0].numpy()


def circle_mask(circles: Iterable[LesionCircle], shape: tuple[int, int]) -> np.ndarray:
    """Boolean mask of the discs in an array of `shape`: pixel (row, col) is inside when
    (col - x)^2 + (row - y)^2 <= r^2 (pixel centres at integer coordinates, as `LesionCircle` and
    `Geometry.map_point` use). The pixel nearest a centre inside the array is always marked."""
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    mask = np.zeros(shape, dtype=bool)
    for c in circles:
        mask |= (cols - c.x) ** 2 + (rows - c.y) ** 2 <= c.r**2
        row, col = int(round(c.y)), int(round(c.x))
        if 0 <= row < shape[0] and 0 <= col < shape[1]:
            mask[row, col] = True
    return mask


def cell_targets(label: int, *, grid: int, lesion_mask: np.ndarray | None = None,
                 breast_mask: np.ndarray | None = None, outside_lesion: str = "ignore",
                 min_lesion_cover: float = 0.2, min_breast_cover: float = 0.05) -> np.ndarray:
    """(grid, grid) int64 cell targets for one image; see the module docstring."""
    if label < 0:
        return np.full((grid, grid), UNKNOWN, dtype=np.int64)
    if label == NORMAL:
        return np.full((grid, grid), NORMAL, dtype=np.int64)
    targets = np.full((grid, grid), UNKNOWN, dtype=np.int64)
    lesion = lesion_mask is not None and bool(np.any(lesion_mask))
    if lesion:
        if outside_lesion == "normal":
            targets[:] = NORMAL
        touched = cell_coverage(lesion_mask, grid) > 0
        positive = cell_coverage(lesion_mask, grid) >= min_lesion_cover
        regions, n_regions = ndimage.label(lesion_mask)
        for region in range(1, n_regions + 1):
            cover = cell_coverage(regions == region, grid)
            positive |= cover == cover.max()
    else:
        touched = positive = np.zeros((grid, grid), dtype=bool)
    if breast_mask is not None:
        targets[cell_coverage(breast_mask, grid) < min_breast_cover] = NORMAL
    targets[touched] = UNKNOWN
    targets[positive] = label
    return targets
