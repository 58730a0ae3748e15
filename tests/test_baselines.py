"""A baseline round does what one federated round does, so baselines and federations compare like for like."""

from __future__ import annotations

from client.node import local_train_config
from common.run_config import RunConfig
from simulations.baselines import baseline_round_config


def test_distributed_noise_baseline_round_is_one_step_of_every_site_s_batch_with_the_full_noise():
    run = RunConfig.from_flower({"dp-mode": "distributed", "batch-size": 20, "noise-multiplier": 1.75})
    pooled = baseline_round_config(run, server_round=3, sites=3)
    assert (pooled.max_steps, pooled.epochs, pooled.batch_size) == (1, 1, 60)
    assert pooled.dp.noise_multiplier == 1.75  # the sum's noise, not a share
    alone = baseline_round_config(run, server_round=3, sites=1)
    assert (alone.max_steps, alone.batch_size) == (1, 20)


def test_local_noise_baseline_round_is_a_hospital_s_local_round():
    run = RunConfig.from_flower({"dp-mode": "local", "batch-size": 20, "local-epochs": 2})
    assert baseline_round_config(run, server_round=2, sites=3) == local_train_config(run, server_round=2)
