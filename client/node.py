"""What a hospital node does for one message: train a round under its own privacy budget, or evaluate.

Plain functions (no Flower) between ``client.app``'s handlers and ``client.training``. The node's lifetime budget
is enforced HERE, from its own ledger on its own disk, never from what the coordinator says:

- before training, the ledger checks the planned DP-SGD steps against the node's ``max-epsilon``; a round that
  would exceed it is refused (no weights leave the node, the reason does);
- a deployed node (not a simulation) refuses to train without DP at all (run config ``dp = false`` would make
  its privacy loss unbounded);
- a round number already trained in this run is refused (a replayed instruction must not spend budget twice);
- after training, the steps are recorded in the ledger BEFORE the reply leaves, so a crash can only over-count.

Only the model weights and aggregate numbers are returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from client.hospital_data import HospitalData, load_hospital
from client.privacy_ledger import PrivacyLedger
from client.training import DPConfig, EvalOutcome, LocalTrainConfig, evaluate_local, plan_dp_round, train_local
from common.device import default_device
from common.models import build_model
from common.run_config import NodeConfig, RunConfig
from common.weights import exchanged_weights, load_weights

log = logging.getLogger(__name__)

_DATA_CACHE_SIZE = 4
_data_cache: dict[tuple, HospitalData] = {}


@dataclass(frozen=True)
class TrainResult:
    """A round's outcome as it may leave the node: weights (None when refused) and aggregate numbers."""

    weights: dict[str, np.ndarray] | None
    num_examples: int
    train_loss: float
    epsilon: float  # cumulative over all rounds and runs; inf without DP
    delta: float
    noise_multiplier: float
    max_grad_norm: float
    steps: int  # cumulative DP-SGD steps in the ledger
    dp: bool
    max_epsilon: float
    refusal: str | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None


def local_train_config(run: RunConfig, *, server_round: int, proximal_mu: float = 0.0) -> LocalTrainConfig:
    """One round's local training settings from the run config.

    With DP on, sampling and noise use fresh randomness: a seed known to the coordinator would let it predict,
    and remove, the noise. With DP off (baselines) the round is seeded from the run seed for reproducibility.
    """
    return LocalTrainConfig(
        epochs=run.local_epochs,
        batch_size=run.batch_size,
        learning_rate=run.lr,
        proximal_mu=proximal_mu,
        seed=None if run.dp else run.seed * 1000 + server_round,
        dp=DPConfig(enabled=run.dp, noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                    delta=run.delta, accountant=run.accountant),
    )


def hospital_data(node: NodeConfig, run: RunConfig) -> HospitalData:
    """The node's data, loaded once per process (preprocessing and features are cached on disk anyway)."""
    key = (node, run.model_config(), run.preprocess_config(), run.val_fraction, run.seed, run.sim_partition,
           run.sim_dirichlet_alpha, run.sim_test_fraction, run.sim_max_patients)
    if key not in _data_cache:
        while len(_data_cache) >= _DATA_CACHE_SIZE:
            _data_cache.pop(next(iter(_data_cache)))
        _data_cache[key] = load_hospital(node, run)
    return _data_cache[key]


def train_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray], server_round: int,
                proximal_mu: float = 0.0, trained_rounds: frozenset[int] = frozenset(),
                run_id: str | None = None) -> TrainResult:
    """Train one round from `global_weights`, or refuse (see the module doc)."""
    ledger = PrivacyLedger(node.ledger_path, mechanism=run.accountant)
    spent = ledger.epsilon(run.delta)
    base = dict(delta=run.delta, noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                dp=run.dp, max_epsilon=node.max_epsilon)

    def refuse(reason: str) -> TrainResult:
        log.warning("round %d: %s", server_round, reason)
        return TrainResult(weights=None, num_examples=0, train_loss=math.nan, epsilon=spent,
                           steps=ledger.total_steps, refusal=reason, **base)

    if server_round in trained_rounds:
        return refuse(f"refused: round {server_round} was already trained by this node in this run")
    if not run.dp and not node.is_simulation:
        return refuse("refused: the run asks for training without differential privacy (dp = false); this node "
                      "trains only with DP")
    data = hospital_data(node, run)
    config = local_train_config(run, server_round=server_round, proximal_mu=proximal_mu)
    if run.dp:
        plan = plan_dp_round(len(data.train), config=config)
        decision = ledger.check_budget(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                       steps=plan.steps, delta=run.delta, max_epsilon=node.max_epsilon)
        if not decision.allowed:
            return refuse(decision.reason)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    outcome = train_local(model, data.train, config=config, accountant_state=ledger.accountant_state(),
                          device=default_device())
    if run.dp:
        epsilon = ledger.record(noise_multiplier=outcome.noise_multiplier, sample_rate=outcome.sample_rate,
                                steps=outcome.steps, delta=run.delta, run_id=run_id, server_round=server_round)
    else:
        epsilon = math.inf
    return TrainResult(weights=exchanged_weights(model), num_examples=outcome.num_examples,
                       train_loss=outcome.train_loss, epsilon=epsilon, steps=ledger.total_steps, **base)


def evaluate_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                   server_round: int) -> EvalOutcome:
    """The global model's loss and metrics on the node's validation split."""
    data = hospital_data(node, run)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    return evaluate_local(model, data.val, device=default_device())
