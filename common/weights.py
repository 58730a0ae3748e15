"""What of a model travels between coordinator and hospitals: its trainable parameters and its buffers.

Keys are the plain model's ``state_dict`` keys (never Opacus' ``_module.`` prefix); frozen parameters (e.g. the
BatchNorm-folded pretrained layers of EfficientNet-Lite0) stay out of the exchange: every side builds them from
the installed pretrained weights with ``build_model``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

_OPACUS_PREFIX = "_module."


class WeightsError(ValueError):
    """Weights that do not fit the model (key names, missing keys or shapes in the message)."""


def exchanged_keys(model: torch.nn.Module) -> list[str]:
    """State-dict keys that travel: trainable parameters and buffers, in state-dict order."""
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return [k for k in model.state_dict() if k in trainable or k in buffers]


def exchanged_weights(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The travelling part of `model` as numpy arrays (copies, CPU)."""
    state = strip_prefix(model.state_dict())
    return {k: state[k].detach().cpu().numpy().copy() for k in exchanged_keys(_unwrap(model))}


def load_weights(model: torch.nn.Module, weights: Mapping[str, np.ndarray | torch.Tensor], *,
                 source: str = "weights") -> None:
    """Load travelling weights into a freshly built model: exactly the exchanged keys, same shapes."""
    model = _unwrap(model)
    state = model.state_dict()
    expected = set(exchanged_keys(model))
    got = set(weights)
    if got != expected:
        extra, missing = sorted(got - expected), sorted(expected - got)
        raise WeightsError(f"{source}: keys differ from the model's (unexpected {extra[:5]}, missing {missing[:5]})")
    tensors = {}
    for key, value in weights.items():
        tensor = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value, copy=True))
        if tuple(tensor.shape) != tuple(state[key].shape):
            raise WeightsError(f"{source}: '{key}' has shape {tuple(tensor.shape)}, model expects "
                               f"{tuple(state[key].shape)}")
        tensors[key] = tensor.to(dtype=state[key].dtype)
    model.load_state_dict(tensors, strict=False)


def strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict without Opacus' `_module.` prefix (unchanged where there is none)."""
    return {k[len(_OPACUS_PREFIX):] if k.startswith(_OPACUS_PREFIX) else k: v for k, v in state.items()}


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "_module", None)
    return inner if isinstance(inner, torch.nn.Module) else model
