"""What a hospital node does for one message: train a round under its own privacy budget, or evaluate.

Plain functions (no Flower) between ``client.app``'s handlers and ``client.training``. The node's lifetime budget
is enforced HERE, from its own ledger on its own disk, never from what the coordinator says:

- the node's own policy (``common.node_policy``, node config) decides delta, accountant and budget; a run that
  asks for less privacy than it allows (no DP, a smaller noise multiplier, more rounds) is refused, naming the
  key; a deployed node never trains without DP (run config ``dp = false`` would make its privacy loss
  unbounded);
- before training, the ledger checks the planned DP-SGD steps against the policy's ``max-epsilon`` and, if they
  fit, records them, both under its lock (``PrivacyLedger.spend``: two processes of one node cannot overspend
  together); a round that would exceed it is refused (no weights leave the node, the reason does);
- a round number already trained in this run is refused (a replayed instruction must not spend budget twice),
  and so is a round the ledger holds under the instruction's run key (the coordinator's run identity, the same
  after it was restarted and resumed its run as a new Flower run);
- the steps are thus recorded BEFORE training and before the reply leaves, so a crash or a failed round can only
  over-count; training that took more than was charged withholds the update.

Distributed noise (``train_secure_round``, ``common.distributed_dp``): the node takes one DP-SGD step with its
noise share sigma / sqrt(T) and returns its noised clipped gradient sum, which leaves the node only masked by
SecAgg+. It refuses unless the round comes through secure aggregation whose threshold T tolerates no more dropouts
than its policy (``secagg-max-dropouts``) and whose quantisation range holds its update; it records both epsilons
(own share; sum of T shares) and checks its budget on the one its policy names (``budget-on-aggregate``).

Evaluation (``evaluate_round``) releases counts over the validation split only as the policy allows: by default
Gaussian noise on every count, charged to the ledger like a training step (``common.private_counts``); ``clear``
releases exact counts outside epsilon; ``refuse`` releases nothing; at most ``max-evaluations-per-run`` times.

Explanation counts (``release_explanations``) follow the same policy (noised and charged, clear, or refused).

Only the model weights (or the masked gradient sum) and aggregate numbers are returned.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import numpy as np

from client.hospital_data import HospitalData, load_hospital
from client.privacy_ledger import LedgerError, PrivacyLedger
from client.training import (DPConfig, EvalOutcome, LocalTrainConfig, TrainOutcome, evaluate_local, plan_dp_round,
                             train_local)
from common.device import default_device
from common.distributed_dp import SecureSumRange, check_secure_sum, share_noise_multiplier
from common import private_counts
from common.models import build_model
from common.node_policy import NodePolicy
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
    accountant: str = "rdp"  # the node policy's accountant, of every epsilon here
    epsilon_own_noise: float = math.nan  # cumulative, of this node's own noise alone (= epsilon with local noise)
    aggregate_noise_multiplier: float = math.nan  # noise in what the coordinator sees (at least)
    gradient_sum: dict[str, np.ndarray] | None = None  # distributed noise: noised clipped sum in clip units

    @property
    def refused(self) -> bool:
        return self.refusal is not None


def local_train_config(run: RunConfig, *, server_round: int, proximal_mu: float = 0.0,
                       policy: NodePolicy | None = None) -> LocalTrainConfig:
    """One round's local training settings from the run config; delta and accountant from the node's `policy`
    (without one, as in the simulation's centralised baseline: the run's delta and the default accountant).

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
                    delta=run.delta if policy is None else policy.accounting_delta(run.delta),
                    **({} if policy is None else {"accountant": policy.accountant})),
    )


def hospital_data(node: NodeConfig, run: RunConfig) -> HospitalData:
    """The node's data, loaded once per process (preprocessing and features are cached on disk anyway)."""
    key = (node, run.model_config(), run.preprocess_config(), run.val_fraction, run.seed, run.sim_partition,
           run.sim_dirichlet_alpha, run.sim_test_fraction, run.sim_max_patients)
    if key not in _data_cache:
        while len(_data_cache) >= _DATA_CACHE_SIZE:
            _data_cache.pop(next(iter(_data_cache)))
        data = load_hospital(node, run)
        node.policy.check_training_set(len(data.train))
        _data_cache[key] = data
    return _data_cache[key]


def _policy_refusal(run: RunConfig, node: NodeConfig, rounds_trained: int) -> str | None:
    """The node policy's objection to training for this run; virtual hospitals may train without DP (baselines)."""
    if not run.dp and node.is_simulation:
        return None
    return node.policy.training_refusal(dp=run.dp, noise_multiplier=run.noise_multiplier,
                                        num_server_rounds=run.num_server_rounds, rounds_trained=rounds_trained)


def train_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray], server_round: int,
                proximal_mu: float = 0.0, trained_rounds: frozenset[int] = frozenset(),
                run_id: str | None = None, run_key: str | None = None) -> TrainResult:
    """Train one round from `global_weights`, or refuse (see the module doc)."""
    policy = node.policy
    delta = policy.accounting_delta(run.delta)
    ledger = PrivacyLedger(node.ledger_path, mechanism=policy.accountant)
    spent = ledger.epsilon(delta, aggregate=True)
    base = dict(delta=delta, noise_multiplier=run.noise_multiplier, max_grad_norm=run.max_grad_norm,
                dp=run.dp, max_epsilon=policy.max_epsilon, accountant=policy.accountant)

    def refuse(reason: str) -> TrainResult:
        log.warning("round %d: %s", server_round, reason)
        return TrainResult(weights=None, num_examples=0, train_loss=math.nan, epsilon=spent,
                           steps=ledger.total_steps, refusal=reason, epsilon_own_noise=ledger.epsilon(delta),
                           aggregate_noise_multiplier=run.noise_multiplier, **base)

    if run.distributed_dp:
        return refuse("refused: the run uses distributed noise, which needs secure aggregation, but this "
                      "training message came without it: this node's update would leave in clear")
    if server_round in trained_rounds or (run_key and ledger.has_trained(run_key, server_round)):
        return refuse(f"refused: round {server_round} was already trained by this node in this run")
    objection = _policy_refusal(run, node, len(trained_rounds))
    if objection:
        return refuse(objection)
    data = hospital_data(node, run)
    config = local_train_config(run, server_round=server_round, proximal_mu=proximal_mu, policy=policy)
    prior_state = ledger.accountant_state()
    if run.dp:
        plan = plan_dp_round(len(data.train), config=config)
        spend = ledger.spend(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=plan.steps,
                             delta=delta, max_epsilon=policy.max_epsilon, on_aggregate=policy.budget_on_aggregate,
                             run_id=run_id, server_round=server_round, run_key=run_key)
        if not spend.allowed:
            return refuse(spend.reason)
        prior_state = spend.prior_state
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    outcome = train_local(model, data.train, config=config, accountant_state=prior_state, device=default_device())
    if run.dp:
        _check_within_spend(outcome, noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                            steps=plan.steps, server_round=server_round)
        ledger.reload()  # cumulative, with whatever this node's other processes spent meanwhile
        own = ledger.epsilon(delta)
        epsilon = ledger.epsilon(delta, aggregate=True)  # differs from `own` after distributed rounds
    else:
        own = epsilon = math.inf
    return TrainResult(weights=exchanged_weights(model), num_examples=outcome.num_examples,
                       train_loss=outcome.train_loss, epsilon=epsilon, steps=ledger.total_steps,
                       epsilon_own_noise=own, aggregate_noise_multiplier=run.noise_multiplier, **base)


def _check_within_spend(outcome: TrainOutcome, *, noise_multiplier: float, sample_rate: float, steps: int,
                        server_round: int) -> None:
    """Training must have taken no more than the ledger was charged before it (`PrivacyLedger.spend`); if it did,
    nothing may leave the node."""
    if (outcome.steps > steps or outcome.sample_rate != sample_rate
            or outcome.noise_multiplier != noise_multiplier):
        raise LedgerError(f"round {server_round}: training took {outcome.steps} steps at sample rate "
                          f"{outcome.sample_rate} with noise {outcome.noise_multiplier}, but the ledger was charged "
                          f"{steps} steps at {sample_rate} with noise {noise_multiplier}; the update is withheld")
    if outcome.steps < steps:
        log.info("round %d: %d DP-SGD steps taken, %d charged (the ledger over-counts)", server_round,
                 outcome.steps, steps)


def secure_train_config(run: RunConfig, *, server_round: int, threshold: int,
                        policy: NodePolicy | None = None) -> LocalTrainConfig:
    """A secure round's local training: one DP-SGD step (FedSGD) with this node's noise share sigma / sqrt(T)."""
    local = local_train_config(run, server_round=server_round, policy=policy)
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
    policy = node.policy
    delta = policy.accounting_delta(run.delta)
    ledger = PrivacyLedger(node.ledger_path, mechanism=policy.accountant)
    base = dict(delta=delta, max_grad_norm=run.max_grad_norm, dp=run.dp, max_epsilon=policy.max_epsilon,
                accountant=policy.accountant)

    def refuse(reason: str) -> TrainResult:
        log.warning("round %d: %s", server_round, reason)
        return TrainResult(weights=None, num_examples=0, train_loss=math.nan,
                           epsilon=ledger.epsilon(delta, aggregate=True), steps=ledger.total_steps,
                           refusal=reason, epsilon_own_noise=ledger.epsilon(delta),
                           noise_multiplier=run.noise_multiplier, aggregate_noise_multiplier=run.noise_multiplier,
                           **base)

    if not run.dp:
        return refuse("refused: distributed noise needs dp = true")
    if server_round in trained_rounds or (run_key and ledger.has_trained(run_key, server_round)):
        return refuse(f"refused: round {server_round} was already trained by this node in this run")
    objection = _policy_refusal(run, node, len(trained_rounds))
    if objection:
        return refuse(objection)
    if terms.threshold < 2 or terms.threshold > terms.participants:
        return refuse(f"refused: secure-aggregation threshold {terms.threshold} is not between 2 and the "
                      f"{terms.participants} participants")
    if terms.participants - terms.threshold > policy.secagg_max_dropouts:
        return refuse(f"refused: the secure sum could be revealed with {terms.participants - terms.threshold} "
                      f"of {terms.participants} hospitals missing; this node's policy allows at most "
                      f"{policy.secagg_max_dropouts} (secagg-max-dropouts)")
    if terms.max_weight != 1.0:
        return refuse(f"refused: secure-aggregation max weight {terms.max_weight:g}, expected 1 (each hospital's "
                      f"sum counts once; the batch size must not weigh in)")
    config = secure_train_config(run, server_round=server_round, threshold=terms.threshold, policy=policy)
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
    spend = ledger.spend(noise_multiplier=share, aggregate_noise_multiplier=aggregate_noise,
                         sample_rate=plan.sample_rate, steps=plan.steps, delta=delta,
                         max_epsilon=policy.max_epsilon, on_aggregate=policy.budget_on_aggregate, run_id=run_id,
                         server_round=server_round, run_key=run_key)
    if not spend.allowed:
        return refuse(spend.reason)
    outcome = train_local(model, data.train, config=config, accountant_state=spend.prior_state,
                          device=default_device())
    _check_within_spend(outcome, noise_multiplier=share, sample_rate=plan.sample_rate, steps=plan.steps,
                        server_round=server_round)
    ledger.reload()
    own = ledger.epsilon(delta)
    after = exchanged_weights(model)
    scale = outcome.expected_batch_size / (run.lr * run.max_grad_norm)  # SGD step = -lr * noised sum / E
    gradient_sum = {k: ((start[k].astype(np.float64) - after[k]) * scale).astype(np.float32) for k in start}
    return TrainResult(weights=None, num_examples=1, train_loss=math.nan,
                       epsilon=ledger.epsilon(delta, aggregate=True), steps=ledger.total_steps,
                       epsilon_own_noise=own, noise_multiplier=share, aggregate_noise_multiplier=aggregate_noise,
                       gradient_sum=gradient_sum, **base)


@dataclass(frozen=True)
class EvaluationRelease:
    """What an evaluation may tell the coordinator, as the node's policy allows (see the module doc).

    `confusion` (3 x 3, true x predicted) and `score_histogram` are noised when `noise_std` > 0; `loss` is sent
    only in clear mode (NaN otherwise); `num_examples` is the total of the (noised) confusion counts.
    """

    num_examples: int
    confusion: np.ndarray | None
    loss: float = math.nan
    metrics: dict | None = None  # clear mode: the exact metrics of ``classification_metrics``
    score_histogram: np.ndarray | None = None  # the 600 counts of ``ScoreHistogram.flat()`` (noised: may be < 0)
    noise_std: float = 0.0
    epsilon: float = math.nan  # the node's epsilon after this release (own noise)
    refusal: str | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None


def exact_release(outcome: EvalOutcome, *, score_histogram: bool = False) -> EvaluationRelease:
    """An evaluation released in clear (policy ``evaluation = clear``; a simulation's baselines)."""
    confusion = np.asarray(outcome.metrics.get("confusion_matrix") or np.zeros((3, 3)), dtype=np.int64)
    histogram = np.asarray(outcome.score_histogram.flat(), dtype=np.int64) if score_histogram else None
    return EvaluationRelease(num_examples=int(outcome.num_examples), confusion=confusion, loss=outcome.loss,
                             metrics=outcome.metrics, score_histogram=histogram)


def evaluate_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                   server_round: int, evaluations_done: int = 0, score_histogram: bool = False,
                   run_id: str | None = None, rng: np.random.Generator | None = None) -> EvaluationRelease:
    """The global model on the node's validation split, released as its policy allows (or refused)."""
    policy = node.policy
    objection = policy.evaluation_refusal(evaluations_done)
    if objection:
        log.warning("round %d evaluation: %s", server_round, objection)
        return EvaluationRelease(num_examples=0, confusion=None, refusal=objection)
    data = hospital_data(node, run)
    if not len(data.val):
        reason = "refused: this node has no validation images (val-fraction too small for its patients)"
        log.warning("round %d evaluation: %s", server_round, reason)
        return EvaluationRelease(num_examples=0, confusion=None, refusal=reason)
    delta = policy.accounting_delta(run.delta)
    ledger = PrivacyLedger(node.ledger_path, mechanism=policy.accountant)
    blocks = 2 if score_histogram else 1
    if policy.evaluation == "noised":  # charged before anything is computed: a crash can only over-count
        spend = _spend_release(ledger, policy, delta, run_id=run_id, server_round=server_round, kind="evaluation")
        if not spend.allowed:
            log.warning("round %d evaluation: %s", server_round, spend.reason)
            return EvaluationRelease(num_examples=0, confusion=None, refusal=spend.reason)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source=f"round {server_round} global model")
    outcome = evaluate_local(model, data.val, device=default_device())
    exact = exact_release(outcome, score_histogram=score_histogram)
    if policy.evaluation == "clear":
        return exact
    confusion, histogram = exact.confusion, exact.score_histogram
    std = private_counts.noise_std(policy.evaluation_noise_multiplier, blocks)
    rng = rng or np.random.default_rng()  # fresh entropy: a seed the coordinator knew would undo the noise
    noised_confusion = private_counts.release_counts(confusion, std=std, rng=rng)
    noised_histogram = None if histogram is None else private_counts.release_counts(histogram, std=std, rng=rng)
    ledger.reload()
    epsilon = ledger.epsilon(delta)
    return EvaluationRelease(num_examples=int(noised_confusion.sum()), confusion=noised_confusion,
                             score_histogram=noised_histogram, noise_std=std, epsilon=epsilon)


@dataclass(frozen=True)
class ExplanationRelease:
    """The localisation tally as the node's policy lets it leave (noised when `noise_std` > 0), or a refusal."""

    tally: object | None  # client.explanation_round.LocalisationTally
    noise_std: float = 0.0
    refusal: str | None = None

    @property
    def refused(self) -> bool:
        return self.refusal is not None


def release_explanations(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                         methods: tuple[str, ...], run_id: str,
                         rng: np.random.Generator | None = None) -> ExplanationRelease:
    """Explain the global model on the validation split (``client.explanation_round``) and release the counts
    as the policy allows: noised and charged to the ledger (one release), in clear, or not at all."""
    from client.explanation_round import explain_round, noised_tally

    policy = node.policy
    if policy.evaluation == "refuse":
        return ExplanationRelease(None, refusal="refused: this node's policy does not release evaluation results "
                                                "(evaluation = refuse)")
    delta = policy.accounting_delta(run.delta)
    ledger = PrivacyLedger(node.ledger_path, mechanism=policy.accountant)
    if policy.evaluation == "noised":
        spend = _spend_release(ledger, policy, delta, run_id=run_id, server_round=None, kind="explanation")
        if not spend.allowed:
            return ExplanationRelease(None, refusal=spend.reason)
    tally = explain_round(run=run, node=node, global_weights=global_weights, methods=methods, run_id=run_id)
    if policy.evaluation == "clear":
        return ExplanationRelease(tally)
    noised, std = noised_tally(tally, noise_multiplier=policy.evaluation_noise_multiplier,
                               rng=rng or np.random.default_rng())
    return ExplanationRelease(noised, noise_std=std)


def _spend_release(ledger: PrivacyLedger, policy: NodePolicy, delta: float, *, run_id: str | None,
                   server_round: int | None, kind: str):
    """Charge one release of noised counts (``common.private_counts``) to the ledger, or refuse it."""
    return ledger.spend(noise_multiplier=policy.evaluation_noise_multiplier,
                        sample_rate=private_counts.RELEASE_SAMPLE_RATE, steps=private_counts.RELEASE_STEPS,
                        delta=delta, max_epsilon=policy.max_epsilon, on_aggregate=policy.budget_on_aggregate,
                        run_id=run_id, server_round=server_round, kind=kind)
