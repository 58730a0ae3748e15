"""Simulation presets: valid run configs, `--set` overrides typed and validated, errors that name the key."""

from __future__ import annotations

import pytest

from common.run_config import ConfigError, RunConfig
from simulations.presets import NUM_HOSPITALS, PRESETS, parse_sets, preset, resolve


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_resolves_to_a_valid_config_that_needs_every_hospital(name):
    sim = resolve(name)
    assert sim.preset == name
    assert sim.num_hospitals == PRESETS[name].num_hospitals
    assert sim.run.min_nodes == sim.run.min_train_replies == sim.num_hospitals
    assert sim.run.min_evaluate_replies == sim.num_hospitals
    for key, value in PRESETS[name].overrides.items():
        assert sim.run.to_flower()[key] == value, key
    assert RunConfig.from_flower(sim.run.to_flower()) == sim.run  # survives Flower's flat dict


def test_smoke_is_tiny_and_demo_is_the_issue_s_demo():
    smoke, demo = resolve("smoke"), resolve("demo")
    assert smoke.num_hospitals == 2 and smoke.run.num_server_rounds <= 2
    assert smoke.run.image_size <= 64 and 0 < smoke.run.sim_max_patients <= 20
    assert demo.num_hospitals == 3
    assert demo.run.dp is True and demo.run.model == "effnet_head"
    assert demo.run.sim_max_patients == 0  # all of mini-MIAS
    assert demo.run.sim_central_eval and demo.run.sim_test_fraction > 0


def test_sets_are_typed_and_win_over_the_preset():
    sim = resolve("demo", ["lr=0.2", "dp=false", "num-server-rounds=7", "sim-partition=tissue",
                           f"{NUM_HOSPITALS}=4"])
    assert (sim.run.lr, sim.run.dp, sim.run.num_server_rounds, sim.run.sim_partition) == (0.2, False, 7, "tissue")
    assert sim.num_hospitals == 4 and sim.run.min_nodes == 4 and sim.run.min_train_replies == 4
    assert isinstance(sim.run.lr, float)
    assert sim.to_dict()[NUM_HOSPITALS] == 4 and sim.to_dict()["preset"] == "demo"


def test_explicit_minimums_are_kept():
    sim = resolve("demo", ["min-nodes=2", "min-train-replies=1", "min-evaluate-replies=0"])
    assert (sim.run.min_nodes, sim.run.min_train_replies, sim.run.min_evaluate_replies) == (2, 1, 0)


def test_no_federated_evaluation_needs_no_evaluation_replies():
    sim = resolve("smoke", ["fraction-evaluate=0"])
    assert sim.run.fraction_evaluate == 0.0 and sim.run.min_evaluate_replies == 0


@pytest.mark.parametrize("assignment, message", [
    ("learning-rate=0.1", "unknown key 'learning-rate'"),
    ("num-server-round=2", "unknown key 'num-server-round' (did you mean 'num-server-rounds'?)"),
    ("num-hospital=2", "unknown key 'num-hospital' (did you mean 'num-hospitals'?)"),
    ("lr=fast", "run config 'lr': expected a number, got 'fast'"),
    ("lr=0", "run config 'lr': must be > 0.0, got 0.0"),
    ("dp=maybe", "run config 'dp': expected true or false, got 'maybe'"),
    ("model=resnet", "run config 'model': must be one of cnn, effnet_head, effnet_finetune; got 'resnet'"),
    ("num-hospitals=two", "'num-hospitals': expected an integer, got 'two'"),
    ("num-hospitals=0", "'num-hospitals': must be an integer >= 1, got 0"),
    ("lr", "expected key=value, got 'lr'"),
    ("run-dir=/tmp/x", "'run-dir' is set from the command line"),
    ("sim-data-dir=/tmp/x", "'sim-data-dir' is set from the command line"),
])
def test_bad_sets_name_the_key(assignment, message):
    with pytest.raises(ConfigError) as caught:
        resolve("smoke", [assignment])
    assert message in str(caught.value)


def test_more_required_nodes_than_hospitals_is_refused():
    with pytest.raises(ConfigError, match=r"'min-nodes' \(3\) exceeds 'num-hospitals' \(2\)"):
        resolve("demo", ["num-hospitals=2", "min-nodes=3", "min-train-replies=2"])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'demos' \(did you mean 'demo'\?\); known presets: "
                                          r"smoke, demo, full, walkthrough"):
        preset("demos")


def test_parse_sets_accepts_typed_values_only_for_known_keys():
    assert parse_sets(["seed=7", "num-hospitals=5", "sim-dirichlet-alpha=0.1"]) == {
        "seed": 7, NUM_HOSPITALS: 5, "sim-dirichlet-alpha": 0.1}
    assert resolve("smoke", {"seed": 7}).run.seed == 7  # already-typed mapping


def test_presets_are_read_only():
    with pytest.raises(TypeError):
        PRESETS["smoke"].overrides["lr"] = 1.0  # type: ignore[index]


@pytest.mark.parametrize("name", ["demo", "full"])
def test_a_full_run_stays_within_every_hospital_s_default_budget(mias_dir, name):
    """Planned from the real split: every round of the preset, its noised evaluations and the explanation query fit
    under the virtual hospitals' max-epsilon (no hospital refuses)."""
    from client.hospital_data import simulation_partition, split_train_val
    from client.node import secure_train_config
    from client.preflight import planned_evaluations
    from common.node_policy import NodePolicy
    from client.training import plan_dp_round
    from common.distributed_dp import reconstruction_threshold
    from common.privacy import PrivacyAccountant

    sim = resolve(name)
    run = sim.run.updated(sim_data_dir=str(mias_dir))
    assert run.distributed_dp and run.sim_budget_on_aggregate  # hospitals check the sum's epsilon
    threshold = reconstruction_threshold(sim.num_hospitals, run.secagg_dropouts)
    for k in range(sim.num_hospitals):
        records = simulation_partition(mias_dir, run, partition_id=k, num_partitions=sim.num_hospitals)
        train, _ = split_train_val(records, val_fraction=run.val_fraction, seed=run.seed)
        policy = NodePolicy(max_epsilon=run.sim_max_epsilon)
        summed, own = PrivacyAccountant(policy.accountant), PrivacyAccountant(policy.accountant)
        for rnd in range(1, run.num_server_rounds + 1):
            plan = plan_dp_round(len(train), config=secure_train_config(run, server_round=rnd, threshold=threshold))
            assert plan.steps == 1 and plan.noise_multiplier == pytest.approx(run.noise_multiplier / threshold ** 0.5)
            summed.step(noise_multiplier=run.noise_multiplier, sample_rate=plan.sample_rate, steps=1)
            own.step(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate, steps=1)
        assert own.epsilon(run.delta) > run.sim_max_epsilon  # why the preset's hospitals opt in to the trust assumption
        if name == "demo":
            assert summed.epsilon(run.delta) == pytest.approx(7.51, abs=0.01), k  # q = 1/4, 80 steps, sigma 1.75
        releases = planned_evaluations(run) + 1  # noised evaluations and the explanation query
        summed.step(noise_multiplier=policy.evaluation_noise_multiplier, sample_rate=1.0, steps=releases)
        epsilon = summed.epsilon(run.delta)
        assert epsilon < 0.9 * run.sim_max_epsilon, (k, epsilon)
