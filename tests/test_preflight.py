"""`mammofl-hospital preflight`: what a run would send and cost, checked against Opacus' accountant."""

from __future__ import annotations

import json

import pytest
from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from client.cli import app
from client.node import hospital_data, local_train_config
from client.preflight import planned_evaluations, preflight
from client.training import plan_dp_round
from common import wire
from common.models import build_model
from common.run_config import NodeConfig, RunConfig

SMALL = {"model": "cnn", "image-size": 64, "sim-max-patients": 16, "sim-test-fraction": 0.25, "val-fraction": 0.25,
         "batch-size": 4, "num-server-rounds": 6, "evaluate-every": 4, "dp-mode": "local", "noise-multiplier": 2.0}


def _run(mias_dir, tmp_path, **more) -> RunConfig:
    return RunConfig.from_flower({**SMALL, "sim-data-dir": str(mias_dir), "sim-state-dir": str(tmp_path), **more})


def test_planned_evaluations_follow_evaluate_every():
    assert planned_evaluations(RunConfig(num_server_rounds=6, evaluate_every=4)) == 2  # rounds 4 and 6
    assert planned_evaluations(RunConfig(num_server_rounds=8, evaluate_every=4)) == 2
    assert planned_evaluations(RunConfig(num_server_rounds=3)) == 3
    assert planned_evaluations(RunConfig(fraction_evaluate=0.0, min_evaluate_replies=0)) == 0


def test_preflight_epsilon_equals_opacus_for_the_whole_plan(mias_dir, tmp_path):
    run = _run(mias_dir, tmp_path)
    node = NodeConfig.from_flower({"partition-id": 0, "num-partitions": 2}, run=run)
    plan = preflight(run, node)
    train = len(hospital_data(node, run).train)
    steps = plan_dp_round(train, config=local_train_config(run, server_round=1, policy=node.policy))
    reference = RDPAccountant()
    reference.history.append((2.0, steps.sample_rate, steps.steps * 6))
    reference.history.append((10.0, 1.0, 3))  # 2 noised evaluations + 1 explanation query
    assert plan.allowed and plan.refusals == []
    assert plan.epsilon_now == 0.0
    assert plan.epsilon_after == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert plan.train_images == train
    parameters = sum(p.numel() for p in build_model(run.model_config()).state_dict().values())
    assert plan.model["parameters"] == parameters and plan.model["bytes_per_update_float32"] == 4 * parameters
    assert wire.EPSILON in plan.sends["train"] and wire.EVAL_LOSS not in plan.sends["evaluate"]
    assert not node.ledger_path.exists()  # nothing spent


def test_preflight_cli_reports_a_refusal_with_exit_1(mias_dir, tmp_path):
    def flower_syntax(**values) -> str:
        return " ".join(f"{k}={json.dumps(v)}" for k, v in {**SMALL, "sim-data-dir": str(mias_dir),
                                                              "sim-state-dir": str(tmp_path), **values}.items())

    run_config = flower_syntax()
    result = CliRunner().invoke(app, ["preflight", "--json", "--run-config", run_config,
                                      "--node-config", "partition-id=0 num-partitions=2 max-epsilon=0.5"])
    assert result.exit_code == 1, result.output
    report = json.loads(result.stdout)
    assert not report["allowed"] and report["max_epsilon"] == 0.5
    assert "above this node's max-epsilon 0.5" in report["refusals"][0]
    low_noise = CliRunner().invoke(app, ["preflight", "--run-config", flower_syntax(**{"noise-multiplier": 0.2}),
                                         "--node-config", "partition-id=0 num-partitions=2"])
    assert low_noise.exit_code == 1
    assert "run config 'noise-multiplier' 0.2 is below this node's policy min-noise-multiplier 0.5" in \
        " ".join(low_noise.stdout.split())
    bad = CliRunner().invoke(app, ["preflight", "--run-config", "accountant='prv'",
                                   "--node-config", "partition-id=0 num-partitions=2"])
    assert bad.exit_code == 2 and "belongs to each hospital's own privacy policy" in " ".join(bad.stderr.split())
    garbled = CliRunner().invoke(app, ["preflight", "--run-config", "lr=1 lr=2", "--node-config", "max-epsilon=1"])
    assert garbled.exit_code == 2 and "invalid format" in garbled.stderr
