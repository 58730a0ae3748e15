"""Flower strategies for MammoFL: FedAvg (default), FedProx, FedAdam with the checks a hospital federation needs.

On top of Flower's own aggregation (``flwr.serverapp.strategy``), every round:

- replies are sorted: duplicate (a node's second reply in one step: ignored, counted), failed (error replies),
  refused (a node's privacy budget would be exceeded; no weights), rejected (the reply breaks a rule of
  ``server.reply_checks`` or its update fails validation: missing/extra keys, wrong shape or dtype, NaN/Inf, L2
  distance to the global model above the bound) and valid; only valid replies are aggregated. Every rejection is
  logged with the node's Flower node id;
- a node is its Flower node id, never a field of its reply (``server.reply_checks``);
- the update-norm bound is run config ``max-update-norm`` when > 0, else what one round of local DP-SGD can move
  the weights (``common.update_bound``, from the round's learning rate, clip, noise, epochs, batch size and the
  reply's ``num-examples``); with DP off and no ``max-update-norm`` there is no bound;
- valid updates are combined by run config ``aggregation``: ``mean`` (Flower's example-weighted FedAvg, then
  FedProx/FedAdam as configured), or robustly, ignoring ``num-examples``: ``median`` (per coordinate, as Flower's
  FedMedian), ``trimmed-mean`` (``byzantine-nodes`` values cut at each end per coordinate, Flower's ``trim_mean``)
  or ``krum`` (Flower's Krum selection with f = ``byzantine-nodes``); the robust result then takes the place of
  the mean (FedAdam still applies its server step to it);
- fewer valid replies than ``min_train_replies`` (``min_evaluate_replies``) raises :class:`TooFewReplies`: the run
  fails loudly instead of exiting 0 with empty metrics, as Flower alone does;
- epsilon is aggregated with MAX over every hospital that reported a valid one (refusals included), never averaged
  (a node training without DP reports +inf), and each hospital's latest privacy numbers are kept (``privacy``,
  keyed by display label, with the node id);
- the train loss is the example-weighted mean over valid replies (a round of empty Poisson batches has none);
- round numbers continue after a resume (``round_offset``); a round is marked started before its training
  instructions go out and a checkpoint is written after each aggregation (``server.checkpoints``).

Before sampling, the strategy waits at most ``node_wait_timeout`` seconds for ``min_nodes`` connected nodes and
then raises, where Flower would wait forever.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean
from flwr.serverapp.strategy.multikrum import select_multikrum

from common import wire
from common.operating_point import SHAPE as HISTOGRAM_SHAPE
from common.operating_point import ScoreHistogram
from common.node_policy import ACCOUNTANTS
from common.private_counts import clip_pooled
from common.run_config import RunConfig
from common.update_bound import dp_sgd_update_bound
from server.checkpoints import Checkpoint, CheckpointStore
from server.reply_checks import (MAX_NUM_EXAMPLES, NodeRecord, NodeRegistry, StepReplies, epsilon_problem,
                                 is_number, num_examples_problem)
from server.update_decoding import decode_reply_arrays

log = logging.getLogger(__name__)

HISTOGRAM_CELLS = int(np.prod(HISTOGRAM_SHAPE))

_OPTIONAL_TRAIN_KEYS = {wire.PARTITION_ID, wire.ACCOUNTANT}
_PRIVACY_FIELDS = {  # wire key -> privacy report field
    wire.EPSILON: "epsilon",
    wire.EPSILON_OWN_NOISE: "epsilon_own_noise",
    wire.DELTA: "delta",
    wire.NOISE_MULTIPLIER: "noise_multiplier",
    wire.AGGREGATE_NOISE_MULTIPLIER: "aggregate_noise_multiplier",
    wire.MAX_GRAD_NORM: "max_grad_norm",
    wire.STEPS: "steps",
    wire.MAX_EPSILON: "max_epsilon",
}
AGGREGATIONS = ("mean", "trimmed-mean", "median", "krum")


class TooFewReplies(RuntimeError):
    """A round got fewer usable replies than configured (or too few nodes connected): the run cannot go on."""


@dataclass(frozen=True)
class LocalRound:
    """What the run config says of a hospital's local round: enough to bound how far DP-SGD moves the weights."""

    learning_rate: float
    batch_size: int
    epochs: int
    max_grad_norm: float
    noise_multiplier: float


@dataclass
class RoundReport:
    """What happened to the replies of one train or evaluate step (counts and reasons, no data)."""

    round: int
    sampled: int = 0
    valid: int = 0
    refused: int = 0
    rejected: int = 0
    failed: int = 0
    duplicate: int = 0  # a node's further replies in the step: ignored
    notes: list[str] = field(default_factory=list)  # "<hospital>: <what>", e.g. refusal or rejection reasons

    @property
    def missing(self) -> int:
        return max(self.sampled - self.valid - self.refused - self.rejected - self.failed, 0)

    def count(self, outcome: str, hospital: str, reason: str) -> None:
        """One reply that is not aggregated: `outcome` is "refused", "rejected", "failed" or "duplicate"; the
        note says why."""
        setattr(self, outcome, getattr(self, outcome) + 1)
        self.notes.append(f"{hospital}: {outcome}: {reason}")

    def close(self, valid: int) -> None:
        """Record the valid replies; more replies than were sent (a node answering twice) raise `sampled`."""
        self.valid = valid
        self.sampled = max(self.sampled, valid + self.refused + self.rejected + self.failed)

    def to_json(self) -> dict:
        return {**asdict(self), "missing": self.missing}


class MammoStrategyMixin:
    """Reply checks, epsilon-by-max, refusal counting, robust aggregation, round offset and checkpoints for a
    Flower strategy.

    Mixed in before a ``flwr.serverapp.strategy`` class (see :class:`MammoFedAvg`); Flower's ``start()`` drives it.
    """

    def __init__(self, *, min_train_replies: int, min_evaluate_replies: int, max_update_norm: float = 0.0,
                 local_round: LocalRound | None = None, dp_required: bool = True, aggregation: str = "mean",
                 byzantine_nodes: int = 1, node_wait_timeout: float = 600.0, round_offset: int = 0,
                 checkpoints: CheckpointStore | None = None, final_round: int | None = None,
                 evaluate_every: int = 1, update_encoding: str = "float32", **flower_kwargs):
        super().__init__(**flower_kwargs)
        if aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        self.update_encoding = update_encoding  # how train replies carry weights (decoded before the checks)
        self.final_round = final_round  # its evaluation also asks for score histograms (the operating point)
        self.evaluate_every = evaluate_every  # federated evaluation costs the hospitals budget: not every round
        self.min_train_replies = min_train_replies
        self.min_evaluate_replies = min_evaluate_replies
        self.max_update_norm = max_update_norm
        self.local_round = local_round  # None: no derived bound (DP off)
        self.dp_required = dp_required
        self.aggregation = aggregation
        self.byzantine_nodes = byzantine_nodes
        self.node_wait_timeout = node_wait_timeout
        self.round_offset = round_offset
        self.checkpoints = checkpoints
        self.nodes = NodeRegistry()
        self.train_reports: dict[int, RoundReport] = {}
        self.evaluate_reports: dict[int, RoundReport] = {}
        self.train_metrics: dict[int, MetricRecord] = {}  # round -> aggregated train metrics
        self.evaluate_metrics: dict[int, MetricRecord] = {}  # round -> aggregated evaluation metrics
        self.privacy: dict[str, dict] = {}  # hospital label -> latest privacy numbers (and its node id)
        self._global: dict[str, np.ndarray] = {}
        self._sent: dict[str, list[Metadata]] = {}  # "train"/"evaluate" -> the instructions' metadata

    # ------------------------------------------------------------ configure
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._wait_for_nodes(grid, server_round + self.round_offset)
        if self.checkpoints is not None:  # from here on hospitals may train (and spend budget on) this round
            self.checkpoints.mark_started(server_round + self.round_offset)
        self._global = {k: v.numpy() for k, v in arrays.items()}
        messages = list(super().configure_train(server_round + self.round_offset, arrays, config, grid))
        self._sent["train"] = [m.metadata for m in messages]
        return messages

    def evaluates(self, rnd: int) -> bool:
        """Whether round `rnd` (absolute) has a federated evaluation: every `evaluate_every` rounds and the last."""
        return rnd % self.evaluate_every == 0 or rnd == self.final_round

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        if not self.evaluates(server_round + self.round_offset):
            self._sent["evaluate"] = []
            return []
        if self.fraction_evaluate > 0:
            self._wait_for_nodes(grid, server_round + self.round_offset)
        if server_round + self.round_offset == self.final_round:
            config = ConfigRecord({**config, wire.WANT_SCORE_HISTOGRAM: 1})
        messages = list(super().configure_evaluate(server_round + self.round_offset, arrays, config, grid))
        self._sent["evaluate"] = [m.metadata for m in messages]
        return messages

    # ------------------------------------------------------------ aggregate
    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        rnd = server_round + self.round_offset
        valid, report, epsilons = self._sort_train_replies(rnd, replies)
        if len(valid) < self.min_train_replies:
            if self.checkpoints is not None and report.sampled > 0 and report.refused == report.sampled:
                self.checkpoints.unmark_started(rnd)  # every hospital refused: nothing spent, a resume may retry
            raise TooFewReplies(
                f"round {rnd}: {len(valid)} valid training replies, at least {self.min_train_replies} needed "
                f"(sampled {report.sampled}: refused {report.refused}, rejected {report.rejected}, "
                f"failed {report.failed}, no reply {report.missing}); " + "; ".join(report.notes))
        arrays, metrics = super().aggregate_train(rnd, self._combine(rnd, [_essentials(m) for m in valid]))
        if arrays is None:  # cannot happen with >= 1 valid reply; guard Flower's contract anyway
            raise TooFewReplies(f"round {rnd}: aggregation produced no model")
        metrics = MetricRecord(dict(metrics or {}))
        metrics[wire.TRAIN_LOSS] = _weighted_mean(
            [(m.content.metric_records[wire.METRICS][wire.TRAIN_LOSS],
              m.content.metric_records[wire.METRICS][wire.NUM_EXAMPLES]) for m in valid])
        metrics["epsilon-max"] = max(epsilons) if epsilons else float("nan")
        for name in ("valid", "refused", "rejected", "failed", "duplicate"):
            metrics[f"replies-{name}"] = getattr(report, name)
        metrics["replies-missing"] = report.missing
        self.train_metrics[rnd] = metrics
        if self.checkpoints is not None:
            self.checkpoints.save(self.checkpoint(rnd, arrays))
        return arrays, metrics

    def _sort_train_replies(self, rnd: int,
                            replies: Iterable[Message]) -> tuple[list[Message], RoundReport, list[float]]:
        """(valid replies, what happened to each reply, every accepted epsilon) of one train step."""
        sent = self._sent.pop("train", [])
        step = StepReplies(sent)
        report = RoundReport(round=rnd, sampled=len(sent))
        valid: list[Message] = []
        epsilons: list[float] = []
        for msg in replies:
            node = self._node_of(msg, step)
            if step.is_duplicate(msg, node.node_id):
                report.count("duplicate", node.name, "a further reply in this step, ignored")
                continue
            if msg.has_error():
                report.count("failed", node.name, msg.error.reason)
                continue
            problem = step.origin_problem(msg, node.node_id)
            metrics = msg.content.metric_records.get(wire.METRICS)
            if problem is None and metrics is None:
                problem = f"no MetricRecord '{wire.METRICS}'"
            if problem is None:
                problem = epsilon_problem(metrics, node, dp_required=self.dp_required)
            if problem:
                report.count("rejected", node.name, problem)
                continue
            epsilons.append(self._note_privacy(node, metrics, rnd))
            if metrics.get(wire.REFUSED) == 1:
                entry = self.privacy[node.label]
                entry["refusals"] = entry.get("refusals", 0) + 1
                report.count("refused", node.name, _refusal_reason(msg.content).removeprefix("refused: "))
                continue
            problem = (decode_reply_arrays(msg.content, self._global, self.update_encoding)
                       or self.validate_train_reply(msg.content, node))
            if problem:
                report.count("rejected", node.name, problem)
                continue
            node.num_examples = int(metrics[wire.NUM_EXAMPLES])
            valid.append(msg)
        report.close(len(valid))
        self.train_reports[rnd] = report
        for note in report.notes:
            log.warning("round %d train: %s", rnd, note)
        return valid, report, epsilons

    def _combine(self, rnd: int, replies: list[Message]) -> list[Message]:
        """The replies Flower's aggregation gets: all of them (mean), or one carrying the robust aggregate."""
        if self.aggregation == "mean":
            return replies
        f = self.byzantine_nodes
        needed = 2 * f + (3 if self.aggregation == "krum" else 1)
        if len(replies) < needed:
            raise TooFewReplies(f"round {rnd}: aggregation {self.aggregation} tolerating {f} hostile hospitals "
                                f"needs {needed} valid training replies, got {len(replies)}")
        if self.aggregation == "krum":
            chosen = select_multikrum([m.content for m in replies], num_malicious_nodes=f, num_nodes_to_select=1)
            arrays = chosen[0].array_records[wire.ARRAYS]
        else:
            arrays = ArrayRecord()
            for key, reference in self._global.items():
                stacked = np.stack([m.content.array_records[wire.ARRAYS][key].numpy() for m in replies])
                if self.aggregation == "median":  # as Flower's FedMedian
                    value = np.median(stacked, axis=0)
                else:  # cut exactly f values per end: int((f + 0.25) / n * n) == f
                    value = trim_mean(stacked, (f + 0.25) / len(replies))
                arrays[key] = Array(np.asarray(value).astype(reference.dtype))
        content = RecordDict({wire.ARRAYS: arrays, wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 1})})
        return [Message(content=content, metadata=replies[0].metadata)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        rnd = server_round + self.round_offset
        sent = self._sent.pop("evaluate", [])
        if not self.evaluates(rnd):
            return None
        step = StepReplies(sent)
        report = RoundReport(round=rnd, sampled=len(sent))
        records: list[MetricRecord] = []
        for msg in replies:
            node = self._node_of(msg, step)
            if step.is_duplicate(msg, node.node_id):
                report.count("duplicate", node.name, "a further reply in this step, ignored")
                continue
            if msg.has_error():
                report.count("failed", node.name, msg.error.reason)
                continue
            metrics = msg.content.metric_records.get(wire.METRICS)
            problem = step.origin_problem(msg, node.node_id)
            if problem is None and metrics is not None and metrics.get(wire.REFUSED) == 1.0:
                report.count("refused", node.name, _refusal_reason(msg.content))
                continue
            problem = problem or _evaluation_problem(metrics)
            if problem:
                report.count("rejected", node.name, problem)
                continue
            records.append(metrics)
        report.close(len(records))
        self.evaluate_reports[rnd] = report
        for note in report.notes:
            log.warning("round %d evaluate: %s", rnd, note)
        if len(records) < self.min_evaluate_replies:
            raise TooFewReplies(
                f"round {rnd}: {len(records)} evaluation replies, at least {self.min_evaluate_replies} needed "
                f"(sampled {report.sampled}: rejected {report.rejected}, failed {report.failed}, "
                f"no reply {report.missing}); " + "; ".join(report.notes))
        if not records:
            return None
        self.evaluate_metrics[rnd] = aggregate_evaluation(records)
        return self.evaluate_metrics[rnd]

    # ------------------------------------------------------------ checks
    def validate_train_reply(self, content: RecordDict, node: NodeRecord) -> str | None:
        """Why a train reply from `node` must not be aggregated, or None when it is usable."""
        if set(content.array_records) != {wire.ARRAYS} or set(content.metric_records) != {wire.METRICS}:
            return (f"expected one ArrayRecord '{wire.ARRAYS}' and one MetricRecord '{wire.METRICS}', got "
                    f"{sorted(content.array_records)} and {sorted(content.metric_records)}")
        metrics = content.metric_records[wire.METRICS]
        missing = [k for k in wire.TRAIN_METRIC_KEYS if k not in metrics]
        if missing:
            return f"metrics lack {missing}"
        extra = sorted(set(metrics) - set(wire.TRAIN_METRIC_KEYS) - _OPTIONAL_TRAIN_KEYS)
        if extra:
            return f"unexpected metrics {extra}"
        problem = num_examples_problem(metrics[wire.NUM_EXAMPLES], node)
        if problem:
            return problem
        if isinstance(metrics[wire.TRAIN_LOSS], list):
            return f"'{wire.TRAIN_LOSS}' must be a number"
        arrays = content.array_records[wire.ARRAYS]
        if set(arrays) != set(self._global):
            diff = sorted(set(arrays) ^ set(self._global))
            return f"weights do not match the global model's keys (differ: {diff[:5]})"
        squared = 0.0
        for key, array in arrays.items():
            local, ref = array.numpy(), self._global[key]
            if local.shape != ref.shape or local.dtype != ref.dtype:
                return f"'{key}' is {local.dtype}{list(local.shape)}, expected {ref.dtype}{list(ref.shape)}"
            if local.dtype.kind in "fc":
                if not np.all(np.isfinite(local)):
                    return f"'{key}' holds NaN or Inf"
                squared += float(np.sum(np.square(local.astype(np.float64) - ref.astype(np.float64))))
            elif not np.array_equal(local, ref):
                return f"'{key}' ({local.dtype}) is not trained, yet differs from the global model's"
        norm = math.sqrt(squared)
        bound = self.update_bound(int(metrics[wire.NUM_EXAMPLES]))
        if bound is not None and not norm <= bound:
            return f"update norm {norm:.4g} exceeds the bound {bound:.4g}"
        return None

    def update_bound(self, num_examples: int) -> float | None:
        """Largest L2 update accepted from a node declaring `num_examples`: run config `max-update-norm` when set,
        else the DP-SGD bound of ``common.update_bound``; None = no bound (DP off, no `max-update-norm`)."""
        if self.max_update_norm > 0:
            return self.max_update_norm
        if self.local_round is None:
            return None
        parameters = sum(int(v.size) for v in self._global.values() if v.dtype.kind == "f")
        return dp_sgd_update_bound(num_examples=num_examples, parameters=parameters, **asdict(self.local_round))

    # ------------------------------------------------------------ state for checkpoints and resume
    def checkpoint(self, rnd: int, arrays: ArrayRecord) -> Checkpoint:
        """What resume needs after round `rnd`: weights, optimiser state, privacy, nodes and reply reports."""
        return Checkpoint(
            round=rnd,
            arrays={k: v.numpy() for k, v in arrays.items()},
            strategy_state=self.state_arrays(),
            meta={"privacy": self.privacy,
                  "nodes": self.nodes.to_json(),
                  "train_reports": {str(r): rep.to_json() for r, rep in self.train_reports.items()},
                  "train_metrics": dict(self.train_metrics.get(rnd, {}))},
        )

    def state_arrays(self) -> dict[str, np.ndarray]:
        """Server optimiser state (FedAdam moments) as flat arrays; empty for FedAvg/FedProx."""
        out: dict[str, np.ndarray] = {}
        for name in ("m_t", "v_t"):
            for key, value in (getattr(self, name, None) or {}).items():
                out[f"{name}/{key}"] = np.asarray(value)
        return out

    def restore(self, checkpoint: Checkpoint) -> None:
        """Continue after `checkpoint`: round numbering, optimiser state, privacy and record of every node seen."""
        self.round_offset = checkpoint.round
        self.privacy = {k: dict(v) for k, v in checkpoint.meta.get("privacy", {}).items()}
        self.nodes = NodeRegistry.from_json(checkpoint.meta.get("nodes", []))
        for name in ("m_t", "v_t"):
            prefix = f"{name}/"
            values = {k[len(prefix):]: v for k, v in checkpoint.strategy_state.items() if k.startswith(prefix)}
            if values and hasattr(self, name):
                setattr(self, name, values)

    # ------------------------------------------------------------ internals
    def _wait_for_nodes(self, grid: Grid, rnd: int) -> None:
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() >= deadline:
                raise TooFewReplies(f"round {rnd}: {connected} nodes connected after waiting "
                                    f"{self.node_wait_timeout:.0f} s, at least {self.min_available_nodes} needed")
            time.sleep(1.0)

    def _node_of(self, msg: Message, step: StepReplies) -> NodeRecord:
        """The record of the node a reply stands for (by Flower node id; a simulated partition only names it)."""
        claimed = None
        if msg.has_content():
            metrics = msg.content.metric_records.get(wire.METRICS)
            claimed = metrics.get(wire.PARTITION_ID) if metrics is not None else None
        return self.nodes.get(step.sender(msg), claimed)

    def _note_privacy(self, node: NodeRecord, metrics: MetricRecord, rnd: int) -> float:
        """Keep the privacy numbers of a reply whose epsilon passed `epsilon_problem`; returns that epsilon."""
        eps = float(metrics[wire.EPSILON])
        node.epsilon = eps
        entry = self.privacy.setdefault(node.label, {})
        for key, name in _PRIVACY_FIELDS.items():
            if _finite(metrics.get(key)):
                entry[name] = metrics[key] if name != "steps" else int(metrics[key])
        entry["epsilon"] = eps
        if wire.DP_ENABLED in metrics:
            entry["dp"] = bool(metrics[wire.DP_ENABLED])
        accountant = metrics.get(wire.ACCOUNTANT)
        if _is_integer(accountant) and 0 <= accountant < len(ACCOUNTANTS):
            entry["accountant"] = ACCOUNTANTS[int(accountant)]
        entry["last_round"] = rnd
        entry["node_id"] = node.node_id
        return eps


class MammoFedAvg(MammoStrategyMixin, FedAvg):
    """FedAvg with MammoFL's reply checks."""


class MammoFedProx(MammoStrategyMixin, FedProx):
    """FedProx (``proximal-mu`` sent to nodes each round) with MammoFL's reply checks."""


class MammoFedAdam(MammoStrategyMixin, FedAdam):
    """FedAdam (server-side Adam on the averaged update) with MammoFL's reply checks."""


def build_strategy(config: RunConfig, *, checkpoints: CheckpointStore | None = None) -> MammoStrategyMixin:
    """The strategy named by run config `strategy` (or, with distributed noise, FedSGD over secure aggregation:
    ``server.secure_aggregation``), sized by its min-* / fraction-* / timeout settings."""
    common = dict(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_nodes,
        min_evaluate_nodes=config.min_nodes if config.fraction_evaluate > 0 else 0,
        min_available_nodes=config.min_nodes,
        weighted_by_key=wire.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
        min_train_replies=config.min_train_replies,
        min_evaluate_replies=config.min_evaluate_replies,
        max_update_norm=config.max_update_norm,
        dp_required=config.dp,
        node_wait_timeout=config.round_timeout,
        checkpoints=checkpoints,
        final_round=config.num_server_rounds,
        evaluate_every=config.evaluate_every,
        update_encoding=config.update_encoding,
    )
    if config.distributed_dp:
        from server.secure_aggregation import SecureFedSGD, SecureRoundSettings

        settings = SecureRoundSettings(noise_multiplier=config.noise_multiplier, max_grad_norm=config.max_grad_norm,
                                       learning_rate=config.lr, batch_size=config.batch_size,
                                       dropouts=config.secagg_dropouts)
        return SecureFedSGD(**common, secure=settings, round_timeout=config.round_timeout)
    local_round = LocalRound(learning_rate=config.lr, batch_size=config.batch_size, epochs=config.local_epochs,
                             max_grad_norm=config.max_grad_norm, noise_multiplier=config.noise_multiplier)
    common.update(local_round=local_round if config.dp else None, aggregation=config.aggregation,
                  byzantine_nodes=config.byzantine_nodes)
    if config.strategy == "fedavg":
        return MammoFedAvg(**common)
    if config.strategy == "fedprox":
        return MammoFedProx(**common, proximal_mu=config.proximal_mu)
    return MammoFedAdam(**common, eta=config.fedadam_eta, eta_l=config.lr, beta_1=config.fedadam_beta_1,
                        beta_2=config.fedadam_beta_2, tau=config.fedadam_tau)


def aggregate_evaluation(records: list[MetricRecord]) -> MetricRecord:
    """Combine evaluation replies: confusion counts, score histograms and examples summed (noised counts: summed,
    then negatives clipped to 0), other metrics example-weighted means; ``EVALUATION_NOISE`` of the pooled counts.

    A metric a hospital could not compute (NaN, e.g. an AUC on a split with one class) is left out of that
    metric's mean instead of turning it into NaN; a metric nobody could compute stays NaN.
    """
    out = MetricRecord()
    weights = [max(float(r[wire.NUM_EXAMPLES]), 0.0) for r in records]
    out[wire.NUM_EXAMPLES] = max(int(sum(int(r[wire.NUM_EXAMPLES]) for r in records)), 0)
    keys = sorted({k for r in records for k in r if k not in (wire.NUM_EXAMPLES, wire.EVALUATION_NOISE)})
    noise = [float(r.get(wire.EVALUATION_NOISE, 0.0)) for r in records]
    out[wire.EVALUATION_NOISE] = math.sqrt(sum(v * v for v in noise))  # of each pooled count
    for key in keys:
        if wire.confusion_cell(key) is not None:
            out[key] = max(int(sum(int(r.get(key, 0)) for r in records)), 0)
            continue
        if key == wire.SCORE_HISTOGRAM:  # only hospitals that sent one; their (noised) counts add up, then clip
            pooled = sum(np.asarray(r[key], dtype=np.int64) for r in records if key in r)
            out[key] = [int(v) for v in clip_pooled(pooled)]
            continue
        out[key] = _weighted_mean([(r[key], w) for r, w in zip(records, weights) if key in r])
    return out


def _evaluation_problem(metrics: MetricRecord | None) -> str | None:
    """Why an evaluate reply cannot be pooled, or None. Noised counts (``EVALUATION_NOISE`` > 0) are integers of
    any sign; exact ones are non-negative and the score histogram must count exactly ``NUM_EXAMPLES`` images."""
    if metrics is None:
        return "evaluate reply without metrics"
    noise = metrics.get(wire.EVALUATION_NOISE, 0.0)
    if not _finite(noise) or noise < 0:
        return f"'{wire.EVALUATION_NOISE}' must be a finite number >= 0, got {noise!r}"
    noised = noise > 0
    n = metrics.get(wire.NUM_EXAMPLES)
    if not _is_integer(n) or (not noised and n <= 0) or abs(n) > MAX_NUM_EXAMPLES:
        return f"evaluate reply without a {'' if noised else 'positive '}integer '{wire.NUM_EXAMPLES}'"
    for key, value in metrics.items():
        if key != wire.SCORE_HISTOGRAM and not is_number(value):
            return f"metric '{key}' must be one number, got {type(value).__name__}"
    for key in metrics:
        if wire.confusion_cell(key) is not None and (not _is_integer(metrics[key]) or
                                                     (not noised and metrics[key] < 0)):
            return f"'{key}' must be an integer count, got {metrics[key]!r}"
    if wire.SCORE_HISTOGRAM in metrics:
        values = np.asarray(metrics[wire.SCORE_HISTOGRAM])
        if values.size != HISTOGRAM_CELLS or not np.all(np.isfinite(values)) \
                or (values != np.round(values)).any() or (not noised and (values < 0).any()):
            return f"'{wire.SCORE_HISTOGRAM}': must be {HISTOGRAM_CELLS} integer counts"
        if not noised and int(values.sum()) != n:
            return (f"'{wire.SCORE_HISTOGRAM}' counts {int(values.sum())} images, '{wire.NUM_EXAMPLES}' says "
                    f"{int(n)}")
    return None


def _weighted_mean(pairs: list[tuple[object, float]]) -> float:
    """Mean of the finite values weighted by their weights; NaN when there is none."""
    usable = [(float(v), float(w)) for v, w in pairs if _finite(v) and w > 0]
    total = sum(w for _, w in usable)
    return sum(v * w for v, w in usable) / total if total > 0 else float("nan")


def _essentials(msg: Message) -> Message:
    """The reply reduced to what Flower averages (weights, weighted by num-examples), same metadata."""
    metrics = msg.content.metric_records[wire.METRICS]
    content = RecordDict({
        wire.ARRAYS: msg.content.array_records[wire.ARRAYS],
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: metrics[wire.NUM_EXAMPLES]}),
    })
    return Message(content=content, metadata=msg.metadata)


def _refusal_reason(content: RecordDict) -> str:
    record = content.config_records.get(wire.REFUSAL)
    reason = record.get(wire.REASON) if record is not None else None
    return str(reason) if reason else "no reason given"


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)



def _is_integer(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
        and float(value) == int(value)
