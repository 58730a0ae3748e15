"""Run and node configuration: defaults equal pyproject's, unknown keys and bad values name the key."""

from __future__ import annotations

import tomllib

import pytest

from common.run_config import ConfigError, NodeConfig, RunConfig
from conftest import REPO_ROOT


def test_defaults_are_exactly_the_pyproject_run_config():
    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert declared == RunConfig.defaults()
    assert RunConfig.from_flower(declared) == RunConfig()


def test_empty_run_config_gives_defaults_and_overrides_win():
    config = RunConfig.from_flower({}, {"lr": 1, "dp": False, "strategy": "fedprox"})
    assert (config.lr, config.dp, config.strategy, config.num_server_rounds) == (1.0, False, "fedprox", 3)
    assert isinstance(config.lr, float)
    assert RunConfig.from_flower({"lr": 0.5}, {"lr": 0.2}).lr == 0.2
    assert RunConfig.from_flower(config.to_flower()) == config


@pytest.mark.parametrize("values, message", [
    ({"learning-rate": 0.1}, "unknown run config key 'learning-rate'"),
    ({"num-server-round": 2}, "did you mean 'num-server-rounds'"),
    ({"lr": 0}, "run config 'lr': must be > 0.0, got 0"),
    ({"lr": "0.1"}, "run config 'lr': expected a number, got '0.1'"),
    ({"num-server-rounds": 2.5}, "run config 'num-server-rounds': expected an integer"),
    ({"dp": 1}, "run config 'dp': expected true or false"),
    ({"seed": True}, "run config 'seed': expected an integer"),
    ({"strategy": "krum"}, "run config 'strategy': must be one of fedavg, fedprox, fedadam; got 'krum'"),
    ({"model": "resnet"}, "run config 'model': must be one of"),
    ({"fraction-train": 1.5}, "run config 'fraction-train': must be <= 1.0"),
    ({"delta": float("nan")}, "run config 'delta': must be finite"),
    ({"min-nodes": 1}, "'min-train-replies' (2) exceeds 'min-nodes' (1)"),
    ({"fraction-evaluate": 0.0}, "'min-evaluate-replies' must be 0 when 'fraction-evaluate' is 0"),
])
def test_bad_run_config_names_the_key(values, message):
    with pytest.raises(ConfigError) as error:
        RunConfig.from_flower(values)
    assert message in str(error.value)


def test_command_line_assignments_are_typed():
    parsed = RunConfig.parse_assignments(["lr=0.2", "dp=false", "num-server-rounds=4", "model=effnet_head"])
    assert parsed == {"lr": 0.2, "dp": False, "num-server-rounds": 4, "model": "effnet_head"}
    with pytest.raises(ConfigError, match="run config 'num-server-rounds': expected an integer, got 'four'"):
        RunConfig.parse_assignments(["num-server-rounds=four"])
    with pytest.raises(ConfigError, match="unknown run config key 'lrr'"):
        RunConfig.parse_assignments(["lrr=1"])


def test_deployment_node_needs_its_data_and_state_dirs_and_its_own_budget(tmp_path):
    run = RunConfig()
    node = NodeConfig.from_flower({"data-dir": str(tmp_path / "d"), "state-dir": str(tmp_path / "s"),
                                   "max-epsilon": 8}, run=run)
    assert (node.data_dir, node.state_dir, node.policy.max_epsilon, node.is_simulation) == \
        (tmp_path / "d", tmp_path / "s", 8.0, False)
    assert node.policy.require_tls and node.policy.evaluation == "noised"
    assert node.ledger_path == tmp_path / "s" / "privacy-ledger.json"
    with pytest.raises(ConfigError, match="node config 'max-epsilon' is required"):
        NodeConfig.from_flower({"data-dir": "/d", "state-dir": "/s"}, run=run)
    with pytest.raises(ConfigError, match="node config 'state-dir' is required"):
        NodeConfig.from_flower({"data-dir": "/d", "max-epsilon": 3}, run=run)
    with pytest.raises(ConfigError, match="unknown node config key 'data_dir' .did you mean 'data-dir'"):
        NodeConfig.from_flower({"data_dir": "/d", "state-dir": "/s"}, run=run)
    with pytest.raises(ConfigError, match="node config 'max-epsilon' must be > 0"):
        NodeConfig.from_flower({"data-dir": "/d", "state-dir": "/s", "max-epsilon": 0}, run=run)


def test_simulation_node_takes_data_and_state_from_the_run(tmp_path):
    run = RunConfig(sim_data_dir=str(tmp_path / "mias"), sim_state_dir=str(tmp_path / "state"))
    node = NodeConfig.from_flower({"partition-id": 1, "num-partitions": 3}, run=run)
    assert (node.data_dir, node.state_dir) == (tmp_path / "mias", tmp_path / "state" / "hospital-1")
    assert node.is_simulation and node.policy.max_epsilon == 10.0 and not node.policy.require_tls
    assert NodeConfig.from_flower({"partition-id": 1, "num-partitions": 3}, run=run.updated(sim_max_epsilon=4.0)) \
        .policy.max_epsilon == 4.0
    with pytest.raises(ConfigError, match="'partition-id' must be in \\[0, 3\\), got 3"):
        NodeConfig.from_flower({"partition-id": 3, "num-partitions": 3}, run=run)
    with pytest.raises(ConfigError, match="run config 'sim-state-dir' is required in simulation"):
        NodeConfig.from_flower({"partition-id": 0, "num-partitions": 2}, run=RunConfig(sim_data_dir="/x"))


def test_run_config_is_frozen():
    with pytest.raises(AttributeError):
        RunConfig().lr = 1.0  # type: ignore[misc]
    assert isinstance(RunConfig().updated(lr=0.3), RunConfig)
    assert RunConfig(image_size=64).preprocess_config().size == 64


def test_model_config_carries_every_model_key():
    run = RunConfig.from_flower({}, {"model": "effnet_head", "image-size": 256, "top-k": 3, "pooling": "abnormal",
                                     "feature-layer": "block15", "input-norm": False, "head-hidden": 8})
    model = run.model_config()
    assert (model.kind, model.image_size, model.top_k, model.pooling, model.feature_layer, model.input_norm,
            model.head_hidden) == ("effnet_head", 256, 3, "abnormal", "block15", False, 8)
    with pytest.raises(ConfigError, match="run config 'pooling': must be one of classwise, abnormal"):
        RunConfig.from_flower({"pooling": "max"})


def test_run_config_choices_match_the_models():
    """run_config keeps its own copies (it imports no torch); they must name what common.models builds."""
    from common import run_config
    from common.models import MODEL_KINDS
    from common.models.cell_classifier import POOLINGS

    assert run_config.MODEL_KINDS == MODEL_KINDS
    assert set(run_config.POOLINGS) == set(POOLINGS)


def test_distributed_noise_mode_and_the_node_s_policy_for_it(tmp_path):
    assert RunConfig.from_flower({"min-nodes": 3, "min-train-replies": 3}).distributed_dp  # auto, 3 hospitals
    assert not RunConfig.from_flower({"min-nodes": 2}).distributed_dp
    assert not RunConfig.from_flower({"min-nodes": 3, "strategy": "fedprox"}).distributed_dp  # auto stays local
    assert not RunConfig.from_flower({"dp-mode": "distributed", "dp": False}).distributed_dp
    assert RunConfig.from_flower({"dp-mode": "distributed", "min-nodes": 2}).distributed_dp
    with pytest.raises(ConfigError, match="'strategy' fedadam is not available"):
        RunConfig.from_flower({"dp-mode": "distributed", "strategy": "fedadam"})
    with pytest.raises(ConfigError, match="'dp-mode': must be one of auto, local, distributed"):
        RunConfig.from_flower({"dp-mode": "shared"})
    run = RunConfig.from_flower({"sim-budget-on-aggregate": True, "secagg-dropouts": 2})
    own = {"data-dir": str(tmp_path), "state-dir": str(tmp_path), "max-epsilon": 8}
    deployed = NodeConfig.from_flower(own, run=run)
    assert (deployed.policy.budget_on_aggregate, deployed.policy.secagg_max_dropouts) == (False, 1)  # node's own
    simulated = NodeConfig.from_flower({"partition-id": 0, "num-partitions": 3, "data-dir": str(tmp_path),
                                        "state-dir": str(tmp_path)}, run=run)
    assert (simulated.policy.budget_on_aggregate, simulated.policy.secagg_max_dropouts) == (True, 2)
    opted = NodeConfig.from_flower({**own, "budget-on-aggregate": True, "secagg-max-dropouts": 0}, run=run)
    assert (opted.policy.budget_on_aggregate, opted.policy.secagg_max_dropouts) == (True, 0)
    with pytest.raises(ConfigError, match="node config 'budget-on-aggregate': expected true or false"):
        NodeConfig.from_flower({**own, "budget-on-aggregate": 1}, run=run)
    with pytest.raises(ConfigError, match="node config 'secagg-max-dropouts' must be >= 0"):
        NodeConfig.from_flower({**own, "secagg-max-dropouts": -1}, run=run)
