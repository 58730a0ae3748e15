"""A hostile or broken hospital node against the coordinator's strategy: every reply here is a real Flower Message
answering a real instruction; message ids are stamped the way Flower's SuperLink stamps them (``object_id``).

Each test is one measured weakness of the strategy before these checks (issue 13): a node's huge `num-examples`
became the model; a norm of 999 passed the default bound; epsilon as NaN, negative or a list was accepted and left
out of epsilon-max; a spoofed `partition-id` overwrote another hospital's epsilon; a reply sent three times counted
three times; an evaluate reply with a NaN count crashed the run.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedMedian, FedTrimmedAvg, Krum

from common import wire
from common.run_config import ConfigError, RunConfig
from common.update_bound import dp_sgd_update_bound
from server.checkpoints import CheckpointStore
from server.strategy import TooFewReplies, build_strategy
from signed_files import SIGNER, TRUSTED
from flower_messages import NodesGrid

pytestmark = pytest.mark.usefixtures("serverapp_identity")

GLOBAL = {"w": np.zeros((2, 3), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)}
NODES = (11, 12, 13)


def _stamped(msg: Message) -> Message:
    """The message id the SuperLink gives a message it stores (flwr.server.superlink.linkstate.utils)."""
    msg.metadata.__dict__["_message_id"] = msg.object_id
    return msg


def _config(**overrides) -> RunConfig:
    base = {"min-nodes": 3, "min-train-replies": 2, "min-evaluate-replies": 1, "round-timeout": 2.0,
            "dp-mode": "local"}
    base.update(overrides)
    return RunConfig.from_flower(base)


def _arrays(values: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in values.items()})


def _instructions(strategy, rnd=1, nodes=NODES, weights=None) -> dict[int, Message]:
    """The round's train instructions by destination node id, stamped as the grid's push does."""
    messages = strategy.configure_train(rnd, _arrays(weights or GLOBAL), ConfigRecord(), NodesGrid(nodes))
    return {m.metadata.dst_node_id: _stamped(m) for m in messages}


def _metrics(n=10, eps=1.0, loss=0.5, partition=None, **changes) -> dict:
    metrics = {wire.NUM_EXAMPLES: n, wire.TRAIN_LOSS: loss, wire.EPSILON: eps, wire.EPSILON_OWN_NOISE: eps,
               wire.DELTA: 1e-5, wire.NOISE_MULTIPLIER: 1.0, wire.AGGREGATE_NOISE_MULTIPLIER: 1.0,
               wire.MAX_GRAD_NORM: 1.0, wire.STEPS: 4, wire.DP_ENABLED: 1.0, wire.REFUSED: 0.0}
    if partition is not None:
        metrics[wire.PARTITION_ID] = partition
    metrics.update(changes)
    return metrics


def _reply(instruction: Message, value: float = 0.0, *, weights=None, **metrics) -> Message:
    weights = weights or {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32)}
    content = RecordDict({wire.ARRAYS: _arrays(weights), wire.METRICS: MetricRecord(_metrics(**metrics))})
    return _stamped(Message(content, reply_to=instruction))


def _refusal(instruction: Message, *, eps) -> Message:
    content = RecordDict({
        wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0, wire.REFUSED: 1.0, wire.EPSILON: eps,
                                    wire.EPSILON_OWN_NOISE: 3.9, wire.DELTA: 1e-5, wire.MAX_EPSILON: 4.0,
                                    wire.STEPS: 40}),
        wire.REFUSAL: ConfigRecord({wire.REASON: "budget: 3.9 -> 4.3 > 4.0"}),
    })
    return _stamped(Message(content, reply_to=instruction))


def _loose(**overrides) -> RunConfig:
    """Hand-made updates move further than DP-SGD could: a loose fixed norm bound for the tests of other rules."""
    return _config(**{"max-update-norm": 1e6, **overrides})


# ---------------------------------------------------------------- num-examples
def test_a_num_examples_of_1e9_is_rejected_and_does_not_become_the_model(caplog):
    strategy = build_strategy(_loose())
    ins = _instructions(strategy)
    arrays, metrics = strategy.aggregate_train(1, [_reply(ins[11], 1.0, n=10), _reply(ins[12], 3.0, n=10),
                                                   _reply(ins[13], 500.0, n=1e9)])
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 2.0, np.float32))
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (2, 1)
    assert "node-13: rejected: 'num-examples' must be an integer in [1, 10000000], got 1000000000.0" in caplog.text


@pytest.mark.parametrize("n", [10.5, -3, 0, float("nan"), float("inf"), [10]])
def test_num_examples_must_be_a_positive_integer(n):
    strategy = build_strategy(_loose())
    ins = _instructions(strategy)
    _, metrics = strategy.aggregate_train(1, [_reply(ins[11], n=10), _reply(ins[12], n=10), _reply(ins[13], n=n)])
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (2, 1)
    assert "'num-examples' must be an integer" in strategy.train_reports[1].notes[0]


def test_num_examples_is_fixed_by_the_first_reply_of_a_node_for_the_run(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", signer=SIGNER, trusted=TRUSTED)
    strategy = build_strategy(_loose(), checkpoints=store)
    ins = _instructions(strategy, rnd=1)
    strategy.aggregate_train(1, [_reply(ins[node], n=n) for node, n in ((11, 10), (12, 20), (13, 30))])
    ins = _instructions(strategy, rnd=2)
    arrays, metrics = strategy.aggregate_train(2, [_reply(ins[11], 1.0, n=10), _reply(ins[12], 3.0, n=20),
                                                   _reply(ins[13], 90.0, n=3000)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), (10 * 1.0 + 20 * 3.0) / 30), rtol=1e-6)
    assert metrics["replies-rejected"] == 1
    assert strategy.train_reports[2].notes == [
        "node-13: rejected: 'num-examples' 3000 differs from the 30 this node declared earlier in the run (its "
        "training split does not change within a run)"]

    resumed = build_strategy(_loose(), checkpoints=store)  # a restarted coordinator keeps the declarations
    resumed.restore(store.latest())
    ins = _instructions(resumed, rnd=1)
    _, metrics = resumed.aggregate_train(1, [_reply(ins[11], n=10), _reply(ins[12], n=20),
                                             _reply(ins[13], n=3000)])
    assert metrics["replies-rejected"] == 1


# ---------------------------------------------------------------- update bound
def test_the_default_bound_rejects_a_norm_of_999_and_names_the_node(caplog):
    strategy = build_strategy(_config())  # max-update-norm 0: derived from the DP-SGD settings
    assert strategy.max_update_norm == 0.0
    ins = _instructions(strategy)
    step = np.full((2, 3), 999.0 / math.sqrt(6), np.float32)  # norm 999 over w, b unchanged
    arrays, metrics = strategy.aggregate_train(1, [
        _reply(ins[11], 0.01, n=10), _reply(ins[12], 0.03, n=10),
        _reply(ins[13], weights={"w": step, "b": np.zeros(3, np.float32)}, n=10)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 0.02), rtol=1e-6)
    bound = dp_sgd_update_bound(num_examples=10, batch_size=16, epochs=1, learning_rate=0.05, max_grad_norm=1.0,
                                noise_multiplier=1.0, parameters=9)
    assert bound == strategy.update_bound(10) < 1.0
    assert metrics["replies-rejected"] == 1
    assert f"node-13: rejected: update norm 999 exceeds the bound {bound:.4g}" in caplog.text


def test_max_update_norm_overrides_the_derived_bound_and_dp_off_has_none():
    assert build_strategy(_config(**{"max-update-norm": 5.0})).update_bound(10) == 5.0
    assert build_strategy(_config(dp=False)).update_bound(10) is None
    derived = build_strategy(_config(lr=0.1, **{"batch-size": 4, "local-epochs": 2, "max-grad-norm": 0.5}))
    derived.configure_train(1, _arrays(GLOBAL), ConfigRecord(), NodesGrid(NODES))
    assert derived.update_bound(40) == dp_sgd_update_bound(
        num_examples=40, batch_size=4, epochs=2, learning_rate=0.1, max_grad_norm=0.5, noise_multiplier=1.0,
        parameters=9)


def test_the_bound_by_hand_for_one_full_batch():
    # n = B = 4: one step with q = 1, all 4 examples drawn (Binomial(4, 1) = 4; the bound adds its tail anyway)
    t = math.log(2 / 1e-9)
    drawn = 4 + math.sqrt(8 * t) + 2 * t / 3
    expected = 0.1 / 4 * (2.0 * drawn + 0.5 * 2.0 * 1 * (math.sqrt(100) + math.sqrt(2 * t)))
    assert dp_sgd_update_bound(num_examples=4, batch_size=4, epochs=1, learning_rate=0.1, max_grad_norm=2.0,
                               noise_multiplier=0.5, parameters=100) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("lr", [0.1, 3.0])
def test_real_dp_sgd_rounds_stay_within_the_bound_a_norm_999_update_does_not(lr):
    """Three hospitals train a real round (the client's own training settings, real Opacus); the strategy built
    from the same run config accepts all three and rejects a fourth update of norm 999."""
    from client.node import local_train_config
    from client.training import train_local
    from common.models import CellDataset, ModelConfig, build_model
    from common.weights import exchanged_weights, load_weights

    torch.set_num_threads(1)
    run = _config(lr=lr, model="effnet_head", **{"image-size": 64, "batch-size": 4, "min-nodes": 4,
                                                  "noise-multiplier": 1.1, "local-epochs": 2})
    model_config = ModelConfig(kind="effnet_head", image_size=64)
    start = exchanged_weights(build_model(model_config))
    strategy = build_strategy(run)
    ins = _instructions(strategy, nodes=(11, 12, 13, 14), weights=start)
    replies, norms = [], []
    for node, n in ((11, 6), (12, 13), (13, 9)):
        g = torch.Generator().manual_seed(node)
        labels = torch.arange(n) % 3
        targets = torch.full((n, 2, 2), -1)
        targets[labels == 0] = 0
        targets[labels > 0, 0, 0] = labels[labels > 0]
        data = CellDataset(torch.rand(n, 192, 2, 2, generator=g) * 6, labels, targets)
        model = build_model(model_config)
        load_weights(model, start)
        outcome = train_local(model, data, config=local_train_config(run, server_round=1), accountant_state=None,
                              device="cpu")
        weights = {k: v.detach().numpy().copy() for k, v in outcome.weights.items() if k in start}
        norms.append(math.sqrt(sum(float(np.sum((weights[k].astype(np.float64) - start[k]) ** 2)) for k in start)))
        replies.append(_reply(ins[node], weights=weights, n=n, eps=outcome.epsilon))
    key = next(k for k, v in start.items() if v.dtype.kind == "f" and v.size >= 1)
    hostile = {k: v.copy() for k, v in start.items()}
    hostile[key] = (hostile[key].astype(np.float64) + 999.0 / math.sqrt(hostile[key].size)).astype(np.float32)
    replies.append(_reply(ins[14], weights=hostile, n=9))
    _, metrics = strategy.aggregate_train(1, replies)
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (3, 1), strategy.train_reports[1].notes
    bounds = [strategy.update_bound(n) for n in (6, 13, 9)]
    assert all(0 < norm <= bound < 4 * norm for norm, bound in zip(norms, bounds))  # sound, and not loose
    assert max(bounds) < 999


# ---------------------------------------------------------------- epsilon
@pytest.mark.parametrize("eps, why", [
    (float("nan"), "'epsilon' must be >= 0, got nan"),
    (-1.0, "'epsilon' must be >= 0, got -1.0"),
    ([1.0, 2.0], "'epsilon' must be one number, got list"),
    (float("inf"), "'epsilon' is infinite: this run trains with DP only"),
])
def test_a_bad_epsilon_rejects_the_reply_and_is_not_recorded(eps, why):
    strategy = build_strategy(_loose())
    ins = _instructions(strategy)
    _, metrics = strategy.aggregate_train(1, [_reply(ins[11], eps=2.0), _reply(ins[12], eps=1.0),
                                              _reply(ins[13], eps=eps)])
    assert (metrics["replies-valid"], metrics["replies-rejected"], metrics["epsilon-max"]) == (2, 1, 2.0)
    assert strategy.train_reports[1].notes == [f"node-13: rejected: {why}"]
    assert "node-13" not in strategy.privacy


def test_infinite_epsilon_is_accepted_when_the_run_trains_without_dp():
    strategy = build_strategy(_loose(dp=False))
    ins = _instructions(strategy)
    _, metrics = strategy.aggregate_train(1, [_reply(ins[n], eps=math.inf, **{wire.DP_ENABLED: 0.0}) for n in NODES])
    assert metrics["replies-valid"] == 3 and metrics["epsilon-max"] == math.inf


def test_epsilon_never_decreases_for_a_node_and_a_bad_refusal_is_rejected_not_refused():
    strategy = build_strategy(_loose())
    ins = _instructions(strategy, rnd=1)
    strategy.aggregate_train(1, [_reply(ins[n], eps=3.0) for n in NODES])
    ins = _instructions(strategy, rnd=2)
    _, metrics = strategy.aggregate_train(2, [_reply(ins[11], eps=3.5), _reply(ins[12], eps=3.0),
                                              _reply(ins[13], eps=0.5)])
    assert (metrics["replies-valid"], metrics["replies-rejected"], metrics["epsilon-max"]) == (2, 1, 3.5)
    assert strategy.train_reports[2].notes == [
        "node-13: rejected: 'epsilon' 0.5 is below the 3 this node reported earlier in the run"]
    assert strategy.privacy["node-13"]["epsilon"] == 3.0
    ins = _instructions(strategy, rnd=3)
    _, metrics = strategy.aggregate_train(3, [_reply(ins[11], eps=4.0), _reply(ins[12], eps=4.0),
                                              _refusal(ins[13], eps=float("nan"))])
    assert (metrics["replies-refused"], metrics["replies-rejected"], metrics["epsilon-max"]) == (0, 1, 4.0)


# ---------------------------------------------------------------- identity
def test_a_spoofed_partition_id_does_not_touch_another_hospitals_record():
    strategy = build_strategy(_loose())
    ins = _instructions(strategy, rnd=1)
    strategy.aggregate_train(1, [_reply(ins[11], eps=2.0, partition=0), _reply(ins[12], eps=1.0, partition=1),
                                 _reply(ins[13], eps=0.5, partition=0)])  # node 13 claims to be partition 0
    assert strategy.privacy["partition-0"]["epsilon"] == 2.0
    assert strategy.privacy["partition-0"]["node_id"] == 11
    assert strategy.privacy["node-13"]["epsilon"] == 0.5
    ins = _instructions(strategy, rnd=2)
    _, metrics = strategy.aggregate_train(2, [_reply(ins[11], eps=2.5, partition=0),
                                              _reply(ins[12], eps=1.5, partition=1),
                                              _reply(ins[13], eps=0.6, partition=1)])  # now claims partition 1
    assert metrics["replies-valid"] == 3  # each node checked against its own past epsilon
    assert {k: v["epsilon"] for k, v in strategy.privacy.items()} == {
        "partition-0": 2.5, "partition-1": 1.5, "node-13": 0.6}


def test_after_a_restart_a_simulated_hospital_with_a_new_node_id_keeps_its_record(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", signer=SIGNER, trusted=TRUSTED)
    strategy = build_strategy(_loose(), checkpoints=store)
    ins = _instructions(strategy)
    strategy.aggregate_train(1, [_reply(ins[n], eps=2.0 + i, n=10 + i, partition=i) for i, n in enumerate(NODES)])
    resumed = build_strategy(_loose(), checkpoints=store)
    resumed.restore(store.latest())
    ins = _instructions(resumed, rnd=1, nodes=(31, 32, 33))  # a restarted simulation gives new node ids
    _, metrics = resumed.aggregate_train(1, [_reply(ins[31], eps=2.5, n=10, partition=0),
                                             _reply(ins[32], eps=2.5, n=11, partition=1),  # below its 3.0
                                             _reply(ins[33], eps=4.5, n=12, partition=2),
                                             ])
    assert (metrics["replies-valid"], metrics["replies-rejected"]) == (2, 1)
    assert resumed.train_reports[2].notes == [
        "partition-1 (node 32): rejected: 'epsilon' 2.5 is below the 3 this node reported earlier in the run"]
    assert {k: (v["epsilon"], v["node_id"]) for k, v in resumed.privacy.items()} == {
        "partition-0": (2.5, 31), "partition-1": (3.0, 12), "partition-2": (4.5, 33)}


def test_a_node_first_seen_in_evaluation_takes_its_partition_name_when_it_trains():
    strategy = build_strategy(_loose(**{"num-server-rounds": 3}))
    ev = {m.metadata.dst_node_id: _stamped(m) for m in
          strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), NodesGrid(NODES))}
    strategy.aggregate_evaluate(1, [_eval_reply(ev[n]) for n in NODES])  # evaluate replies name no partition
    ins = _instructions(strategy, rnd=2)
    strategy.aggregate_train(2, [_reply(ins[n], eps=1.0 + i, partition=i) for i, n in enumerate(NODES)])
    assert {k: v["node_id"] for k, v in strategy.privacy.items()} == {
        "partition-0": 11, "partition-1": 12, "partition-2": 13}
    ins = _instructions(strategy, rnd=3)
    strategy.aggregate_train(3, [_reply(ins[11], eps=2.0, partition=2), _reply(ins[12], eps=2.0, partition=1),
                                 _reply(ins[13], eps=3.0, partition=0)])  # later claims change nothing
    assert {k: v["node_id"] for k, v in strategy.privacy.items()} == {
        "partition-0": 11, "partition-1": 12, "partition-2": 13}


def test_a_reply_must_come_from_the_node_its_instruction_was_sent_to():
    strategy = build_strategy(_loose())
    ins = _instructions(strategy, rnd=1)
    stale = ins[13]
    ins = _instructions(strategy, rnd=2)
    forged = _reply(ins[12], 5.0)
    forged.metadata.__dict__["_src_node_id"] = 13  # node 13 answers node 12's instruction
    _, metrics = strategy.aggregate_train(2, [_reply(ins[11]), _reply(ins[12]), forged, _reply(stale, 7.0)])
    assert (metrics["replies-valid"], metrics["replies-rejected"], metrics["replies-duplicate"]) == (2, 1, 1)
    assert strategy.train_reports[2].notes == [
        "node-13: rejected: answers an instruction sent to node 12",
        "node-13: duplicate: a further reply in this step, ignored"]


def test_a_reply_to_an_instruction_of_another_step_is_rejected():
    strategy = build_strategy(_loose())
    stale = _instructions(strategy, rnd=1)[13]
    ins = _instructions(strategy, rnd=2)
    with pytest.raises(TooFewReplies, match="node-13: rejected: answers no instruction of this step"):
        strategy.aggregate_train(2, [_reply(ins[11]), _reply(stale)])


def test_a_reply_sent_three_times_counts_once():
    strategy = build_strategy(_loose())
    ins = _instructions(strategy)
    twice = _reply(ins[13], 30.0, n=10)
    arrays, metrics = strategy.aggregate_train(1, [_reply(ins[11], 0.0, n=10), twice, twice, twice,
                                                   _reply(ins[12], 0.0, n=10)])
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), 10.0))  # (0 + 30 + 0) / 3
    assert (metrics["replies-valid"], metrics["replies-duplicate"], metrics["replies-missing"]) == (3, 2, 0)
    again = _reply(ins[13], 60.0, n=10)  # a second, different reply of the same node in the step
    strategy = build_strategy(_loose())
    ins = _instructions(strategy)
    _, metrics = strategy.aggregate_train(1, [_reply(ins[11]), _reply(ins[13], 30.0), again, _reply(ins[12])])
    assert (metrics["replies-valid"], metrics["replies-duplicate"]) == (3, 1)


# ---------------------------------------------------------------- evaluate replies
def _eval_reply(instruction: Message, **metrics) -> Message:
    values = {wire.NUM_EXAMPLES: 10, wire.EVAL_LOSS: 0.5, "accuracy": 0.7, wire.confusion_key(0, 0): 7,
              wire.confusion_key(2, 2): 3}
    values.update(metrics)
    return _stamped(Message(RecordDict({wire.METRICS: MetricRecord(values)}), reply_to=instruction))


@pytest.mark.parametrize("bad, why", [
    ({wire.confusion_key(0, 0): float("nan")}, "'cm_normal_normal' must be an integer count, got nan"),
    ({wire.confusion_key(0, 0): -2}, "'cm_normal_normal' must be an integer count, got -2"),
    ({wire.confusion_key(0, 0): 6.5}, "'cm_normal_normal' must be an integer count, got 6.5"),
    ({wire.NUM_EXAMPLES: float("nan")}, "evaluate reply without a positive integer 'num-examples'"),
    ({wire.NUM_EXAMPLES: 3.5}, "evaluate reply without a positive integer 'num-examples'"),
    ({wire.NUM_EXAMPLES: -10}, "evaluate reply without a positive integer 'num-examples'"),
    ({wire.NUM_EXAMPLES: 1e9}, "evaluate reply without a positive integer 'num-examples'"),
    ({"accuracy": [0.1, 0.9]}, "metric 'accuracy' must be one number, got list"),
    ({wire.EVAL_LOSS: [1, 2]}, "metric 'eval-loss' must be one number, got list"),
])
def test_a_malformed_evaluate_reply_is_rejected_never_fatal(bad, why):
    strategy = build_strategy(_config(**{"num-server-rounds": 3}))
    ins = {m.metadata.dst_node_id: _stamped(m) for m in
           strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), NodesGrid(NODES))}
    out = strategy.aggregate_evaluate(1, [_eval_reply(ins[11]), _eval_reply(ins[12]), _eval_reply(ins[13], **bad)])
    assert strategy.evaluate_reports[1].notes == [f"node-13: rejected: {why}"]
    assert (out[wire.NUM_EXAMPLES], out[wire.confusion_key(0, 0)], out["accuracy"]) == (20, 14, pytest.approx(0.7))


def test_an_evaluate_reply_without_metrics_or_sent_twice_is_not_counted():
    strategy = build_strategy(_config(**{"num-server-rounds": 3}))
    ins = {m.metadata.dst_node_id: _stamped(m) for m in
           strategy.configure_evaluate(1, _arrays(GLOBAL), ConfigRecord(), NodesGrid(NODES))}
    empty = _stamped(Message(RecordDict({"other": MetricRecord({"x": 1})}), reply_to=ins[13]))
    twice = _eval_reply(ins[12])
    out = strategy.aggregate_evaluate(1, [_eval_reply(ins[11]), twice, twice, empty])
    report = strategy.evaluate_reports[1]
    assert (report.valid, report.duplicate, report.rejected, out[wire.NUM_EXAMPLES]) == (2, 1, 1, 20)
    assert "node-13: rejected: evaluate reply without metrics" in report.notes


# ---------------------------------------------------------------- robust aggregation
FIVE = (21, 22, 23, 24, 25)


def _five_replies(strategy, huge: float):
    ins = _instructions(strategy, nodes=FIVE)
    rng = np.random.default_rng(3)
    honest = {node: {"w": rng.normal(0.0, 0.1, (2, 3)).astype(np.float32),
                     "b": rng.normal(0.0, 0.1, 3).astype(np.float32)} for node in FIVE[:4]}
    hostile = {"w": np.full((2, 3), huge, np.float32), "b": np.full(3, -huge, np.float32)}
    return [_reply(ins[node], weights=honest[node], n=10 * (i + 1)) for i, node in enumerate(FIVE[:4])] + \
        [_reply(ins[25], weights=hostile, n=10)], honest


def _flower_reference(flower_strategy, replies):
    """What Flower's own strategy makes of the same replies (arrays and num-examples only)."""
    contents = [Message(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v.numpy().copy()) for k, v in
                                                              m.content[wire.ARRAYS].items()}),
                                    wire.METRICS: MetricRecord({wire.NUM_EXAMPLES:
                                                                m.content[wire.METRICS][wire.NUM_EXAMPLES]})}),
                        metadata=m.metadata) for m in replies]
    arrays, _ = flower_strategy.aggregate_train(1, contents)
    return {k: v.numpy() for k, v in arrays.items()}


@pytest.mark.parametrize("aggregation, reference", [
    ("median", lambda: FedMedian()),
    ("trimmed-mean", lambda: FedTrimmedAvg(beta=0.2)),  # 5 replies, 0.2 -> one cut at each end
    ("krum", lambda: Krum(num_malicious_nodes=1)),
])
def test_one_huge_update_moves_the_robust_model_little_and_the_mean_a_lot(aggregation, reference):
    huge = 1e4
    overrides = {"max-update-norm": 1e9, "min-nodes": 5, "min-train-replies": 5}
    mean = build_strategy(_config(**overrides))
    replies, honest = _five_replies(mean, huge)
    mean_arrays, _ = mean.aggregate_train(1, replies)
    robust = build_strategy(_config(aggregation=aggregation, **overrides))
    replies, honest = _five_replies(robust, huge)
    arrays, metrics = robust.aggregate_train(1, replies)
    assert metrics["replies-valid"] == 5
    moved = {k: float(np.abs(arrays[k].numpy()).max()) for k in GLOBAL}
    honest_max = max(float(np.abs(v[k]).max()) for v in honest.values() for k in GLOBAL)
    assert max(moved.values()) <= honest_max < 0.5  # within the honest updates' range
    assert float(np.abs(mean_arrays["w"].numpy()).max()) > 0.08 * huge  # weight 10/110 of 1e4
    expected = _flower_reference(reference(), _five_replies(build_strategy(_config(**overrides)), huge)[0])
    for key in GLOBAL:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key], rtol=1e-6, atol=1e-7)


def test_robust_aggregation_needs_enough_replies_and_composes_with_fedadam():
    overrides = {"max-update-norm": 1e9, "min-nodes": 5, "min-train-replies": 3, "aggregation": "median"}
    strategy = build_strategy(_config(**overrides))
    ins = _instructions(strategy, nodes=FIVE)
    with pytest.raises(TooFewReplies, match="2 valid training replies, at least 3 needed"):
        strategy.aggregate_train(1, [_reply(ins[21], 1.0), _reply(ins[22], 2.0)] +
                                 [_reply(ins[n], n=-1) for n in FIVE[2:]])
    median = build_strategy(_config(**overrides))
    median_arrays, _ = median.aggregate_train(1, _five_replies(median, 1e4)[0])
    adam = build_strategy(_config(strategy="fedadam", **overrides))
    arrays, _ = adam.aggregate_train(1, _five_replies(adam, 1e4)[0])
    step = arrays["w"].numpy()  # one Adam step from zero on the median: each coordinate <= eta = 0.01
    assert float(np.abs(step).max()) <= 0.0101
    np.testing.assert_array_equal(np.sign(step), np.sign(median_arrays["w"].numpy()))


@pytest.mark.parametrize("values, message", [
    ({"aggregation": "median", "dp-mode": "distributed", "min-nodes": 3, "min-train-replies": 3},
     "'aggregation' median: dp-mode distributed reveals only the sum"),
    ({"aggregation": "krum", "dp-mode": "local", "min-nodes": 4, "min-train-replies": 4},
     "'aggregation' krum with 'byzantine-nodes' 1 needs 'min-train-replies' >= 5, got 4"),
    ({"aggregation": "average"}, "run config 'aggregation': must be one of mean, trimmed-mean, median, krum"),
])
def test_robust_aggregation_config_errors_name_the_key(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flower(values)
    assert message in str(error.value)


def test_dp_mode_auto_trains_with_local_noise_when_aggregation_is_robust():
    assert RunConfig.from_flower({"min-nodes": 3}).distributed_dp
    robust = RunConfig.from_flower({"min-nodes": 3, "min-train-replies": 3, "aggregation": "trimmed-mean"})
    assert not robust.distributed_dp
    assert type(build_strategy(robust)).__name__ == "MammoFedAvg"
