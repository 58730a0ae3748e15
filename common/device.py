"""Where torch work runs: the caller decides; this picks a sensible default."""

from __future__ import annotations

import torch


def default_device() -> torch.device:
    """CUDA when a GPU is visible, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
