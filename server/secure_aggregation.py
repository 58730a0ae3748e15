"""Distributed DP rounds over secure aggregation: FedSGD whose only revealed update is a SecAgg+ sum.

Each round, the sampled hospitals run Flower's SecAgg+ protocol (``SecAggPlusWorkflow`` on the legacy stack; its
four exchanges: setup, share keys, collect masked vectors, unmask). In the masked-vector stage each hospital takes
one DP-SGD step with its noise share sigma / sqrt(T) (``client.node.train_secure_round``) and uploads its noised
clipped gradient sum, masked; the coordinator can remove the masks only from the sum of at least T contributions
(T = sampled - ``secagg-dropouts``, at least 2), and gets the mean over the m hospitals that contributed. The global
model then takes the step ``w -= lr * max_grad_norm * mean / batch_size``: one DP-SGD step of expected batch
m x ``batch-size`` whose noise multiplier is sigma * sqrt(m / T) >= sigma (``common.distributed_dp``).

:class:`SecureFedSGD` is a MammoFL strategy whose ``configure_train`` runs the whole protocol on the grid and hands
Flower's round loop no further messages; ``aggregate_train`` then applies the revealed mean and does the same
bookkeeping as the other strategies (epsilon by max, refusals and dropouts counted, checkpoint). Federated and
centralised evaluation are unchanged. What reaches this process from a hospital in a round: its SecAgg+ keys and
shares, its masked vector (uniformly random without the others'), and its metrics (epsilons, noise, steps; no
loss, weight 1); its gradient sum never (the mod empties the reply's arrays).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from common.distributed_dp import (SecureSumRange, reconstruction_threshold, secure_sum_range,
                                   share_noise_multiplier, sum_noise_multiplier)
from server.reply_checks import epsilon_problem
from server.strategy import MammoStrategyMixin, RoundReport, TooFewReplies, _finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureRoundSettings:
    """What the coordinator needs to size and apply a secure round (from the run config)."""

    noise_multiplier: float
    max_grad_norm: float
    learning_rate: float
    batch_size: int
    dropouts: int


@dataclass
class SecureRoundOutcome:
    """What one run of the SecAgg+ protocol produced."""

    participants: list[int]
    threshold: int
    sum_range: SecureSumRange
    contributions: list[tuple[int, FitRes]] = field(default_factory=list)  # (node id, fitres without arrays)
    failures: list[str] = field(default_factory=list)
    revealed: bool = False


class _Node(ClientProxy):
    """The legacy strategy interface wants client proxies; only the node id is used."""

    def __init__(self, node_id: int):
        super().__init__(cid=str(node_id))
        self.node_id = node_id

    def get_properties(self, *args, **kwargs):  # pragma: no cover - never called by SecAgg+
        raise NotImplementedError

    get_parameters = fit = evaluate = reconnect = get_properties


class _RoundBridge(LegacyStrategy):
    """The legacy strategy SecAgg+ drives for one round: fixed participants in, revealed sum out."""

    def __init__(self, outcome: SecureRoundOutcome, fitins: FitIns):
        self.outcome, self.fitins = outcome, fitins

    def initialize_parameters(self, client_manager):
        return None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(client_manager.clients[str(node_id)], self.fitins) for node_id in self.outcome.participants]

    def aggregate_fit(self, server_round, results, failures):
        self.outcome.revealed = True
        self.outcome.contributions = [(proxy.node_id, res) for proxy, res in results]
        seen: set[int] = set()
        for failure in failures:  # SecAggPlusWorkflow lists a stage's error replies twice: count each once
            key = id(failure.args[0]) if isinstance(failure, BaseException) and failure.args else id(failure)
            if key not in seen:
                seen.add(key)
                self.outcome.failures.append(_failure_reason(failure))
        parameters = results[0][1].parameters if results else None
        return parameters, {}

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecureFedSGD(MammoStrategyMixin, FedAvg):
    """FedSGD with distributed noise over SecAgg+ (see the module doc); MammoFL's checks and bookkeeping."""

    def __init__(self, *, secure: SecureRoundSettings, round_timeout: float, **kwargs):
        super().__init__(**kwargs)
        self.secure = secure
        self.round_timeout = round_timeout
        self.secure_rounds: dict[int, dict] = {}  # round -> participants, contributors, threshold, noise
        self._outcome: SecureRoundOutcome | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        rnd = server_round + self.round_offset
        sampled = list(super().configure_train(server_round, arrays, config, grid))
        self._sent.pop("train", None)
        participants = sorted(m.metadata.dst_node_id for m in sampled)
        n = len(participants)
        if n < 2:
            raise TooFewReplies(f"round {rnd}: secure aggregation needs at least 2 hospitals, {n} sampled")
        threshold = reconstruction_threshold(n, self.secure.dropouts)
        share = share_noise_multiplier(self.secure.noise_multiplier, threshold)
        keys = list(self._global)
        sum_range = secure_sum_range(participants=n, batch_size=self.secure.batch_size, share=share,
                                     parameters=sum(int(self._global[k].size) for k in keys))
        outcome = SecureRoundOutcome(participants=participants, threshold=threshold, sum_range=sum_range)
        fitins = FitIns(ndarrays_to_parameters([self._global[k] for k in keys]),
                        {wire.SERVER_ROUND: rnd, wire.WEIGHT_KEYS: wire.join_keys(keys),
                         **({wire.RUN_KEY: config[wire.RUN_KEY]} if wire.RUN_KEY in config else {})})
        nodes = SimpleClientManager()
        for node_id in participants:
            nodes.register(_Node(node_id))
        context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
                                strategy=_RoundBridge(outcome, fitins), client_manager=nodes)
        context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: rnd})
        context.state.array_records[MAIN_PARAMS_RECORD] = compat.parameters_to_arrayrecord(
            fitins.parameters, keep_input=True)
        workflow = SecAggPlusWorkflow(
            num_shares=1.0, reconstruction_threshold=threshold, max_weight=1.0,
            clipping_range=sum_range.clipping_range, quantization_range=sum_range.quantization_range,
            modulus_range=sum_range.modulus_range, timeout=self.round_timeout)
        log.info("round %d: secure aggregation over %d hospitals, threshold %d, noise share %.4g", rnd, n,
                 threshold, share)
        workflow(grid, context)
        self._outcome = outcome
        return []  # the protocol's exchanges are done; Flower's loop has nothing more to send

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        outcome, self._outcome = self._outcome, None
        if outcome is None:
            raise TooFewReplies(f"round {rnd}: no secure aggregation ran")
        report = RoundReport(round=rnd, sampled=len(outcome.participants))
        epsilons: list[float] = []
        for node_id, fitres in outcome.contributions:  # node ids of the SecAgg+ exchange, not self-declared
            node = self.nodes.get(node_id, fitres.metrics.get(wire.PARTITION_ID))
            metrics = MetricRecord(_numbers(fitres.metrics))
            problem = epsilon_problem(metrics, node, dp_required=self.dp_required)
            if problem is None:
                epsilons.append(self._note_privacy(node, metrics, rnd))
            problem = problem or _check_secure_metrics(fitres)
            if problem:  # already inside the sum: it cannot be taken out, only reported
                report.notes.append(f"{node.name}: malformed secure reply (in the sum): {problem}")
        contributed = {node_id for node_id, _ in outcome.contributions}
        absent = [f"node-{node_id}" for node_id in outcome.participants if node_id not in contributed]
        for reason in outcome.failures:  # error replies carry no node id: name the absentee when there is one
            who = absent[0] if len(absent) == 1 else "one of " + ", ".join(absent)
            report.count("refused" if "refused:" in reason else "failed", who, reason)
        contributors = len(outcome.contributions)
        if not outcome.revealed or contributors < max(self.min_train_replies, outcome.threshold):
            raise TooFewReplies(
                f"round {rnd}: secure aggregation revealed no sum ({contributors} of {len(outcome.participants)} "
                f"hospitals contributed, threshold {outcome.threshold}, at least {self.min_train_replies} needed); "
                + "; ".join(report.notes))
        report.close(contributors)
        self.train_reports[rnd] = report
        for note in report.notes:
            log.warning("round %d train: %s", rnd, note)
        mean = parameters_to_ndarrays(outcome.contributions[0][1].parameters)
        keys = list(self._global)
        if len(mean) != len(keys) or any(m.shape != self._global[k].shape for m, k in zip(mean, keys)):
            raise TooFewReplies(f"round {rnd}: the revealed sum does not have the global model's shapes")
        if not all(np.all(np.isfinite(m)) for m in mean):
            raise TooFewReplies(f"round {rnd}: the revealed sum holds NaN or Inf")
        step = self.secure.learning_rate * self.secure.max_grad_norm / self.secure.batch_size
        updated = {k: (self._global[k].astype(np.float64) - step * m).astype(self._global[k].dtype)
                   if self._global[k].dtype.kind == "f" else self._global[k]  # counters are not trained
                   for k, m in zip(keys, mean)}
        share = share_noise_multiplier(self.secure.noise_multiplier, outcome.threshold)
        info = {"participants": len(outcome.participants), "contributors": contributors,
                "threshold": outcome.threshold, "noise_share": share,
                "noise_multiplier_of_sum": sum_noise_multiplier(share, contributors),
                "clipping_range": outcome.sum_range.clipping_range,
                "quantization_range": outcome.sum_range.quantization_range,
                "modulus_range": outcome.sum_range.modulus_range}
        self.secure_rounds[rnd] = info
        metrics = MetricRecord({
            "epsilon-max": max(epsilons) if epsilons else float("nan"),
            "secagg-contributors": contributors,
            "secagg-threshold": outcome.threshold,
            "noise-multiplier-of-sum": info["noise_multiplier_of_sum"],
            **{f"replies-{name}": getattr(report, name) for name in ("valid", "refused", "rejected", "failed")},
            "replies-missing": report.missing,
        })
        self.train_metrics[rnd] = metrics
        arrays = ArrayRecord({k: Array(np.asarray(v)) for k, v in updated.items()})
        if self.checkpoints is not None:
            self.checkpoints.save(self.checkpoint(rnd, arrays))
        return arrays, metrics


def _numbers(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _check_secure_metrics(fitres: FitRes) -> str | None:
    missing = [k for k in wire.SECURE_TRAIN_METRIC_KEYS if k not in fitres.metrics]
    if missing:
        return f"metrics lack {missing}"
    if fitres.num_examples != 1:
        return f"weight {fitres.num_examples}, expected 1"
    if not all(_finite(fitres.metrics[k]) or k in (wire.EPSILON, wire.EPSILON_OWN_NOISE)
               for k in wire.SECURE_TRAIN_METRIC_KEYS):
        return "a metric is not a finite number"
    return None


def _failure_reason(failure) -> str:
    """A failed participant's reason, first line only (simulation errors carry whole tracebacks)."""
    if isinstance(failure, BaseException):
        error = failure.args[0] if failure.args else failure
        text = str(getattr(error, "reason", error))
    else:
        _, res = failure
        text = str(getattr(getattr(res, "status", None), "message", "failed"))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    refusal = next((line for line in lines if "refused:" in line), None)
    return (refusal or (lines[-1] if lines else "failed"))[:300]

