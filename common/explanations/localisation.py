"""Does a heatmap point at the lesion? Two scores per image and the value a random map gets.

All three take maps of one image frame (H, W): `heatmap` (float), `lesion_mask` (bool, the annotated lesion
pixels, e.g. mini-MIAS circles mapped into the frame) and optionally `breast_mask` (bool). The region R is the
breast when `breast_mask` is given, else the whole frame; L is the lesion inside R (L = lesion_mask & R).

- `pointing_game` (Zhang et al. 2016, without their 15-pixel tolerance): the map's maximum over R lies in L.
  When several pixels share the maximum (a map drawn cell by cell), the pointed pixel is the maximal pixel
  nearest the centroid of all maximal pixels (the centre of a maximal cell; first in row-major order on equal
  distance). Signs do not matter (an all-negative occlusion map still points at its largest value); a map
  constant over R (an all-zero Grad-CAM) points nowhere: a miss.
- `mass_inside`: the share of the positive attribution in R that lies in L: sum over L of max(h, 0) divided by
  the sum over R of max(h, 0); 0 when R holds no positive attribution.
- `random_baseline`: |L| / |R|, the lesion's share of the region. For a map of independent, identically
  distributed values (continuous, so no ties; positive for the mass) it is the hit probability of the pointing
  game and, by exchangeability, the expected mass inside: a method helps only above it.
"""

from __future__ import annotations

import numpy as np


def _region(heatmap: np.ndarray, lesion_mask: np.ndarray,
            breast_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    heatmap = np.asarray(heatmap, dtype=np.float64)
    lesion = np.asarray(lesion_mask, dtype=bool)
    region = np.ones_like(lesion) if breast_mask is None else np.asarray(breast_mask, dtype=bool)
    if not heatmap.shape == lesion.shape == region.shape:
        raise ValueError(f"shapes differ: heatmap {heatmap.shape}, lesion_mask {lesion.shape}, "
                         f"breast_mask {region.shape}")
    if heatmap.ndim != 2:
        raise ValueError(f"expected 2-D maps of one image, got shape {heatmap.shape}")
    if np.isnan(heatmap[region]).any():
        raise ValueError("heatmap has NaN values in the region")
    return heatmap, lesion & region, region


def pointing_game(heatmap: np.ndarray, lesion_mask: np.ndarray, breast_mask: np.ndarray | None = None) -> bool:
    """True when the map's maximum over the breast (or frame) lies in the lesion; see the module doc for ties."""
    heatmap, lesion, region = _region(heatmap, lesion_mask, breast_mask)
    if not region.any():
        return False
    values = heatmap[region]
    top = values.max()
    if top == values.min():
        return False
    rows, cols = np.nonzero(region & (heatmap == top))
    distance = (rows - rows.mean()) ** 2 + (cols - cols.mean()) ** 2
    pointed = int(np.argmin(distance))  # first minimum: row-major order, as np.nonzero lists pixels
    return bool(lesion[rows[pointed], cols[pointed]])


def mass_inside(heatmap: np.ndarray, lesion_mask: np.ndarray, breast_mask: np.ndarray | None = None) -> float:
    """Share of the positive attribution over the breast (or frame) that lies in the lesion, in [0, 1]."""
    heatmap, lesion, region = _region(heatmap, lesion_mask, breast_mask)
    positive = np.where(region, np.maximum(heatmap, 0.0), 0.0)
    total = positive.sum()
    return float(positive[lesion].sum() / total) if total > 0 else 0.0


def random_baseline(lesion_mask: np.ndarray, breast_mask: np.ndarray | None = None) -> float:
    """|lesion in region| / |region|: the expected pointing-game hit and mass inside of a random map."""
    lesion = np.asarray(lesion_mask, dtype=bool)
    _, lesion, region = _region(np.zeros(lesion.shape), lesion, breast_mask)
    return float(lesion.sum() / region.sum()) if region.any() else 0.0
