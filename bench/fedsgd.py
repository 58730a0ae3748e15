"""FedSGD with DP-SGD at every hospital: one private step per hospital per round, equal-weight average.

Every round, each hospital k takes ONE DP-SGD step from the global weights on its own data, exactly what
`client.training.train_local` does with ``max_steps=1``: Poisson sampling at rate q = 1 / steps_per_epoch
(its expected batch ``ceil(n_k / steps_per_epoch)``), per-sample clipping at ``max_grad_norm``, Gaussian noise
of standard deviation ``noise_multiplier * max_grad_norm`` on the clipped sum, division by Opacus' expected batch
size ``int(n_k * q)``, one SGD step of ``learning_rate``. The new global weights are the plain mean of the
hospitals' weights (`common.aggregation.weighted_average` with weight 1 each: in distributed-noise mode the
coordinator must not learn the Poisson batch sizes, and with one step per round the mean of the weights is
the mean of the steps).

``noise_multiplier`` is each hospital's own share:

- local noise (`dp-mode` local): every hospital adds the full sigma of its epsilon target; the mean carries
  sigma / sqrt(n) relative to one hospital's step.
- distributed noise (over secure aggregation): every hospital adds sigma / sqrt(n); independent Gaussian
  shares sum to one Gaussian of standard deviation sigma * max_grad_norm, so the revealed SUM is exactly (in
  distribution) one DP-SGD step on the union of the hospitals' data, Poisson-sampled at rate q, with noise
  sigma: its epsilon is that of (sigma, q, rounds). One share alone gives a larger epsilon; it is private only
  while the coordinator sees nothing but the sum, and only with no dropouts (with t possible dropouts each
  share must be sigma / sqrt(n - t)).

Two engines compute the same thing:

- ``"train_local"``: the project's own code, one `train_local` call per hospital per round (a fresh Opacus
  engine and an epsilon computation per call: about 0.2 s each on one CPU thread, mostly the RDP epsilon).
- ``"fast"``: the same computation written out once per round: the sampled examples of all hospitals go
  through ONE forward/backward of the global model wrapped in an Opacus `GradSampleModule` (hooks, as
  `train_local`), and clipping, summing, noise and the SGD step follow Opacus' `DPOptimizer` line by line,
  per hospital. Every random number is drawn from the same generators in the same order as `train_local`
  does (the hospital's round seed split into a sampling and a noise seed by `client.training.stream_seeds`; the
  Poisson mask from the sampling generator, after the one draw a torch `DataLoader` iterator takes from it for its
  base seed; the noise from the noise generator, parameter by parameter), so both engines give the same weights up to
  floating-point rounding (per-sample gradients of a sum-reduced loss instead of Opacus' mean x batch size;
  one forward for all hospitals is exact because a DP model has no layer that mixes examples);
  ``tests/test_model_quality_bench.py`` checks this against `train_local`. Epsilon is computed once at the
  end from the same accountant history.

A hospital's round seed is `round_seed(seed, round, hospital)`; `torch.set_num_threads` is the caller's business.
``update_encoding`` passes each hospital's new weights through ``common.update_encoding`` (encoded against the
round's global weights, decoded) before the mean, as a ``dp-mode`` local federation with that run config does.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import Subset

from client.training import DPConfig, LocalTrainConfig, stream_seeds, train_local
from common.aggregation import weighted_average
from common.models import CellDataset
from common.models.loss import lesion_aware_loss
from common.privacy import PrivacyAccountant
from common.update_encoding import decode_update, encode_update

ENGINES = ("fast", "train_local")


@dataclass(frozen=True)
class FedSGDConfig:
    """Schedule and privacy of a FedSGD run; ``noise_multiplier`` is one hospital's share."""

    rounds: int
    steps_per_epoch: int
    learning_rate: float
    noise_multiplier: float
    max_grad_norm: float = 1.0
    cell_loss_weight: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    update_encoding: str = "float32"  # how each hospital's update travels (common.update_encoding)

    @property
    def sample_rate(self) -> float:
        """Each hospital's Poisson rate (as Opacus derives it from `site_batch_size`)."""
        return 1 / self.steps_per_epoch


@dataclass(frozen=True)
class FedSGDOutcome:
    """Per hospital: its accountant state and the epsilon of its own noise share after all rounds."""

    accountant_states: list[dict[str, Any]]
    epsilons: list[float]


def site_batch_size(num_examples: int, steps_per_epoch: int) -> int:
    """Expected batch size that makes Opacus' sample rate exactly 1 / steps_per_epoch on this many examples."""
    batch = math.ceil(num_examples / steps_per_epoch)
    if math.ceil(num_examples / batch) != steps_per_epoch:
        raise ValueError(f"{num_examples} examples cannot be cut into {steps_per_epoch} Poisson batches per "
                         f"epoch; use fewer steps per epoch or bigger hospitals")
    return batch


def round_seed(seed: int, round_number: int, site: int) -> int:
    """Seed of one hospital's step in one round (distinct for rounds < 1000 and hospitals < 1000)."""
    if not 0 <= round_number < 1000 or not 0 <= site < 1000:
        raise ValueError("round_seed supports at most 1000 rounds and 1000 hospitals")
    return seed * 1_000_000 + round_number * 1000 + site


def fedsgd(model: nn.Module, data: CellDataset, sites: Sequence[Sequence[int]], *, config: FedSGDConfig,
           seed: int, engine: str = "fast") -> FedSGDOutcome:
    """Train `model` (in place, on CPU) for `config.rounds` FedSGD rounds on `sites` (index lists into `data`)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}")
    if not sites or any(len(site) == 0 for site in sites):
        raise ValueError("every hospital needs examples")
    run = _train_local_rounds if engine == "train_local" else _fast_rounds
    return run(model, data, [list(site) for site in sites], config, seed)


def _local_config(config: FedSGDConfig, num_examples: int, seed: int) -> LocalTrainConfig:
    return LocalTrainConfig(
        epochs=1, batch_size=site_batch_size(num_examples, config.steps_per_epoch),
        learning_rate=config.learning_rate, max_steps=1, cell_loss_weight=config.cell_loss_weight, seed=seed,
        dp=DPConfig(noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                    delta=config.delta, accountant=config.accountant))


def _train_local_rounds(model: nn.Module, data: CellDataset, sites: list[list[int]], config: FedSGDConfig,
                        seed: int) -> FedSGDOutcome:
    subsets = [Subset(data, site) for site in sites]
    states: list[dict[str, Any] | None] = [None] * len(sites)
    epsilons = [0.0] * len(sites)
    for round_number in range(config.rounds):
        updates = []
        for k, subset in enumerate(subsets):
            local = copy.deepcopy(model)
            outcome = train_local(local, subset, config=_local_config(config, len(subset),
                                                                      round_seed(seed, round_number, k)),
                                  accountant_state=states[k], device="cpu")
            states[k], epsilons[k] = outcome.accountant_state, outcome.epsilon
            updates.append((through_the_wire(outcome.weights, model.state_dict(), config.update_encoding), 1))
        model.load_state_dict(weighted_average(updates), strict=False)
    return FedSGDOutcome([dict(s) for s in states], epsilons)


def _fast_rounds(model: nn.Module, data: CellDataset, sites: list[list[int]], config: FedSGDConfig,
                 seed: int) -> FedSGDOutcome:
    model.to("cpu").train()
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    rate = config.sample_rate
    expected = [int(len(site) * rate) for site in sites]  # Opacus: int(len(dataset) * sample_rate)
    for site in sites:
        site_batch_size(len(site), config.steps_per_epoch)
    index = [torch.tensor(site, dtype=torch.long) for site in sites]
    std = config.noise_multiplier * config.max_grad_norm if config.noise_multiplier > 0 else 0.0  # 0 x inf clip
    wrapped = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        for round_number in range(config.rounds):
            seeds = [round_seed(seed, round_number, k) for k in range(len(sites))]
            chosen = []
            streams = [stream_seeds(site_seed) for site_seed in seeds]  # (sampling, noise) as train_local
            for k, (sampling_seed, _) in enumerate(streams):
                sampler = torch.Generator().manual_seed(sampling_seed)
                torch.empty((), dtype=torch.int64).random_(generator=sampler)  # the DataLoader's base seed
                mask = torch.rand(len(sites[k]), generator=sampler) < rate  # Opacus' Poisson sampler
                chosen.append(index[k][mask.nonzero(as_tuple=False).reshape(-1)])
            summed = _clipped_sums(wrapped, params, data, chosen, config)
            start = {name: p.detach().clone() for name, p in zip(names, params)}
            updates = []
            for k, (_, noise_seed) in enumerate(streams):
                noise = torch.Generator().manual_seed(noise_seed)
                weights = dict(model.state_dict())
                for name, p, grad_sum in zip(names, params, summed[k]):
                    grad = grad_sum + torch.normal(mean=0, std=std, size=p.shape, generator=noise, dtype=p.dtype)
                    grad = grad / expected[k]
                    weights[name] = start[name] - config.learning_rate * grad
                weights = {key: value.detach().clone() for key, value in weights.items()}
                updates.append((through_the_wire(weights, start, config.update_encoding), 1))
            with torch.no_grad():
                model.load_state_dict(weighted_average(updates), strict=False)
    finally:
        for p in params:
            p.grad, p.grad_sample = None, None
        wrapped._close()
    if config.noise_multiplier == 0:  # no noise: no privacy guarantee to account for
        return FedSGDOutcome([{} for _ in sites], [math.inf] * len(sites))
    accountant = PrivacyAccountant(config.accountant)  # every hospital: the same (noise, rate, steps)
    accountant.step(noise_multiplier=config.noise_multiplier, sample_rate=rate, steps=config.rounds)
    epsilon = constant_epsilon(config.accountant, config.noise_multiplier, rate, config.rounds, config.delta)
    return FedSGDOutcome([accountant.state_dict() for _ in sites], [epsilon] * len(sites))


def through_the_wire(weights: dict[str, torch.Tensor], start: dict[str, torch.Tensor],
                     encoding: str) -> dict[str, torch.Tensor]:
    """A hospital's weights as the coordinator decodes them under run config ``update-encoding``: the floating
    weights that changed this round (keys of `start`) encoded against `start` and decoded; float32 is the identity."""
    if encoding == "float32":
        return weights
    keys = [k for k in start if k in weights and weights[k].is_floating_point()]
    reference = {k: start[k].detach().cpu().numpy() for k in keys}
    sent = encode_update({k: weights[k].detach().cpu().numpy() for k in keys}, reference, encoding)
    decoded = decode_update(sent, reference, encoding)
    return {**weights, **{k: torch.from_numpy(decoded[k]) for k in keys}}


@functools.lru_cache(maxsize=64)
def constant_epsilon(mechanism: str, noise_multiplier: float, sample_rate: float, steps: int,
                     delta: float) -> float:
    """`PrivacyAccountant`'s epsilon of one constant history (remembered: it costs about 0.2 s)."""
    return PrivacyAccountant(mechanism).epsilon_after(noise_multiplier=noise_multiplier, sample_rate=sample_rate,
                                                      steps=steps, delta=delta)


def _clipped_sums(wrapped: GradSampleModule, params: list[nn.Parameter], data: CellDataset,
                  chosen: list[torch.Tensor], config: FedSGDConfig) -> list[list[torch.Tensor]]:
    """Per hospital, per parameter: the sum of its sampled examples' gradients, each clipped to
    max_grad_norm (zeros for an empty batch), as Opacus' `DPOptimizer.clip_and_accumulate` computes it."""
    batch = torch.cat(chosen)
    sums = [[torch.zeros_like(p) for p in params] for _ in chosen]
    if len(batch) == 0:
        return sums
    for p in params:
        p.grad, p.grad_sample = None, None
    outputs = wrapped(data.inputs[batch], return_cells=True)
    loss = lesion_aware_loss(*outputs, data.labels[batch], data.cell_targets[batch],
                             cell_weight=config.cell_loss_weight)
    loss.sum().backward()
    grad_samples = [p.grad_sample.reshape(len(batch), *p.shape).to(p.dtype) for p in params]
    start = 0
    for k, site_batch in enumerate(chosen):
        stop = start + len(site_batch)
        if stop > start:
            per_param = [g[start:stop].reshape(stop - start, -1).norm(2, dim=-1) for g in grad_samples]
            norms = torch.stack(per_param, dim=1).norm(2, dim=1)
            factor = (config.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
            sums[k] = [torch.einsum("i,i...", factor, g[start:stop]) for g in grad_samples]
        start = stop
    for p in params:
        p.grad, p.grad_sample = None, None
    return sums
