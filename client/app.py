"""The hospital's Flower ClientApp: thin handlers over ``client.node``.

``app`` (declared in pyproject as ``client.app:app``): each handler reads the run and node configs once
(``common.run_config``), unpacks the global weights, calls a plain function, and packs the reply (layout in
``common.wire``): weights plus aggregate numbers, or a refusal with its reason and no weights. Across the rounds
of one run the node keeps, in ``context.state``, the rounds it has trained (a replayed round is refused); what must
outlive the run, the privacy ledger, is on the node's disk (node config ``state-dir``).

Distributed noise over secure aggregation: every ClientApp carries Flower's SecAgg+ mod (``secaggplus_mod``,
behind :func:`secure_aggregation_mod`, which hands it only SecAgg+ messages). Its setup, key-sharing and unmasking
stages never reach the handlers; in its masked-vector stage it calls the train handler with the round's legacy
``fitins``, and masks the noised gradient sum the handler returns before the reply leaves the node (the clear
arrays are removed). The handler reads the round's terms (participants, threshold, ranges) from the mod's own
state, so what it relies on comes from the protocol run on this node, not from the coordinator's config.

In-process simulation hands the apps an empty run config: :func:`make_client_app` takes the run config
overrides, optional per-partition node config overrides (e.g. a smaller ``max-epsilon`` for one virtual hospital)
and extra Flower mods.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import flwr.compat.common.recorddict_compat as compat
import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.app.message_type import MessageType
from flwr.client.mod import secaggplus_mod
from flwr.client.mod.secure_aggregation.secaggplus_mod import SecAggPlusState
from flwr.clientapp import ClientApp
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, RECORD_KEY_STATE, Stage

from client.console import quiet_known_notices
from client.readers.base import is_decoder_panic
from common import wire
from common.distributed_dp import SecureSumError, SecureSumRange
from common.node_policy import ACCOUNTANTS
from common.run_config import EXPLANATION_METHODS, ConfigError, NodeConfig, RunConfig
from common.update_encoding import encode_update

if TYPE_CHECKING:
    from client.node import TrainResult
    from client.training import EvalOutcome

__all__ = ["NodeFailure", "NodeRefusal", "app", "evaluation_reply_metrics", "make_client_app",
           "secure_aggregation_mod", "train_reply_metrics"]

# torch, Opacus and the training code are imported inside the handlers: in a deployment every message starts a
# fresh ClientApp process, and the SecAgg+ key exchanges (answered by the mod alone) need none of them.

log = logging.getLogger(__name__)
quiet_known_notices()  # Flower's and Opacus' known console notices, in every process that loads this app

_STATE = "mammofl-node"  # ConfigRecord in context.state
_TRAINED = "trained-rounds"
_EVALUATED = "evaluations"  # how many evaluations this node released in this run (its policy caps it)


class NodeFailure(RuntimeError):
    """What the coordinator learns when a handler fails: the error's type, never its message.

    Error messages can name files or patients (a reader's complaint about one image); Flower would send them to
    the coordinator as the error reply's reason. The full error goes to the hospital's own log instead.
    Configuration errors (which name config keys) pass unchanged.
    """


class NodeRefusal(RuntimeError):
    """A node declines a secure round (budget, policy, no secure aggregation). Raised, not replied: a SecAgg+
    participant that sends no masked vector is a dropout, which the protocol handles; the reason names no data."""


def secure_aggregation_mod(msg: Message, context: Context, call_next: Callable) -> Message:
    """Flower's SecAgg+ mod for SecAgg+ train messages; every other message goes straight to the handlers."""
    if msg.metadata.message_type == MessageType.TRAIN and RECORD_KEY_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def _confined(stage: str) -> Callable:
    def decorate(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def wrapped(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except (ConfigError, NodeRefusal):
                raise
            except Exception as error:  # noqa: BLE001 - every failure is reported, none with its message
                log.exception("%s failed", stage)
                raise NodeFailure(f"{type(error).__name__} during {stage}; the details are in the hospital's "
                                  f"own log") from None
            except BaseException as error:
                if not is_decoder_panic(error):
                    raise  # KeyboardInterrupt, SystemExit
                log.exception("%s failed: a decoder panicked", stage)
                raise NodeFailure(f"PanicException during {stage}; the details are in the hospital's own log") from None
        return wrapped
    return decorate


def make_client_app(*, overrides: Mapping[str, Any] | None = None,
                    node_overrides: Mapping[int, Mapping[str, Any]] | None = None,
                    mods: list | None = None) -> ClientApp:
    """A ClientApp; `overrides` win over Flower's run config, `node_overrides[partition_id]` over node config."""
    client_app = ClientApp(mods=[secure_aggregation_mod, *(mods or [])])

    def configs(context: Context) -> tuple[RunConfig, NodeConfig]:
        run = RunConfig.from_flower(context.run_config, overrides)
        values = dict(context.node_config)
        values.update((node_overrides or {}).get(values.get("partition-id"), {}))
        return run, NodeConfig.from_flower(values, run=run)

    @client_app.train()
    @_confined("training")
    def train(msg: Message, context: Context) -> Message:
        import torch

        from client.node import train_round

        torch.set_num_threads(1)
        run, node = configs(context)
        state = context.state.config_records.get(_STATE) or ConfigRecord({_TRAINED: []})
        if _LEGACY_FITINS in msg.content.array_records:
            return _secure_train(msg, context, run, node, state)
        server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
        result = train_round(run=run, node=node, global_weights=_weights(msg), server_round=server_round,
                             proximal_mu=float(msg.content[wire.CONFIG].get(wire.PROXIMAL_MU, 0.0)),
                             trained_rounds=frozenset(state[_TRAINED]), run_id=str(context.run_id),
                             run_key=str(msg.content[wire.CONFIG].get(wire.RUN_KEY, "")) or None)
        if not result.refused:
            state[_TRAINED] = [*state[_TRAINED], server_round]
            context.state[_STATE] = state
        return Message(_train_content(result, node, run.update_encoding, _weights(msg)), reply_to=msg)

    @client_app.evaluate()
    @_confined("evaluation")
    def evaluate(msg: Message, context: Context) -> Message:
        import torch

        from client.node import evaluate_round

        torch.set_num_threads(1)
        run, node = configs(context)
        config = msg.content[wire.CONFIG]
        state = context.state.config_records.get(_STATE) or ConfigRecord({_TRAINED: []})
        done = int(state.get(_EVALUATED, 0))
        release = evaluate_round(run=run, node=node, global_weights=_weights(msg),
                                 server_round=int(config[wire.SERVER_ROUND]), evaluations_done=done,
                                 score_histogram=bool(config.get(wire.WANT_SCORE_HISTOGRAM)),
                                 run_id=str(context.run_id))
        if release.refused:
            return Message(_refusal_content(release.refusal), reply_to=msg)
        state[_EVALUATED] = done + 1
        context.state[_STATE] = state
        return Message(RecordDict({wire.METRICS: evaluation_reply_metrics(release)}), reply_to=msg)

    @client_app.query()
    @_confined("explanation")
    def query(msg: Message, context: Context) -> Message:
        import torch

        from client.node import release_explanations

        torch.set_num_threads(1)
        run, node = configs(context)
        methods = tuple(m for m in str(msg.content[wire.CONFIG][wire.EXPLAIN_METHODS]).split(",") if m)
        unknown = [m for m in methods if m not in EXPLANATION_METHODS]
        if unknown:
            raise ConfigError(f"'{wire.EXPLAIN_METHODS}': unknown method(s) {unknown}")
        release = release_explanations(run=run, node=node, global_weights=_weights(msg), methods=methods,
                                       run_id=str(context.run_id))
        if release.refused:
            return Message(_refusal_content(release.refusal), reply_to=msg)
        metrics = explanation_reply_metrics(release.tally, node)
        metrics[wire.EVALUATION_NOISE] = float(release.noise_std)
        return Message(RecordDict({wire.METRICS: metrics}), reply_to=msg)

    return client_app


def explanation_reply_metrics(tally, node: NodeConfig) -> MetricRecord:
    """The numbers a query (explanation) reply carries: counts and sums, no per-image value."""
    metrics: dict[str, float | int] = {wire.EXPLAINED_IMAGES: int(tally.images),
                                       wire.EXPLAIN_BASELINE_SUM: float(tally.baseline_sum)}
    for method in tally.methods:
        metrics[wire.explain_key(method, "hits")] = int(tally.hits.get(method, 0))
        metrics[wire.explain_key(method, "mass-sum")] = float(tally.mass_sum.get(method, 0.0))
    if node.partition_id is not None:
        metrics[wire.PARTITION_ID] = int(node.partition_id)
    return MetricRecord(metrics)


_LEGACY_FITINS = "fitins.parameters"  # a legacy (SecAgg+) training instruction's ArrayRecord


def _secure_train(msg: Message, context: Context, run: RunConfig, node: NodeConfig, state: ConfigRecord) -> Message:
    """The SecAgg+ masked-vector stage's call: train one step with this node's noise share, reply legacy fitres."""
    from client.node import SecureRoundTerms, train_secure_round

    protocol = context.state.config_records.get(RECORD_KEY_STATE)
    if RECORD_KEY_CONFIGS not in msg.content.config_records or protocol is None:
        raise NodeRefusal("refused: a training instruction for a secure sum arrived without secure aggregation "
                          "(no SecAgg+ state on this node): this node's update would leave in clear")
    secagg = SecAggPlusState(**protocol)
    if secagg.current_stage != Stage.SHARE_KEYS:
        raise NodeRefusal(f"refused: SecAgg+ is at stage '{secagg.current_stage}', expected the keys to be shared "
                          f"before training")
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    keys = wire.split_keys(str(fitins.config.get(wire.WEIGHT_KEYS, "")))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(keys) != len(arrays):
        raise ValueError(f"{len(arrays)} weight arrays but {len(keys)} names in '{wire.WEIGHT_KEYS}'")
    server_round = int(fitins.config[wire.SERVER_ROUND])
    try:
        sum_range = SecureSumRange(clipping_range=float(secagg.clipping_range),
                                   quantization_range=int(secagg.target_range), modulus_range=int(secagg.mod_range),
                                   participants=int(secagg.sample_num))
    except SecureSumError as error:  # the announced ranges would let the sum wrap around
        raise NodeRefusal(f"refused: {error}") from None
    terms = SecureRoundTerms(participants=int(secagg.sample_num), threshold=int(secagg.threshold),
                             max_weight=float(secagg.max_weight), sum_range=sum_range)
    result = train_secure_round(run=run, node=node, global_weights=dict(zip(keys, arrays)),
                                server_round=server_round, terms=terms, trained_rounds=frozenset(state[_TRAINED]),
                                run_id=str(context.run_id), run_key=str(fitins.config.get(wire.RUN_KEY, "")) or None)
    if result.refused:
        raise NodeRefusal(result.refusal)
    state[_TRAINED] = [*state[_TRAINED], server_round]
    context.state[_STATE] = state
    metrics = dict(train_reply_metrics(result, node))
    fitres = FitRes(status=Status(code=Code.OK, message="ok"),
                    parameters=ndarrays_to_parameters([result.gradient_sum[k] for k in keys]),
                    num_examples=1, metrics=metrics)
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


def train_reply_metrics(result: TrainResult, node: NodeConfig) -> MetricRecord:
    """The numbers a train (or refusal) reply carries; a secure round's (``gradient_sum`` set) has no loss."""
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.EPSILON: float(result.epsilon),
        wire.EPSILON_OWN_NOISE: float(result.epsilon_own_noise),
        wire.DELTA: float(result.delta),
        wire.ACCOUNTANT: ACCOUNTANTS.index(result.accountant),
        wire.STEPS: int(result.steps),
        wire.REFUSED: 1.0 if result.refused else 0.0,
    }
    if result.refused:
        metrics[wire.MAX_EPSILON] = float(result.max_epsilon)
    else:
        metrics.update({wire.NOISE_MULTIPLIER: float(result.noise_multiplier),
                        wire.AGGREGATE_NOISE_MULTIPLIER: float(result.aggregate_noise_multiplier),
                        wire.MAX_GRAD_NORM: float(result.max_grad_norm),
                        wire.DP_ENABLED: 1.0 if result.dp else 0.0})
        if result.gradient_sum is None:
            metrics[wire.TRAIN_LOSS] = float(result.train_loss)
    if node.partition_id is not None:
        metrics[wire.PARTITION_ID] = node.partition_id
    return MetricRecord(metrics)


def evaluation_reply_metrics(release) -> MetricRecord:
    """The numbers an evaluate reply carries (``client.node.EvaluationRelease``): example count and confusion
    counts, noised unless the node's policy releases them in clear (then also loss and the other metrics); the score
    histogram when asked; ``EVALUATION_NOISE``, the standard deviation of the noise on each count (0 = exact)."""
    from common.metrics import scalar_metrics

    metrics: dict[str, float | int | list[int]] = {wire.NUM_EXAMPLES: int(release.num_examples),
                                                   wire.EVALUATION_NOISE: float(release.noise_std)}
    if math.isfinite(release.loss):
        metrics[wire.EVAL_LOSS] = float(release.loss)
    for i, row in enumerate(release.confusion):
        for j, count in enumerate(row):
            metrics[wire.confusion_key(i, j)] = int(count)
    for key, value in scalar_metrics(release.metrics or {}).items():
        if key != "n" and wire.confusion_cell(key) is None:
            metrics[key] = float(value)
    if release.score_histogram is not None:
        metrics[wire.SCORE_HISTOGRAM] = [int(v) for v in release.score_histogram]
    return MetricRecord(metrics)


def _train_content(result: TrainResult, node: NodeConfig, encoding: str = "float32",
                   global_weights: Mapping[str, np.ndarray] | None = None) -> RecordDict:
    """The train reply: metrics, and the trained weights as run config ``update-encoding`` says (relative to the
    round's `global_weights`; ``common.update_encoding``), or the refusal."""
    content = RecordDict({wire.METRICS: train_reply_metrics(result, node)})
    if result.refused:
        content[wire.REFUSAL] = ConfigRecord({wire.REASON: result.refusal})
    else:
        encoded = encode_update(result.weights, global_weights or {}, encoding)
        content[wire.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in encoded.items()})
    return content


def _refusal_content(reason: str) -> RecordDict:
    """An evaluation or explanation the node's policy refuses: nothing about its data, the reason."""
    return RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0, wire.REFUSED: 1.0}),
                       wire.REFUSAL: ConfigRecord({wire.REASON: reason})})


def _weights(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()}


app = make_client_app()
