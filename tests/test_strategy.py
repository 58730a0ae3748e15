"""Strategy hooks driven with hand-built reply Messages (as Flower tests its own strategies).

Only the transport is stood in for: `NodesGrid` answers `get_node_ids` and nothing else; every reply is a real
Flower Message built as a reply to a real instruction Message.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common import wire
from common.aggregation import weighted_average
from common.metrics import classification_metrics
from common.run_config import RunConfig
from server.checkpoints import CheckpointStore
from common.operating_point import ScoreHistogram, choose_operating_point, decide
from common.operating_point import auc as histogram_auc
from server.run_directory import eval_entry, final_from_federated, release_operating_point, with_operating_point
from server.strategy import TooFewReplies, aggregate_evaluation, build_strategy
from signed_files import SIGNER, TRUSTED
from flower_messages import NodesGrid

pytestmark = pytest.mark.usefixtures("serverapp_identity")

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}


def _config(**overrides) -> RunConfig:
    """Local noise (each hospital's update in clear): the strategies under test here; secure rounds are
    tested in test_secure_aggregation.py. The hand-made updates move further than DP-SGD could: the derived
    update bound (tests/test_hostile_replies.py) is replaced by a loose fixed one."""
    base = {"min-nodes": 3, "min-train-replies": 2, "min-evaluate-replies": 1, "round-timeout": 2.0,
            "dp-mode": "local", "max-update-norm": 1e6}
    base.update(overrides)
    return RunConfig.from_flower(base)


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _instructions(strategy, rnd=1, nodes=(11, 12, 13)):
    return list(strategy.configure_train(rnd, _arrays(GLOBAL), ConfigRecord(), NodesGrid(nodes)))


def _train_reply(instruction, *, w, b, n, loss=0.5, eps=1.0, steps=4, partition=None):
    metrics = {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: loss, wire.EPSILON: eps, wire.EPSILON_OWN_NOISE: eps,
               wire.DELTA: 1e-5, wire.NOISE_MULTIPLIER: 1.1, wire.AGGREGATE_NOISE_MULTIPLIER: 1.1,
               wire.MAX_GRAD_NORM: 1.0, wire.STEPS: steps, wire.DP_ENABLED: 1.0,
               wire.REFUSED: 0.0}
    if partition is not None:
        metrics[wire.PARTITION_ID] = partition
    content = RecordDict({wire.ARRAYS: _arrays({"w": w, "b": b}), wire.METRICS: MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def _refusal(instruction, *, eps):
    content = RecordDict({
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0, wire.REFUSED: 1.0, wire.EPSILON: eps, wire.DELTA: 1e-5,
                                    wire.MAX_EPSILON: 4.0, wire.STEPS: 40}),
        wire.REFUSAL: ConfigRecord({wire.REASON: "budget: 3.9 -> 4.3 > 4.0"}),
    })
    return Message(content, reply_to=instruction)


def _w(value):
    return np.full((2, 3), value, dtype=np.float32)


def _b(value):
    return np.full(3, value, dtype=np.float32)


def test_configure_train_samples_every_node_and_sends_round_and_weights():
    strategy = build_strategy(_config())
    messages = _instructions(strategy, rnd=1)
    assert sorted(m.metadata.dst_node_id for m in messages) == [11, 12, 13]
    assert all(m.metadata.message_type == MessageType.TRAIN for m in messages)
    assert messages[0].content[wire.CONFIG][wire.SERVER_ROUND] == 1
    assert set(messages[0].content[wire.ARRAYS]) == {"w", "b"}


def test_epsilon_is_max_refusals_counted_and_excluded_from_average():
    strategy = build_strategy(_config())
    ins = _instructions(strategy)
    replies = [
        _train_reply(ins[0], w=_w(1.0), b=_b(1.0), n=10, loss=1.0, eps=2.5, partition=0),
        _train_reply(ins[1], w=_w(4.0), b=_b(4.0), n=30, loss=2.0, eps=1.5, partition=1),
        _refusal(ins[2], eps=3.9),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), (10 * 1.0 + 30 * 4.0) / 40))
    assert metrics["epsilon-max"] == 3.9  # the refusing hospital has spent the most: max, not mean
    assert metrics[wire.TRAIN_LOSS] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert (metrics["replies-valid"], metrics["replies-refused"], metrics["replies-rejected"]) == (2, 1, 0)
    report = strategy.train_reports[1]
    assert report.refused == 1 and report.missing == 0
    assert any("refused: budget: 3.9 -> 4.3 > 4.0" in note for note in report.notes)
    assert strategy.privacy["partition-0"]["epsilon"] == 2.5
    assert strategy.privacy["partition-1"]["steps"] == 4
    assert strategy.privacy[f"node-{ins[2].metadata.dst_node_id}"]["refusals"] == 1


@pytest.mark.parametrize("bad, why", [
    (dict(w=np.full((2, 3), np.nan, dtype=np.float32)), "NaN or Inf"),
    (dict(w=np.full((2, 3), np.inf, dtype=np.float32)), "NaN or Inf"),
    (dict(w=np.zeros((3, 2), dtype=np.float32)), "expected float32[2, 3]"),
    (dict(w=np.full((2, 3), 1e4, dtype=np.float32)), "exceeds the bound"),
    (dict(n=0), "must be an integer in [1, "),
])
def test_bad_update_is_rejected_and_the_others_aggregated(bad, why):
    strategy = build_strategy(_config(**{"max-update-norm": 100.0}))
    ins = _instructions(strategy)
    kwargs = dict(w=_w(0.0), b=_b(0.0), n=5)
    kwargs.update(bad)
    replies = [_train_reply(ins[0], w=_w(2.0), b=_b(2.0), n=10),
               _train_reply(ins[1], w=_w(4.0), b=_b(4.0), n=10),
               _train_reply(ins[2], **kwargs)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 3.0))
    assert metrics["replies-rejected"] == 1
    assert any(why in note for note in strategy.train_reports[1].notes)


def test_too_few_valid_replies_fails_loudly():
    strategy = build_strategy(_config())
    ins = _instructions(strategy)
    failure = Message(Error(code=0, reason="node crashed"), reply_to=ins[1])
    replies = [_train_reply(ins[0], w=_w(1.0), b=_b(1.0), n=10), failure]  # third node never answers
    with pytest.raises(TooFewReplies, match=r"round 1: 1 valid training replies, at least 2 needed .*failed 1, "
                                            r"no reply 1"):
        strategy.aggregate_train(1, replies)


def test_too_few_connected_nodes_fails_instead_of_waiting_forever():
    strategy = build_strategy(_config(**{"round-timeout": 1.0}))
    with pytest.raises(TooFewReplies, match="2 nodes connected .* at least 3 needed"):
        _instructions(strategy, nodes=(1, 2))


def test_checkpoint_written_each_round_and_resume_continues_numbering(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", signer=SIGNER, trusted=TRUSTED)
    strategy = build_strategy(_config(strategy="fedadam"), checkpoints=store)
    for rnd, value in ((1, 1.0), (2, 2.0)):
        ins = _instructions(strategy, rnd=rnd)
        strategy.aggregate_train(rnd, [_train_reply(m, w=_w(value), b=_b(value), n=4, eps=rnd, partition=i)
                                       for i, m in enumerate(ins)])
    assert store.rounds() == [1, 2]
    latest = store.latest()
    assert latest.round == 2 and set(latest.arrays) == {"w", "b"}
    assert {k.split("/")[0] for k in latest.strategy_state} == {"m_t", "v_t"}
    assert latest.meta["privacy"]["partition-2"]["epsilon"] == 2
    assert latest.meta["train_metrics"]["epsilon-max"] == 2

    resumed = build_strategy(_config(strategy="fedadam"), checkpoints=store)
    resumed.restore(latest)
    ins = _instructions(resumed, rnd=1)  # Flower's start() counts from 1 again
    assert ins[0].content[wire.CONFIG][wire.SERVER_ROUND] == 3
    np.testing.assert_array_equal(resumed.m_t["w"], strategy.m_t["w"])
    resumed.aggregate_train(1, [_train_reply(m, w=_w(3.0), b=_b(3.0), n=4, eps=3.0) for m in ins])
    assert store.rounds() == [1, 2, 3]


def test_evaluation_sums_confusion_counts_and_skips_nan_metrics():
    records = [
        MetricRecord({wire.NUM_EXAMPLES: 10, wire.EVAL_LOSS: 1.0, "auc_malignant": 0.8,
                      wire.confusion_key(0, 0): 6, wire.confusion_key(2, 2): 4}),
        MetricRecord({wire.NUM_EXAMPLES: 30, wire.EVAL_LOSS: 2.0, "auc_malignant": float("nan"),
                      wire.confusion_key(0, 0): 20, wire.confusion_key(2, 2): 10}),
    ]
    out = aggregate_evaluation(records)
    assert out[wire.NUM_EXAMPLES] == 40
    assert out[wire.EVAL_LOSS] == pytest.approx(1.75)
    assert out["auc_malignant"] == pytest.approx(0.8)  # the NaN hospital is left out, not averaged in
    assert (out[wire.confusion_key(0, 0)], out[wire.confusion_key(2, 2)]) == (26, 14)
    assert math.isnan(aggregate_evaluation([records[1]])["auc_malignant"])


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_aggregation_equals_the_framework_free_weighted_average(name):
    rng = np.random.default_rng(0)
    strategy = build_strategy(_config(strategy=name))
    ins = _instructions(strategy)
    updates = [({"w": rng.normal(size=(2, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}, n)
               for n in (7, 19, 2)]
    replies = [_train_reply(m, w=u["w"], b=u["b"], n=n) for m, (u, n) in zip(ins, updates)]
    arrays, _ = strategy.aggregate_train(1, replies)
    expected = weighted_average(updates)
    for key in ("w", "b"):
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)
    if name == "fedprox":
        assert ins[0].content[wire.CONFIG][wire.PROXIMAL_MU] == 0.01


def test_final_metrics_from_federated_counts_match_the_pooled_definitions():
    records = [MetricRecord({wire.NUM_EXAMPLES: 5, "auc_malignant": 0.6, wire.confusion_key(0, 0): 3,
                             wire.confusion_key(2, 2): 1, wire.confusion_key(1, 2): 1}),
               MetricRecord({wire.NUM_EXAMPLES: 5, "auc_malignant": 0.8, wire.confusion_key(0, 1): 2,
                             wire.confusion_key(2, 0): 1, wire.confusion_key(1, 1): 2})]
    entry = eval_entry(aggregate_evaluation(records))
    assert entry["confusion_matrix"] == [[3, 2, 0], [0, 2, 1], [1, 0, 1]]
    final = final_from_federated(entry)
    y = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2]
    pred = [0, 0, 0, 1, 1, 1, 1, 2, 2, 0]
    pooled = classification_metrics(y, np.eye(3)[pred])
    assert final["confusion_matrix"] == pooled["confusion_matrix"]
    for key in ("accuracy", "precision", "recall", "specificity", "f1_macro"):
        assert final[key] == pytest.approx(pooled[key]), key
    assert final["auc_malignant"] == pytest.approx(0.7)


def _eval_reply(instruction, *, labels, probs, histogram=None):
    from client.app import evaluation_reply_metrics
    from client.node import exact_release
    from common.evaluation import EvalOutcome

    outcome = EvalOutcome(num_examples=len(labels), loss=0.5, metrics=classification_metrics(labels, probs),
                          score_histogram=ScoreHistogram.of(labels, probs))
    metrics = evaluation_reply_metrics(exact_release(outcome, score_histogram=True))  # a node releasing in clear
    if histogram is not None:
        metrics[wire.SCORE_HISTOGRAM] = histogram
    return Message(RecordDict({wire.METRICS: metrics}), reply_to=instruction)


def test_only_the_final_round_asks_for_score_histograms_and_they_add_up_to_the_pooled_one():
    rng = np.random.default_rng(5)
    strategy = build_strategy(_config(**{"num-server-rounds": 2}))
    grid = NodesGrid((11, 12, 13))
    first = list(strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), grid))
    assert all(wire.WANT_SCORE_HISTOGRAM not in m.content[wire.CONFIG] for m in first)
    last = list(strategy.configure_evaluate(2, _arrays(GLOBAL), ConfigRecord(), grid))
    assert all(m.content[wire.CONFIG][wire.WANT_SCORE_HISTOGRAM] == 1 for m in last)
    splits = [(rng.integers(0, 3, n), rng.dirichlet([1, 1, 1], n)) for n in (8, 13, 5)]
    out = strategy.aggregate_evaluate(2, [_eval_reply(m, labels=y, probs=p) for m, (y, p) in zip(last, splits)])
    pooled = ScoreHistogram.of(np.concatenate([y for y, _ in splits]), np.concatenate([p for _, p in splits]))
    assert out[wire.SCORE_HISTOGRAM] == pooled.flat()
    entry = eval_entry(out)
    assert ScoreHistogram.from_json(entry["score_histogram"]).counts.tolist() == pooled.counts.tolist()
    final = final_from_federated(entry)
    assert final["auc_malignant"] == pytest.approx(histogram_auc(pooled))


@pytest.mark.parametrize("bad, why", [
    ([1.5] * 600, "integer counts"),
    ([0] * 599, "integer counts"),
    ([1] + [0] * 599, "counts 1 images"),
])
def test_a_malformed_score_histogram_is_rejected_not_fatal(bad, why):
    rng = np.random.default_rng(6)
    strategy = build_strategy(_config(**{"num-server-rounds": 1}))
    ins = list(strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), NodesGrid((11, 12, 13))))
    y, p = rng.integers(0, 3, 6), rng.dirichlet([1, 1, 1], 6)
    replies = [_eval_reply(ins[0], labels=y, probs=p, histogram=bad)] + [
        _eval_reply(m, labels=y, probs=p) for m in ins[1:]]
    out = strategy.aggregate_evaluate(1, replies)
    report = strategy.evaluate_reports[1]
    assert (report.valid, report.rejected) == (2, 1)
    assert why in report.notes[0]
    assert out[wire.NUM_EXAMPLES] == 12


def test_release_operating_point_is_chosen_on_validation_and_applied_to_the_final_metrics():
    rng = np.random.default_rng(7)
    y_val, p_val = rng.integers(0, 3, 60), rng.dirichlet([1, 1, 1], 60)
    y_test, p_test = rng.integers(0, 3, 40), rng.dirichlet([1, 1, 1], 40)
    rounds = [{"round": 1, "federated_eval": {}},
              {"round": 2, "federated_eval": {"score_histogram": ScoreHistogram.of(y_val, p_val).to_json()}}]
    point = release_operating_point(rounds, rule="sensitivity", target=0.8)
    assert point == choose_operating_point(ScoreHistogram.of(y_val, p_val), rule="sensitivity", target=0.8,
                                           source=point.source)
    assert "round 2 (60 images)" in point.source
    final = with_operating_point({"score_histogram": ScoreHistogram.of(y_test, p_test).to_json()}, point)
    decided = decide(p_test, point.threshold)
    expected = classification_metrics(y_test, np.eye(3)[decided])
    assert final["at_operating_point"]["confusion_matrix"] == expected["confusion_matrix"]
    assert final["at_operating_point"]["recall"] == pytest.approx(expected["recall"])
    assert final["at_operating_point"]["specificity"] == pytest.approx(expected["specificity"])
    assert final["operating_point"]["threshold"] == point.threshold
    assert release_operating_point(rounds[:1], rule="youden", target=0.9) is None
