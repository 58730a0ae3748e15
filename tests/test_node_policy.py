"""The node owns its privacy policy: no run-config value raises its epsilon, evaluations are noised and counted.

Regressions of issue 13's measurements on the old main: a run config ``delta = 0.99`` made a node report
epsilon -3.03 and allowed 444 instead of 59 rounds under a budget of 10; ``delta = 1`` failed only after training,
without naming the key; ``max-epsilon`` fell back to the coordinator's value; an evaluation returned exact
confusion counts for any model, as often as asked (a constant-"normal" model returned the labels).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from client.node import evaluate_round, hospital_data, train_round
from client.privacy_ledger import PrivacyLedger
from client.training import evaluate_local
from common import private_counts, wire
from common.models import build_model
from common.node_policy import POLICY_KEYS, NodePolicy, PolicyError
from common.run_config import ConfigError, NodeConfig, RunConfig
from common.weights import exchanged_weights
from server.strategy import aggregate_evaluation

pytestmark = pytest.mark.usefixtures("serverapp_identity")

SMALL = dict(model="cnn", image_size=64, sim_max_patients=16, sim_test_fraction=0.25, val_fraction=0.25,
             batch_size=4, noise_multiplier=1.0)


def _virtual_hospital(mias_dir, tmp_path, **policy) -> tuple[RunConfig, NodeConfig]:
    run = RunConfig(sim_data_dir=str(mias_dir), sim_state_dir=str(tmp_path / "state"), **SMALL)
    return run, NodeConfig.from_flower({"partition-id": 0, "num-partitions": 2, **policy}, run=run)


def _weights(run: RunConfig) -> dict[str, np.ndarray]:
    torch.manual_seed(0)
    return exchanged_weights(build_model(run.model_config()))


# ---------------------------------------------------------------- the policy is validated where it is read
@pytest.mark.parametrize("values, message", [
    ({"delta": 0.0}, "node config 'delta' must be in \\(0, 1\\)"),
    ({"delta": 1.0}, "node config 'delta' must be in \\(0, 1\\)"),
    ({"delta": float("nan")}, "node config 'delta': expected a finite number"),
    ({"delta": "1e-5"}, "node config 'delta': expected a finite number"),
    ({"accountant": "gdp"}, "node config 'accountant': must be one of rdp, prv"),
    ({"max-epsilon": float("inf")}, "node config 'max-epsilon': expected a finite number"),
    ({"max-epsilon": -1.0}, "node config 'max-epsilon' must be > 0"),
    ({"min-noise-multiplier": 0.0}, "node config 'min-noise-multiplier' must be > 0"),
    ({"max-rounds-per-run": 2.5}, "node config 'max-rounds-per-run': expected an integer"),
    ({"evaluation": "sometimes"}, "node config 'evaluation': must be one of noised, clear, refuse"),
    ({"require-tls": "yes"}, "node config 'require-tls': expected true or false"),
])
def test_bad_policy_values_are_refused_naming_the_key(values, message):
    with pytest.raises(PolicyError, match=message):
        NodePolicy.from_node_config({"max-epsilon": 8.0, **values})


def test_delta_must_be_below_one_over_the_training_images():
    NodePolicy(max_epsilon=8.0, delta=0.009).check_training_set(100)
    with pytest.raises(PolicyError, match="node config 'delta' 0.01 must be < 1 / 100 training images"):
        NodePolicy(max_epsilon=8.0, delta=0.01).check_training_set(100)


@pytest.mark.parametrize("key", ["accountant", "max-epsilon", "min-noise-multiplier", "evaluation"])
def test_policy_keys_are_refused_in_a_run_config(key):
    assert key in POLICY_KEYS
    with pytest.raises(ConfigError, match=f"run config '{key}' belongs to each hospital's own privacy policy"):
        RunConfig.from_flower({key: 1})
    with pytest.raises(ConfigError, match=f"run config '{key}' belongs"):
        RunConfig.parse_assignments([f"{key}=1"])


def test_a_run_delta_of_one_is_refused_before_anything_runs():
    with pytest.raises(ConfigError, match="run config 'delta': must be < 1.0, got 1.0"):
        RunConfig.from_flower({"delta": 1.0})


def test_a_run_can_only_make_the_accounting_delta_smaller():
    policy = NodePolicy(max_epsilon=10.0, delta=1e-5)
    assert policy.accounting_delta(0.99) == 1e-5
    assert policy.accounting_delta(1e-7) == 1e-7


# ---------------------------------------------------------------- training refusals name the run config key
@pytest.mark.parametrize("overrides, policy, reason", [
    ({"noise-multiplier": 0.3}, {}, "run config 'noise-multiplier' 0.3 is below this node's policy "
                                    "min-noise-multiplier 0.5"),
    ({"num-server-rounds": 50}, {"max-rounds-per-run": 20}, "run config 'num-server-rounds' 50 exceeds this "
                                                            "node's policy max-rounds-per-run 20"),
    ({"dp": False}, {}, "run config 'dp' is false; this node trains only with DP"),
])
def test_deployed_node_refuses_a_run_asking_for_less_privacy(tmp_path, overrides, policy, reason):
    app = make_client_app(overrides={"dp-mode": "local", **overrides})
    content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    node_config = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"), "max-epsilon": 8.0,
                   **policy}
    reply = app(Message(content, dst_node_id=7, message_type=MessageType.TRAIN),
                Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={}))
    assert wire.ARRAYS not in reply.content.array_records
    assert reply.content[wire.METRICS][wire.REFUSED] == 1.0
    assert reason in reply.content[wire.REFUSAL][wire.REASON]
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()  # nothing spent


def test_a_run_delta_of_099_cannot_raise_the_nodes_epsilon(mias_dir, tmp_path):
    """The node accounts at its own delta: epsilon equals Opacus' RDP accountant at 1e-5 for the recorded steps."""
    run, node = _virtual_hospital(mias_dir, tmp_path)
    run = run.updated(delta=0.99)
    result = train_round(run=run, node=node, global_weights=_weights(run), server_round=1)
    assert not result.refused and result.delta == 1e-5 and result.accountant == "rdp"
    reference = RDPAccountant()
    for noise, rate, steps in PrivacyLedger(node.ledger_path).history:
        reference.history.append((noise, rate, steps))
    assert result.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert result.epsilon > 0


# ---------------------------------------------------------------- evaluation is noised and charged
def test_noised_evaluation_is_exact_counts_plus_the_charged_gaussian(mias_dir, tmp_path):
    run, node = _virtual_hospital(mias_dir, tmp_path)
    weights = _weights(run)
    release = evaluate_round(run=run, node=node, global_weights=weights, server_round=1, score_histogram=True,
                             rng=np.random.default_rng(7))
    model = build_model(run.model_config())
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
    exact = evaluate_local(model, hospital_data(node, run).val, device="cpu")
    std = 10.0 * math.sqrt(2)  # default evaluation-noise-multiplier, two blocks (confusion, histogram)
    assert release.noise_std == pytest.approx(std)
    rng = np.random.default_rng(7)
    expected_confusion = np.rint(np.asarray(exact.metrics["confusion_matrix"]) + rng.normal(0, std, (3, 3)))
    expected_histogram = np.rint(np.asarray(exact.score_histogram.flat()) + rng.normal(0, std, 600))
    assert np.array_equal(release.confusion, expected_confusion)
    assert np.array_equal(release.score_histogram, expected_histogram)
    assert release.num_examples == int(expected_confusion.sum())
    assert math.isnan(release.loss) and release.metrics is None  # nothing exact leaves
    ledger = PrivacyLedger(node.ledger_path)
    assert ledger.history == [(10.0, 1.0, 1)] and ledger.entries[0]["kind"] == "evaluation"
    reference = RDPAccountant()
    reference.history.append((10.0, 1.0, 1))
    assert release.epsilon == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_clear_and_refused_evaluations(mias_dir, tmp_path):
    run, clear = _virtual_hospital(mias_dir, tmp_path, evaluation="clear")
    release = evaluate_round(run=run, node=clear, global_weights=_weights(run), server_round=1)
    assert release.noise_std == 0.0 and release.confusion.sum() == release.num_examples > 0
    assert not clear.ledger_path.exists()  # outside epsilon, by the steward's choice
    run, refusing = _virtual_hospital(mias_dir, tmp_path / "r", evaluation="refuse")
    assert "does not release evaluation results" in evaluate_round(
        run=run, node=refusing, global_weights={}, server_round=1).refusal


def test_evaluations_per_run_are_capped_through_the_client_app(mias_dir, tmp_path):
    run, _ = _virtual_hospital(mias_dir, tmp_path)
    app = make_client_app(overrides=run.to_flower(), node_overrides={0: {"max-evaluations-per-run": 2}})
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config={})
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in _weights(run).items()}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})})
    replies = [app(Message(content, dst_node_id=7, message_type=MessageType.EVALUATE), context) for _ in range(3)]
    assert [r.content[wire.METRICS].get(wire.REFUSED, 0.0) for r in replies] == [0.0, 0.0, 1.0]
    assert replies[0].content[wire.METRICS][wire.EVALUATION_NOISE] == 10.0
    assert "evaluated 2 times in this run" in replies[2].content[wire.REFUSAL][wire.REASON]
    assert PrivacyLedger(tmp_path / "state" / "hospital-0" / "privacy-ledger.json").history == [(10.0, 1.0, 2)]


def test_the_coordinator_sums_noised_counts_before_clipping():
    from flwr.app import MetricRecord

    a = MetricRecord({wire.NUM_EXAMPLES: 3, wire.EVALUATION_NOISE: 10.0, "cm_normal_normal": -4,
                      "cm_malignant_malignant": 7})
    b = MetricRecord({wire.NUM_EXAMPLES: -2, wire.EVALUATION_NOISE: 10.0, "cm_normal_normal": 6,
                      "cm_malignant_malignant": -9})
    pooled = aggregate_evaluation([a, b])
    assert (pooled["cm_normal_normal"], pooled["cm_malignant_malignant"], pooled[wire.NUM_EXAMPLES]) == (2, 0, 1)
    assert pooled[wire.EVALUATION_NOISE] == pytest.approx(10.0 * math.sqrt(2))
    assert private_counts.clip_pooled(np.array([-1, 0, 5])).tolist() == [0, 0, 5]
