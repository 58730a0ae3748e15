"""What a hospital node does for one message: train a round under its own privacy budget, or evaluate.

Plain functions (no Flower) between ``client.app``'s handlers and ``client.training``. The node's lifetime budget
is enforced HERE, from its own ledger on its own disk, never from what the coordinator says:

- before training, the ledger checks the planned DP-SGD steps against the node's ``max-epsilon``; a round that
  would exceed it is refused (no weights leave the node, the reason does);
- a deployed node (not a simulation) refuses to train without DP at all (run config ``dp = false`` would make
  its privacy loss unbounded);
- a round number already trained in this run is refused (a replayed instruction must not spend budget twice),
  and so is a round the ledger holds under the instruction's run key (the coordinator's run identity, the same
  after it was restarted and resumed its run as a new Flower run);
- after training, the steps are recorded in the ledger BEFORE the reply leaves, so a crash can only over-count.

Distributed noise (``train_secure_round``, ``common.distributed_dp``): the node takes one DP-SGD step with its
noise share sigma / sqrt(T) and returns its noised clipped gradient sum, which leaves the node only masked by
SecAgg+. It refuses unless the round comes through secure aggregation whose threshold T tolerates no more dropouts
than its policy (``secagg-max-dropouts``) and whose quantisation range holds its update; it records both epsilons
(own share; sum of T shares) and checks its budget on the one its policy names (``budget-on-aggregate``).

Only the model weights (or the masked gradient sum) and aggregate numbers are returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from client.hospital_data import HospitalData, load_hospital
from client.privacy_ledger import PrivacyLedger
from client.training import DPConfig, EvalOutcome, LocalTrainConfig, evaluate_local, plan_dp_round, train_local
from common.device import default_device
from common.distributed_dp import SecureSumRange, check_secure_sum, share_noise_multiplier
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
    epsilon: float  # cumulative over all rounds and runs, of the noise the coordinator sees; inf without DP
    delta: float
    noise_multiplier: float  # the noise this node adds (its share, with distributed noise)
    max_grad_norm: float
    steps: int  # cumulative DP-SGD steps in the ledger
    dp: bool
    max_epsilon: float
    refusal: str | None = None
    epsilon_own_noise: float = math.nan  # cumulative, of this node's own noise alone (= epsilon with local noise)
    aggregate_noise_multiplier: float = math.nan  # noise in what the coordinator sees (at least)
    gradient_sum: dict[str, np.ndarray] | None = None  # distributed noise: noised clipped sum in clip units

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
        cell_loss_weight=run.cell_loss_weight,
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
                run_id: str | None = None, run_key: str | None = None) -> TrainResult:
    """Train one round from `global_weights`, or refuse (see the module doc)."""
    ledger = PrivacyLedger(node.ledger_path, mechanism=run.accountant)
    spent = ledger.epsilon(run.delta, aggregate=True)
    base = dict(delta=run.delta, noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                dp=run.dp, max_epsilon=node.max_epsilon)

    def refuse(reason: str) -> TrainResult:
        log.warning("round %d: %s", server_round, reason)
        return TrainResult(weights=None, num_examples=0, train_loss=math.nan, epsilon=spent,
                           steps=ledger.total_steps, refusal=reason, epsilon_own_noise=ledger.epsilon(run.delta),
                           aggregate_noise_multiplier=run.noise_multiplier, **base)

    if run.distributed_dp:
        return refuse("refused: the run uses distributed noise, which needs secure aggregation, but this "
                      "training message came without it: this node's update would leave in clear")
    if server_round in trained_rounds or (run_key and ledger.has_trained(run_key, server_round)):
        return refuse(f"refused: round {server_round} was already trained by this node in this run")
    if not run.dp and not node.is_simulation:
        return refuse("refused: the run asks for training without differential privacy (dp = false); this node "
                      "trains only with DP")
    data = hospital_data(node, run)
    config = local_train_config(run, server_round=server_round, proximal_mu=proximal_mu)
    if run.dp:
        plan = plan_dp_round(len(data.train), config=config)
        decision = ledger.check_budget(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                       steps=plan.steps, delta=run.delta, max_epsilon=node.max_epsilon,
                                       on_aggregate=node.budget_on_aggregate)
        if not decision.allowed:
            return refuse(decision.reason)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    outcome = train_local(model, data.train, config=config, accountant_state=ledger.accountant_state(),
                          device=default_device())
    if run.dp:
        own = ledger.record(noise_multiplier=outcome.noise_multiplier, sample_rate=outcome.sample_rate,
                            steps=outcome.steps, delta=run.delta, run_id=run_id, server_round=server_round,
                            run_key=run_key)
        epsilon = ledger.epsilon(run.delta, aggregate=True)  # differs from `own` after distributed rounds
    else:
        own = epsilon = math.inf
    return TrainResult(weights=exchanged_weights(model), num_examples=outcome.num_examples,
                       train_loss=outcome.train_loss, epsilon=epsilon, steps=ledger.total_steps,
                       epsilon_own_noise=own, aggregate_noise_multiplier=run.noise_multiplier, **base)


def secure_train_config(run: RunConfig, *, server_round: int, threshold: int) -> LocalTrainConfig:
    """A secure round's local training: one DP-SGD step (FedSGD) with this node's noise share sigma / sqrt(T)."""
    local = local_train_config(run, server_round=server_round)
    share = share_noise_multiplier(run.noise_multiplier, threshold)
    return replace(local, epochs=1, max_steps=1, dp=replace(local.dp, noise_multiplier=share))


@dataclass(frozen=True)
class SecureRoundTerms:
    """What the SecAgg+ protocol itself told the node about this round (not the coordinator's say-so)."""

    participants: int  # hospitals sampled for the round
    threshold: int  # reconstruction threshold T: the least number of contributions a revealed sum holds
    sum_range: SecureSumRange  # the announced clipping, quantisation and modulus ranges
    max_weight: float  # SecAgg+'s weight scale; 1.0 (every hospital's sum counts once)


def train_secure_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                       server_round: int, terms: SecureRoundTerms, trained_rounds: frozenset[int] = frozenset(),
                       run_id: str | None = None, run_key: str | None = None) -> TrainResult:
    """One FedSGD step with this node's share of the noise, for a secure sum; or a refusal (see module doc).

    The returned `gradient_sum` is (sum of clipped per-example gradients + noise) / max-grad-norm per weight;
    the coordinator applies the revealed mean as ``w -= lr * max_grad_norm * mean / batch_size``.
    """
    ledger = PrivacyLedger(node.ledger_path, mechanism=run.accountant)
    base = dict(delta=run.delta, max_grad_norm=run.max_grad_norm, dp=run.dp, max_epsilon=node.max_epsilon)

    def refuse(reason: str) -> TrainResult:
        log.warning("round %d: %s", server_round, reason)
        return TrainResult(weights=None, num_examples=0, train_loss=math.nan,
                           epsilon=ledger.epsilon(run.delta, aggregate=True), steps=ledger.total_steps,
                           refusal=reason, epsilon_own_noise=ledger.epsilon(run.delta),
                           noise_multiplier=run.noise_multiplier, aggregate_noise_multiplier=run.noise_multiplier,
                           **base)

    if not run.dp:
        return refuse("refused: distributed noise needs dp = true")
    if server_round in trained_rounds or (run_key and ledger.has_trained(run_key, server_round)):
        return refuse(f"refused: round {server_round} was already trained by this node in this run")
    if terms.threshold < 2 or terms.threshold > terms.participants:
        return refuse(f"refused: secure-aggregation threshold {terms.threshold} is not between 2 and the "
                      f"{terms.participants} participants")
    if terms.participants - terms.threshold > node.secagg_max_dropouts:
        return refuse(f"refused: the secure sum could be revealed with {terms.participants - terms.threshold} "
                      f"of {terms.participants} hospitals missing; this node's policy allows at most "
                      f"{node.secagg_max_dropouts} (secagg-max-dropouts)")
    if terms.max_weight != 1.0:
        return refuse(f"refused: secure-aggregation max weight {terms.max_weight:g}, expected 1 (each hospital's "
                      f"sum counts once; the batch size must not weigh in)")
    config = secure_train_config(run, server_round=server_round, threshold=terms.threshold)
    share = config.dp.noise_multiplier
    aggregate_noise = share * math.sqrt(terms.threshold)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    start = exchanged_weights(model)
    problem = check_secure_sum(terms.sum_range, batch_size=run.batch_size, share=share,
                               parameters=sum(int(v.size) for v in start.values()))
    if problem:
        return refuse(f"refused: {problem}")
    data = hospital_data(node, run)
    plan = plan_dp_round(len(data.train), config=config)
    decision = ledger.check_budget(noise_multiplier=share, aggregate_noise_multiplier=aggregate_noise,
                                   sample_rate=plan.sample_rate, steps=plan.steps, delta=run.delta,
                                   max_epsilon=node.max_epsilon, on_aggregate=node.budget_on_aggregate)
    if not decision.allowed:
        return refuse(decision.reason)
    outcome = train_local(model, data.train, config=config, accountant_state=ledger.accountant_state(),
                          device=default_device())
    own = ledger.record(noise_multiplier=share, aggregate_noise_multiplier=aggregate_noise,
                        sample_rate=outcome.sample_rate, steps=outcome.steps, delta=run.delta, run_id=run_id,
                        server_round=server_round, run_key=run_key)
    after = exchanged_weights(model)
    scale = outcome.expected_batch_size / (run.lr * run.max_grad_norm)  # SGD step = -lr * noised sum / E
    gradient_sum = {k: ((start[k].astype(np.float64) - after[k]) * scale).astype(np.float32) for k in start}
    return TrainResult(weights=None, num_examples=1, train_loss=math.nan,
                       epsilon=ledger.epsilon(run.delta, aggregate=True), steps=ledger.total_steps,
                       epsilon_own_noise=own, noise_multiplier=share, aggregate_noise_multiplier=aggregate_noise,
                       gradient_sum=gradient_sum, **base)


def evaluate_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                   server_round: int) -> EvalOutcome:
    """The global model's loss and metrics on the node's validation split."""
    data = hospital_data(node, run)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    return evaluate_local(model, data.val, device=default_device())
