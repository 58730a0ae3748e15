"""Local training and evaluation at a hospital: plain functions under the Flower handlers.

`train_local` runs one round of (DP-)SGD on the node's training set:
- DP on: Opacus `PrivacyEngine` with Poisson sampling, flat clipping at `max_grad_norm`, Gaussian noise
  `noise_multiplier`. The engine's accountant starts from `accountant_state` (the node's cumulative
  history, e.g. from its privacy ledger), so epsilon accumulates over rounds and runs instead of
  restarting with every new engine. An empty Poisson batch still takes a (noise-only) step: skipping it
  would make the output depend on the sampling outcome, and the accountant counts every step.
  `grad_sample_mode` picks how per-sample gradients are computed (hooks, functorch, ew, or ghost
  clipping, which never materialises them); all give the same DP guarantee.
- DP off (baselines): plain shuffled mini-batches, no clipping, no noise, epsilon None.
- FedProx (`proximal_mu > 0`): after every optimizer step the weights move by
  -lr * mu * (w - w_start), the gradient of (mu / 2) * ||w - w_start||^2; applied outside the DP
  gradient because it does not depend on data (adding it to the loss would be dropped by per-sample
  clipping, which only sees per-sample gradients).
The trained weights are those of the plain model (no Opacus `_module.` prefix); the model object is
updated in place and left free of Opacus hooks. `torch.set_num_threads` is the caller's business.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from client.console import quiet_known_notices
from common.evaluation import EvalOutcome, evaluate_model
from common.models.loss import lesion_aware_loss
from common.privacy import PrivacyAccountant
from common.training_config import DPConfig, LocalTrainConfig

__all__ = ["DPConfig", "DPPlan", "EvalOutcome", "LocalTrainConfig", "TrainOutcome", "evaluate_local",
           "plan_dp_round", "stream_seeds", "strip_module_prefix", "train_local"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainOutcome:
    """What one round of local training produced. Privacy fields are None when DP is off.

    steps: optimizer steps taken (with DP: accountant steps, empty Poisson batches included).
    epsilon: cumulative epsilon (all rounds in `accountant_state` plus this one) at `delta`,
        computed by the `accountant` mechanism.
    accountant_state: Opacus accountant state after this round (the input state, unchanged, with DP off).
    weights: the plain model's state dict (CPU copies, no `_module.` prefix).
    """

    num_examples: int
    train_loss: float
    steps: int
    epsilon: float | None
    delta: float | None
    accountant_state: dict[str, Any] | None
    noise_multiplier: float | None
    max_grad_norm: float | None
    sample_rate: float | None
    accountant: str | None
    weights: dict[str, torch.Tensor]
    expected_batch_size: int | None = None  # with DP: what Opacus divides the noised clipped sum by


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD steps a round will take, known before training (for budget checks)."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def plan_dp_round(num_examples: int, *, config: LocalTrainConfig) -> DPPlan:
    """Sample rate and step count `train_local` will use on `num_examples` examples (as Opacus derives
    them: rate = 1 / ceil(n / batch_size), ceil(n / batch_size) steps per epoch, capped by max_steps)."""
    if num_examples < 1:
        raise ValueError("no training examples")
    per_epoch = math.ceil(num_examples / config.batch_size)
    steps = per_epoch * config.epochs
    if config.max_steps is not None:
        steps = min(steps, config.max_steps)
    return DPPlan(config.dp.noise_multiplier, 1.0 / per_epoch, steps)


def strip_module_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """State dict keys without the `_module.` prefix(es) wrappers add."""
    out = {}
    for key, value in state.items():
        while key.startswith("_module."):
            key = key[len("_module."):]
        out[key] = value
    return out


def _optimizer(params: list[nn.Parameter], config: LocalTrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.learning_rate, momentum=config.momentum,
                           weight_decay=config.weight_decay)


def _generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def stream_seeds(seed: int | None) -> tuple[int | None, int | None]:
    """Independent seeds for the sampling stream and the noise stream of one training call.

    One seed for both would make the DP noise a function of the Poisson sampling draws; the two streams are
    spawned from `seed` with numpy's SeedSequence, so they are independent and still reproducible.
    """
    if seed is None:
        return None, None
    sampling, noise = (int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))
                       for child in np.random.SeedSequence(seed).spawn(2))
    return sampling, noise


def _empty_step(params: list[nn.Parameter], mode: str) -> None:
    """Gradients of an empty batch, so the optimizer still takes its noise-only step: zero per-sample rows
    (hooks, functorch, ew), or a zero clipped sum (ghost clipping)."""
    for p in params:
        if mode == "ghost":
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


class _LesionCriterion:
    """`lesion_aware_loss` as a criterion object, the form Opacus' ghost clipping wraps."""

    def __init__(self, cell_weight: float):
        self.cell_weight = cell_weight
        self.reduction = "mean"

    def __call__(self, outputs: tuple[torch.Tensor, torch.Tensor],
                 targets: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        per_example = lesion_aware_loss(*outputs, *targets, cell_weight=self.cell_weight)
        return per_example if self.reduction == "none" else per_example.mean()


def train_local(model: nn.Module, train_set: Dataset, *, config: LocalTrainConfig,
                accountant_state: dict[str, Any] | None, device: torch.device | str) -> TrainOutcome:
    """One round of local training on `train_set` ((inputs, label, cell_target) items); see module doc."""
    n = len(train_set)
    if n < 1:
        raise ValueError("no training examples")
    dp: DPConfig = config.dp
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params] if config.proximal_mu > 0 else None
    optimizer = _optimizer(params, config)
    sampling_seed, noise_seed = stream_seeds(None if dp.secure_mode else config.seed)
    loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=not dp.enabled,
                        generator=_generator(sampling_seed))
    train_model: nn.Module = model
    criterion = _LesionCriterion(config.cell_loss_weight)
    engine = None
    expected_batch_size = None
    if dp.enabled:
        quiet_known_notices()  # before Opacus warns about secure_mode (a knowing choice: DPConfig.secure_mode)
        engine = PrivacyEngine(accountant=dp.accountant, secure_mode=dp.secure_mode)
        prior = PrivacyAccountant.from_state_dict(accountant_state, mechanism=dp.accountant)
        engine.accountant.load_state_dict(prior.state_dict())  # carried over, not reset (DESIGN §5)
        private = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader, criterion=criterion,
            noise_multiplier=dp.noise_multiplier, max_grad_norm=dp.max_grad_norm,
            poisson_sampling=True, grad_sample_mode=dp.grad_sample_mode,
            noise_generator=_generator(noise_seed, device),
        )
        if dp.grad_sample_mode == "ghost":
            train_model, optimizer, criterion, loader = private
        else:
            train_model, optimizer, loader = private
        expected_batch_size = int(optimizer.expected_batch_size)
    plan = plan_dp_round(n, config=config)
    steps, loss_sum, seen = 0, 0.0, 0
    try:
        for _ in range(config.epochs):
            for batch in loader:
                if steps >= plan.steps:
                    break
                optimizer.zero_grad(set_to_none=True)
                if len(batch) == 0 or len(batch[0]) == 0:  # empty Poisson batch
                    _empty_step(params, dp.grad_sample_mode)
                else:
                    inputs, labels, cells = (t.to(device) for t in batch)
                    loss = criterion(train_model(inputs, return_cells=True), (labels, cells))
                    loss.backward()
                    loss_sum += float(loss.detach()) * len(labels)  # a mean, also under ghost clipping
                    seen += len(labels)
                optimizer.step()
                if start is not None:
                    with torch.no_grad():
                        for p, p0 in zip(params, start):
                            p.sub_(config.learning_rate * config.proximal_mu * (p - p0))
                steps += 1
    finally:
        optimizer.zero_grad(set_to_none=True)
        if engine is not None:
            train_model._close()  # remove Opacus hooks and per-sample attributes from `model`
    weights = {k: v.detach().cpu().clone() for k, v in strip_module_prefix(model.state_dict()).items()}
    train_loss = loss_sum / seen if seen else math.nan
    if engine is None:
        return TrainOutcome(n, train_loss, steps, None, None, accountant_state, None, None, None, None, weights)
    after = PrivacyAccountant.from_opacus(engine.accountant)
    epsilon = after.epsilon(dp.delta)
    log.info("local round: %d steps, epsilon %.3f (delta %g, %s)", steps, epsilon, dp.delta, dp.accountant)
    return TrainOutcome(n, train_loss, steps, epsilon, dp.delta, after.state_dict(), dp.noise_multiplier,
                        dp.max_grad_norm, plan.sample_rate, dp.accountant, weights, expected_batch_size)


def evaluate_local(model: nn.Module, dataset: Dataset, *, device: torch.device | str,
                   batch_size: int = 32) -> EvalOutcome:
    """Image-level loss and `classification_metrics` of `model` on the node's evaluation data."""
    return evaluate_model(model, dataset, device=device, batch_size=batch_size)
