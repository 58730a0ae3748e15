"""The hospital's Flower ClientApp: thin handlers over ``client.node``.

``app`` (declared in pyproject as ``client.app:app``): each handler reads the run and node configs once
(``common.run_config``), unpacks the global weights, calls a plain function, and packs the reply (layout in
``common.wire``): weights plus aggregate numbers, or a refusal with its reason and no weights. Across the rounds
of one run the node keeps, in ``context.state``, the rounds it has trained (a replayed round is refused); what must
outlive the run, the privacy ledger, is on the node's disk (node config ``state-dir``).

In-process simulation hands the apps an empty run config: :func:`make_client_app` takes the run config
overrides, optional per-partition node config overrides (e.g. a smaller ``max-epsilon`` for one virtual hospital)
and extra Flower mods.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client.node import TrainResult, evaluate_round, local_train_config, train_round
from client.training import EvalOutcome
from common import wire
from common.metrics import scalar_metrics
from common.run_config import ConfigError, NodeConfig, RunConfig

__all__ = ["NodeFailure", "app", "evaluation_reply_metrics", "local_train_config", "make_client_app",
           "train_reply_metrics"]

log = logging.getLogger(__name__)

_STATE = "mammofl-node"  # ConfigRecord in context.state
_TRAINED = "trained-rounds"


class NodeFailure(RuntimeError):
    """What the coordinator learns when a handler fails: the error's type, never its message.

    Error messages can name files or patients (a reader's complaint about one image); Flower would send them to
    the coordinator as the error reply's reason. The full error goes to the hospital's own log instead.
    Configuration errors (which name config keys) pass unchanged.
    """


def _confined(stage: str) -> Callable:
    def decorate(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
        @functools.wraps(handler)
        def wrapped(msg: Message, context: Context) -> Message:
            try:
                return handler(msg, context)
            except ConfigError:
                raise
            except Exception as error:  # noqa: BLE001 - every failure is reported, none with its message
                log.exception("%s failed", stage)
                raise NodeFailure(f"{type(error).__name__} during {stage}; the details are in the hospital's "
                                  f"own log") from None
        return wrapped
    return decorate


def make_client_app(*, overrides: Mapping[str, Any] | None = None,
                    node_overrides: Mapping[int, Mapping[str, Any]] | None = None,
                    mods: list | None = None) -> ClientApp:
    """A ClientApp; `overrides` win over Flower's run config, `node_overrides[partition_id]` over node config."""
    client_app = ClientApp(mods=list(mods or []))

    def configs(context: Context) -> tuple[RunConfig, NodeConfig]:
        run = RunConfig.from_flower(context.run_config, overrides)
        values = dict(context.node_config)
        values.update((node_overrides or {}).get(values.get("partition-id"), {}))
        return run, NodeConfig.from_flower(values, run=run)

    @client_app.train()
    @_confined("training")
    def train(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        run, node = configs(context)
        state = context.state.config_records.get(_STATE) or ConfigRecord({_TRAINED: []})
        server_round = int(msg.content[wire.CONFIG][wire.SERVER_ROUND])
        result = train_round(run=run, node=node, global_weights=_weights(msg), server_round=server_round,
                             proximal_mu=float(msg.content[wire.CONFIG].get(wire.PROXIMAL_MU, 0.0)),
                             trained_rounds=frozenset(state[_TRAINED]), run_id=str(context.run_id))
        if not result.refused:
            state[_TRAINED] = [*state[_TRAINED], server_round]
            context.state[_STATE] = state
        return Message(_train_content(result, node), reply_to=msg)

    @client_app.evaluate()
    @_confined("evaluation")
    def evaluate(msg: Message, context: Context) -> Message:
        torch.set_num_threads(1)
        run, node = configs(context)
        outcome = evaluate_round(run=run, node=node, global_weights=_weights(msg),
                                 server_round=int(msg.content[wire.CONFIG][wire.SERVER_ROUND]))
        return Message(RecordDict({wire.METRICS: evaluation_reply_metrics(outcome)}), reply_to=msg)

    return client_app


def train_reply_metrics(result: TrainResult, node: NodeConfig) -> MetricRecord:
    """The numbers a train (or refusal) reply carries."""
    metrics = {
        wire.NUM_EXAMPLES: result.num_examples,
        wire.EPSILON: float(result.epsilon),
        wire.DELTA: float(result.delta),
        wire.STEPS: int(result.steps),
        wire.REFUSED: 1.0 if result.refused else 0.0,
    }
    if result.refused:
        metrics[wire.MAX_EPSILON] = float(result.max_epsilon)
    else:
        metrics.update({wire.TRAIN_LOSS: float(result.train_loss),
                        wire.NOISE_MULTIPLIER: float(result.noise_multiplier),
                        wire.MAX_GRAD_NORM: float(result.max_grad_norm),
                        wire.DP_ENABLED: 1.0 if result.dp else 0.0})
    if node.partition_id is not None:
        metrics[wire.PARTITION_ID] = node.partition_id
    return MetricRecord(metrics)


def evaluation_reply_metrics(outcome: EvalOutcome) -> MetricRecord:
    """The numbers an evaluate reply carries: example count, loss, defined metrics, confusion counts."""
    metrics: dict[str, float | int] = {wire.NUM_EXAMPLES: int(outcome.num_examples)}
    if math.isfinite(outcome.loss):
        metrics[wire.EVAL_LOSS] = float(outcome.loss)
    for key, value in scalar_metrics(outcome.metrics).items():
        if key == "n":
            continue
        metrics[key] = int(value) if wire.confusion_cell(key) is not None else float(value)
    return MetricRecord(metrics)


def _train_content(result: TrainResult, node: NodeConfig) -> RecordDict:
    content = RecordDict({wire.METRICS: train_reply_metrics(result, node)})
    if result.refused:
        content[wire.REFUSAL] = ConfigRecord({wire.REASON: result.refusal})
    else:
        content[wire.ARRAYS] = ArrayRecord({k: Array(np.asarray(v)) for k, v in result.weights.items()})
    return content


def _weights(msg: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in msg.content[wire.ARRAYS].items()}


app = make_client_app()
