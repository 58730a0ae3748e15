"""Example-weighted averaging of model weights (the FedAvg update), framework-free.

The coordinator's strategy can be checked against this function: FedAvg's new global weights are
sum_k n_k * w_k / sum_k n_k, computed here in float64 and cast back to each tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

Array = TypeVar("Array", torch.Tensor, np.ndarray)


def _as_numpy(value: torch.Tensor | np.ndarray) -> np.ndarray:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)


def weighted_average(updates: Sequence[tuple[Mapping[str, Array], int]]) -> dict[str, Array]:
    """Average state dicts weighted by example counts.

    `updates` is a list of (state dict, number of examples). All state dicts need the same keys and
    shapes. Floating tensors are averaged; integer tensors (counters) must agree and are kept. The
    result has the type (torch or numpy) and dtype of the first update's values.
    """
    if not updates:
        raise ValueError("nothing to aggregate")
    total = sum(int(n) for _, n in updates)
    if total <= 0 or any(int(n) < 0 for _, n in updates):
        raise ValueError(f"example counts must be >= 0 with a positive total, got {[n for _, n in updates]}")
    reference = updates[0][0]
    for state, _ in updates[1:]:
        if set(state) != set(reference):
            raise ValueError(f"state dicts differ in keys: {sorted(set(state) ^ set(reference))}")
    result: dict[str, Array] = {}
    for key, ref_value in reference.items():
        arrays = [_as_numpy(state[key]) for state, _ in updates]
        if any(a.shape != arrays[0].shape for a in arrays):
            raise ValueError(f"{key}: shapes differ {[a.shape for a in arrays]}")
        if np.issubdtype(arrays[0].dtype, np.floating):
            mean = sum(a.astype(np.float64) * (int(n) / total) for a, (_, n) in zip(arrays, updates))
            mean = mean.astype(arrays[0].dtype)
        else:
            if any(not np.array_equal(a, arrays[0]) for a in arrays):
                raise ValueError(f"{key}: non-float values differ between updates")
            mean = arrays[0]
        if isinstance(ref_value, torch.Tensor):
            result[key] = torch.from_numpy(np.array(mean, copy=True)).to(ref_value.dtype)  # keeps 0-d shape
        else:
            result[key] = np.asarray(mean)
    return result
