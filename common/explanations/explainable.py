"""The model attribution methods run on: an eval-mode copy, free of Opacus wrapping and hooks.

`explainable(model)` never touches `model`: it deep-copies it, replaces every Opacus `GradSampleModule` in the
copy by the module it wraps (the state dict loses its `_module.` prefix), removes the hooks Opacus registered on
its submodules and the per-sample attributes it left on modules and parameters, clears gradients, freezes every
parameter (attribution differentiates with respect to inputs and layer outputs; no weight gradient is needed,
so none is computed) and switches to eval mode.

Attribution methods accept either

- a `common.models.InferenceModel`: (B, 1, S, S) preprocessed images in [0, 1] -> (B, 3) image logits, or
- the trained `CellClassifier` itself, fed its own inputs: the cached frozen features (B, C, G, G) of the
  EfficientNet kinds (hospitals cache them: Grad-CAM and the cell-score map need no pass through the backbone),
  or the images for the "cnn" kind.

`cell_classifier(model)` finds the trained classifier in either.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence

import torch
from opacus.grad_sample.gsm_base import AbstractGradSampleModule
from torch import nn

from common.models import CellClassifier, InferenceModel
from common.records import CLASS_NAMES

#: The class explained by default.
MALIGNANT = CLASS_NAMES.index("malignant")

# What Opacus leaves on modules and parameters while a model is wrapped (opacus/grad_sample/*.py).
_MODULE_ATTRIBUTES = ("activations", "max_batch_len", "autograd_grad_sample_hooks", "ft_compute_sample_grad")
_PARAMETER_ATTRIBUTES = ("grad_sample", "_forward_counter", "_current_grad_sample", "summed_grad", "ddp_hooks")


def cell_classifier(model: nn.Module) -> CellClassifier:
    """The trained cell classifier inside `model` (an `InferenceModel`, or the classifier itself)."""
    inner = model.model if isinstance(model, InferenceModel) else model
    if isinstance(inner, AbstractGradSampleModule):
        raise TypeError("model is wrapped by Opacus: pass it through explainable() first")
    if not isinstance(inner, CellClassifier):
        raise TypeError(f"expected an InferenceModel or a CellClassifier, got {type(model).__name__}")
    return inner


def explainable(model: nn.Module) -> nn.Module:
    """An eval-mode copy of `model` without Opacus wrapping or hooks, parameters frozen; see the module doc."""
    clone = _unwrap(copy.deepcopy(model))
    for module in clone.modules():
        _drop_opacus_hooks(module)
        for name in _MODULE_ATTRIBUTES:
            if name in module.__dict__:
                delattr(module, name)
    for parameter in clone.parameters():
        for name in _PARAMETER_ATTRIBUTES:
            if name in parameter.__dict__:
                delattr(parameter, name)
        parameter.grad = None
        parameter.requires_grad_(False)
    return clone.eval()


def _unwrap(module: nn.Module) -> nn.Module:
    while isinstance(module, AbstractGradSampleModule):
        module = module._module
    for name, child in list(module.named_children()):
        unwrapped = _unwrap(child)
        if unwrapped is not child:
            setattr(module, name, unwrapped)
    return module


def _drop_opacus_hooks(module: nn.Module) -> None:
    """Remove the hooks that call into an Opacus grad-sample module (others stay)."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
                  module._backward_pre_hooks):
        for key in [k for k, hook in hooks.items() if _is_opacus_hook(hook)]:
            del hooks[key]
            module._forward_hooks_with_kwargs.pop(key, None)
            module._forward_hooks_always_called.pop(key, None)
            module._forward_pre_hooks_with_kwargs.pop(key, None)
    if not module._backward_hooks:
        module._is_full_backward_hook = None


def _is_opacus_hook(hook) -> bool:
    while isinstance(hook, functools.partial):  # Opacus binds its backward hook with functools.partial
        hook = hook.func
    return isinstance(getattr(hook, "__self__", None), AbstractGradSampleModule)


def frame_size(model: nn.Module, inputs: torch.Tensor, size: int | None) -> int:
    """Side of the image frame maps are drawn in: the images' own side for an `InferenceModel` or a classifier fed
    images ("cnn" kind, one channel); for a classifier fed cached features, `size` (required)."""
    if isinstance(model, InferenceModel) or (size is None and inputs.shape[1] == 1):
        side = int(inputs.shape[-1])
        if size not in (None, side):
            raise ValueError(f"size {size} differs from the images' side {side}")
        return side
    if size is None:
        raise ValueError("size (the image frame's side) is required when the inputs are cached features")
    return int(size)


def as_model_inputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Images (B, S, S) become (B, 1, S, S) for an `InferenceModel`; float32, detached."""
    inputs = inputs.detach().float()
    if isinstance(model, InferenceModel) and inputs.dim() == 3:
        inputs = inputs.unsqueeze(1)
    return inputs


Target = int | Sequence[int] | torch.Tensor


def as_target(target: Target, batch: int) -> int | list[int]:
    """One class index for the batch, or one per image (checked against the batch size)."""
    if isinstance(target, int):
        return target
    targets = [int(t) for t in (target.tolist() if isinstance(target, torch.Tensor) else target)]
    if len(targets) != batch:
        raise ValueError(f"{len(targets)} targets for {batch} images")
    return targets
