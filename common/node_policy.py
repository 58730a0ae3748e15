"""A hospital's own privacy policy: what its node will spend, account and release, whatever a run asks.

The policy lives in the node's configuration (``flower-supernode --node-config``; for virtual hospitals the
simulation's ``sim-*`` keys), never in the run config, and is validated when the node reads it. The coordinator's
run config can only ask: a run that asks for less privacy than the policy allows is refused, naming the key
(:meth:`NodePolicy.refusal`). Node config keys (kebab-case of the fields):

- ``max-epsilon``: lifetime budget over every run (required on a deployed node);
- ``delta``: the delta of every epsilon the node accounts and reports (0 < delta < 1 / training images; a run
  asking for a smaller delta is accounted at that one, a larger one is never used);
- ``accountant``: ``rdp`` or ``prv``, the mechanism of the node's ledger;
- ``min-noise-multiplier``: the least DP-SGD noise multiplier a run may ask for;
- ``max-rounds-per-run`` / ``max-evaluations-per-run``: how often one run may make the node train / evaluate;
- ``evaluation``: what an evaluation reply carries: ``noised`` (default: Gaussian noise on the counts, charged to
  the ledger), ``clear`` (exact counts, outside epsilon: only for a steward who accepts that), ``refuse``;
- ``evaluation-noise-multiplier``: the noise of ``noised`` evaluations, in units of the counts' sensitivity;
- ``require-tls``: the node refuses to start without TLS and node authentication;
- ``budget-on-aggregate`` and ``secagg-max-dropouts``: the node's terms for distributed noise over SecAgg+.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

ACCOUNTANTS = ("rdp", "prv")
EVALUATION_MODES = ("noised", "clear", "refuse")


class PolicyError(ValueError):
    """A node policy value that cannot be used; the message names the node config key."""


@dataclass(frozen=True)
class NodePolicy:
    """A hospital's privacy policy (see the module doc for each key)."""

    max_epsilon: float
    delta: float = 1e-5
    accountant: str = "rdp"
    min_noise_multiplier: float = 0.5
    max_rounds_per_run: int = 1000
    max_evaluations_per_run: int = 100
    evaluation: str = "noised"
    evaluation_noise_multiplier: float = 10.0
    require_tls: bool = True
    budget_on_aggregate: bool = False
    secagg_max_dropouts: int = 1

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            key = f.name.replace("_", "-")
            kind = type(f.default) if f.name != "max_epsilon" else float
            if kind is bool:
                if not isinstance(value, bool):
                    raise PolicyError(f"node config '{key}': expected true or false, got {value!r}")
                continue
            if kind is str:
                allowed = ACCOUNTANTS if f.name == "accountant" else EVALUATION_MODES
                if value not in allowed:
                    raise PolicyError(f"node config '{key}': must be one of {', '.join(allowed)}; got {value!r}")
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                raise PolicyError(f"node config '{key}': expected a finite number, got {str(value)[:40]!r}")
            if kind is int and int(value) != value:
                raise PolicyError(f"node config '{key}': expected an integer, got {value!r}")
        if self.max_epsilon <= 0:
            raise PolicyError(f"node config 'max-epsilon' must be > 0, got {self.max_epsilon!r}")
        if not 0 < self.delta < 1:
            raise PolicyError(f"node config 'delta' must be in (0, 1), got {self.delta!r}")
        for key, value in (("min-noise-multiplier", self.min_noise_multiplier),
                           ("evaluation-noise-multiplier", self.evaluation_noise_multiplier)):
            if value <= 0:
                raise PolicyError(f"node config '{key}' must be > 0, got {value!r}")
        for key, value in (("max-rounds-per-run", self.max_rounds_per_run),
                           ("max-evaluations-per-run", self.max_evaluations_per_run),
                           ("secagg-max-dropouts", self.secagg_max_dropouts)):
            if value < 0:
                raise PolicyError(f"node config '{key}' must be >= 0, got {value!r}")

    @classmethod
    def from_node_config(cls, values: Mapping[str, Any], *, defaults: Mapping[str, Any] | None = None) -> NodePolicy:
        """The policy keys of a node config (others ignored); `defaults` (same keys) fill what it leaves out.

        A deployed node passes no defaults, so ``max-epsilon`` must be in its own config.
        """
        merged = {**(defaults or {}), **{k: v for k, v in values.items() if k in POLICY_KEYS}}
        if "max-epsilon" not in merged:
            raise PolicyError("node config 'max-epsilon' is required: the hospital's lifetime privacy budget "
                              "(flower-supernode --node-config \"max-epsilon=8\")")
        kwargs = {}
        for key, value in merged.items():
            if isinstance(value, int) and not isinstance(value, bool) and key in _FLOAT_KEYS and _finite(value):
                value = float(value)
            kwargs[key.replace("-", "_")] = value
        return cls(**kwargs)

    def accounting_delta(self, requested: float) -> float:
        """The delta the node accounts at: its own, or a smaller one a run asks for (never a larger one)."""
        return min(self.delta, requested) if 0 < requested < 1 else self.delta

    def check_training_set(self, train_images: int) -> None:
        """delta must be below 1 / training images (else epsilon says nothing: one record may leak whole)."""
        if train_images > 0 and not self.delta < 1.0 / train_images:
            raise PolicyError(f"node config 'delta' {self.delta:g} must be < 1 / {train_images} training images "
                              f"({1.0 / train_images:.3g})")

    def training_refusal(self, *, dp: bool, noise_multiplier: float, num_server_rounds: int,
                         rounds_trained: int) -> str | None:
        """Why this node refuses to train for a run asking these values (each names its run config key)."""
        if not dp:
            return "refused: run config 'dp' is false; this node trains only with DP"
        if noise_multiplier < self.min_noise_multiplier:
            return (f"refused: run config 'noise-multiplier' {noise_multiplier:g} is below this node's policy "
                    f"min-noise-multiplier {self.min_noise_multiplier:g}")
        if num_server_rounds > self.max_rounds_per_run:
            return (f"refused: run config 'num-server-rounds' {num_server_rounds} exceeds this node's policy "
                    f"max-rounds-per-run {self.max_rounds_per_run}")
        if rounds_trained >= self.max_rounds_per_run:
            return (f"refused: this node has trained {rounds_trained} rounds of this run, its policy "
                    f"max-rounds-per-run")
        return None

    def evaluation_refusal(self, evaluations_done: int) -> str | None:
        """Why this node refuses one more evaluation in this run."""
        if self.evaluation == "refuse":
            return "refused: this node's policy does not release evaluation results (evaluation = refuse)"
        if evaluations_done >= self.max_evaluations_per_run:
            return (f"refused: this node has evaluated {evaluations_done} times in this run, its policy "
                    f"max-evaluations-per-run")
        return None


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


POLICY_KEYS = tuple(f.name.replace("_", "-") for f in fields(NodePolicy))
_FLOAT_KEYS = {"max-epsilon", "delta", "min-noise-multiplier", "evaluation-noise-multiplier"}
