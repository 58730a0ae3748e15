"""Distributed DP over secure aggregation: how much noise each hospital adds, and how the secure sum is sized.

In distributed mode every hospital takes one DP-SGD step per round (FedSGD) on its own Poisson sample: it clips
each example's gradient to ``max_grad_norm`` (C), sums them, and adds Gaussian noise with multiplier
``sigma / sqrt(T)``, its *share*. The coordinator learns only the sum over the hospitals that contributed, through
SecAgg+ (Flower's ``SecAggPlusWorkflow`` / ``secaggplus_mod``), whose reconstruction threshold ``T`` is the least
number of contributions any revealed sum can hold: with fewer, the masks cannot be removed. Independent Gaussian
shares add up, so a revealed sum of ``m >= T`` contributions carries noise multiplier ``sigma * sqrt(m / T) >=
sigma``: it is one DP-SGD step of noise ``sigma`` on the union of the hospitals' samples. Each hospital's own share
alone carries only ``sigma / sqrt(T)``: that is what it spends if secure aggregation fails (the conservative
epsilon, which nodes enforce unless their policy opts in to the trust assumption).

What a hospital uploads is its noised, clipped gradient sum in units of C (``(sum_i clip(g_i) + noise) / C``): each
coordinate is at most ``|batch| + |z| * share`` in magnitude, where ``|batch|`` is the Poisson sample size and ``z``
a standard normal draw. SecAgg+ clips every value to ``[-clipping_range, clipping_range]``, quantises it to an
integer in ``[0, quantization_range]`` and sums modulo ``modulus_range``. :func:`secure_sum_range` sizes these so
that (a) a value is clipped only if the Poisson sample or a noise draw lies beyond a tail of total probability
``tail_probability`` per round (1e-9 by default; an event of that probability is outside the DP guarantee and adds
to delta), and (b) the sum of ``participants`` values at the bound cannot wrap around the modulus.

Pure functions (numpy/scipy only); no Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: SecAgg+ masks are drawn in [0, MODULUS_RANGE); Flower's masks are at most 2**32.
MODULUS_RANGE = 2**32
DEFAULT_TAIL_PROBABILITY = 1e-9


class SecureSumError(ValueError):
    """Secure-aggregation settings that cannot carry the updates (overflow or clipping) or the noise."""


def reconstruction_threshold(participants: int, dropouts: int) -> int:
    """SecAgg+ threshold T for `participants` hospitals tolerating `dropouts`: n - t, and at least 2."""
    if participants < 2:
        raise SecureSumError(f"secure aggregation needs at least 2 hospitals, got {participants}")
    if dropouts < 0:
        raise SecureSumError(f"tolerated dropouts must be >= 0, got {dropouts}")
    return max(2, participants - dropouts)


def share_noise_multiplier(noise_multiplier: float, threshold: int) -> float:
    """Noise multiplier of one hospital's share: sigma / sqrt(T), so that any T shares sum to sigma."""
    if noise_multiplier <= 0 or threshold < 1:
        raise SecureSumError(f"need sigma > 0 and T >= 1, got {noise_multiplier}, {threshold}")
    return noise_multiplier / math.sqrt(threshold)


def sum_noise_multiplier(share: float, contributors: int) -> float:
    """Noise multiplier of a sum of `contributors` independent shares."""
    return share * math.sqrt(contributors)


@dataclass(frozen=True)
class SecureSumRange:
    """SecAgg+ quantisation settings (Flower's names) and the bound they were sized for."""

    clipping_range: float
    quantization_range: int
    modulus_range: int
    participants: int

    def __post_init__(self) -> None:
        if self.modulus_range > MODULUS_RANGE or self.modulus_range & (self.modulus_range - 1):
            raise SecureSumError(f"modulus range must be a power of 2 <= 2**32, got {self.modulus_range}")
        if self.participants * self.quantization_range >= self.modulus_range:
            raise SecureSumError(
                f"{self.participants} values of up to {self.quantization_range} can reach the modulus "
                f"{self.modulus_range}: the secure sum would wrap around")


def value_bound(*, batch_size: int, share: float, parameters: int,
                tail_probability: float = DEFAULT_TAIL_PROBABILITY) -> float:
    """Magnitude no uploaded value exceeds, except with probability `tail_probability` per round.

    Half of the tail goes to the Poisson sample size (expected `batch_size`; a hospital's expected batch is at most
    that), half to the largest |noise| over `parameters` coordinates (union bound).
    """
    from scipy.stats import norm, poisson  # here: a ClientApp process answering SecAgg+ key exchanges needs none

    if batch_size < 1 or parameters < 1 or not 0 < tail_probability < 1:
        raise SecureSumError("need batch_size >= 1, parameters >= 1 and 0 < tail_probability < 1")
    batch_cap = float(poisson.isf(tail_probability / 2, batch_size))
    z_cap = float(norm.isf(tail_probability / (4 * parameters)))
    return batch_cap + z_cap * share


def secure_sum_range(*, participants: int, batch_size: int, share: float, parameters: int,
                     tail_probability: float = DEFAULT_TAIL_PROBABILITY) -> SecureSumRange:
    """Clipping range from :func:`value_bound`; the largest power-of-2 quantisation range whose sum over
    `participants` stays below 2**32 (never below 2**20 levels)."""
    if participants < 2:
        raise SecureSumError(f"secure aggregation needs at least 2 hospitals, got {participants}")
    levels = MODULUS_RANGE >> (participants.bit_length())  # participants * levels < 2**32
    if levels < 2**20:
        raise SecureSumError(f"{participants} hospitals leave fewer than 2**20 quantisation levels")
    bound = value_bound(batch_size=batch_size, share=share, parameters=parameters,
                        tail_probability=tail_probability)
    return SecureSumRange(clipping_range=bound, quantization_range=levels, modulus_range=MODULUS_RANGE,
                          participants=participants)


def check_secure_sum(announced: SecureSumRange, *, batch_size: int, share: float, parameters: int,
                     tail_probability: float = DEFAULT_TAIL_PROBABILITY) -> str | None:
    """Why a hospital must not upload under the coordinator's announced settings, or None when they are safe."""
    try:
        SecureSumRange(announced.clipping_range, announced.quantization_range, announced.modulus_range,
                       announced.participants)
    except SecureSumError as error:
        return str(error)
    needed = value_bound(batch_size=batch_size, share=share, parameters=parameters,
                         tail_probability=tail_probability)
    if announced.clipping_range < needed:
        return (f"secure-aggregation clipping range {announced.clipping_range:.4g} is below {needed:.4g}, the "
                f"bound of this node's noised update: values would be clipped")
    return None
