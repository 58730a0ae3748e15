"""Typed configuration of one hospital's local training (read once per entry point, passed down)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from common.node_policy import NodePolicy
from common.privacy import MECHANISMS
from common.run_config import TrainingSettings

GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


@dataclass(frozen=True)
class DPConfig:
    """Sample-level DP-SGD: Poisson sampling, flat clipping at `max_grad_norm`, Gaussian noise
    `noise_multiplier * max_grad_norm`; epsilon reported at `delta` by the `accountant` mechanism.

    secure_mode: Opacus' cryptographically secure sampling and noise. Off by default, knowingly: sampling and
        noise then come from seeded torch generators (reproducible; not hardened against attacks on the
        floating-point noise), and Opacus' "Secure RNG turned off" notice is filtered (``client.console``). On
        needs ``torchcsprng``, which has no build for the pinned torch.
    """

    enabled: bool = TrainingSettings.dp  # defaults declared once: the run config's, the node policy's
    noise_multiplier: float = TrainingSettings.noise_multiplier
    max_grad_norm: float = TrainingSettings.max_grad_norm
    delta: float = NodePolicy.delta
    accountant: str = NodePolicy.accountant
    grad_sample_mode: str = "hooks"
    secure_mode: bool = False

    def __post_init__(self) -> None:
        if self.enabled and self.noise_multiplier <= 0:
            raise ValueError("noise_multiplier must be > 0 with DP on")
        if self.max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if self.accountant not in MECHANISMS:
            raise ValueError(f"accountant must be one of {MECHANISMS}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}")


@dataclass(frozen=True)
class LocalTrainConfig:
    """One round of local training.

    batch_size: expected batch size; with DP the Poisson sample rate is 1 / ceil(n / batch_size)
        (as Opacus derives it) and an epoch is ceil(n / batch_size) steps.
    max_steps: stop after this many steps in the round (None = `epochs` full epochs).
    proximal_mu: FedProx strength; > 0 pulls the weights towards the round's starting weights.
    cell_loss_weight: weight of the cell term of `lesion_aware_loss` (0 = image labels only).
    seed: seeds sampling, shuffling and noise (None = fresh randomness; ignored in secure mode).
    """

    epochs: int = TrainingSettings.local_epochs  # defaults declared once, in common.run_config
    batch_size: int = TrainingSettings.batch_size
    learning_rate: float = TrainingSettings.lr
    momentum: float = 0.0
    weight_decay: float = 0.0
    optimizer: str = "sgd"
    max_steps: int | None = None
    proximal_mu: float = 0.0
    cell_loss_weight: float = TrainingSettings.cell_loss_weight
    seed: int | None = None
    dp: DPConfig = field(default_factory=DPConfig)

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError("max_steps must be >= 1")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}")
        if self.proximal_mu < 0 or self.cell_loss_weight < 0 or self.learning_rate <= 0:
            raise ValueError("proximal_mu, cell_loss_weight must be >= 0 and learning_rate > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LocalTrainConfig:
        values = dict(values)
        dp = values.pop("dp", {})
        return cls(**values, dp=dp if isinstance(dp, DPConfig) else DPConfig(**dp))
