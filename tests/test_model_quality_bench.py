"""The model-quality benchmark's own claims: seeds per fold, FedSGD's fast engine = `train_local`, calibrated noise.

No real data: synthetic cell data sets for the demo preset's model, and fake records for the folds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from bench import model_quality
from bench.fedsgd import FedSGDConfig, fedsgd, round_seed, site_batch_size
from common.models import CellDataset, build_model
from common.privacy import PrivacyAccountant
from simulations.presets import resolve

pytestmark = [pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
              pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
              pytest.mark.filterwarnings("ignore:Using a non-full backward hook")]


@dataclass(frozen=True)
class _Record:
    patient_id: str
    label: str


@dataclass(frozen=True)
class _Prepared:
    record: _Record


def _synthetic(n: int, seed: int = 0) -> CellDataset:
    g = torch.Generator().manual_seed(seed)
    return CellDataset(torch.randn(n, 192, 16, 16, generator=g).half(), torch.randint(0, 3, (n,), generator=g),
                       torch.randint(-1, 3, (n, 16, 16), generator=g))


def test_fold_seeds_are_distinct_per_seed_and_fold():
    seeds = {model_quality.fold_seed(s, f) for s in range(50) for f in range(10)}
    assert len(seeds) == 500
    assert model_quality.fold_seed(3, 2) == 3002
    with pytest.raises(ValueError):
        model_quality.fold_seed(0, 1000)


def test_round_seeds_are_distinct():
    seeds = {round_seed(s, r, k) for s in (3000, 3001, 4000) for r in range(80) for k in range(10)}
    assert len(seeds) == 3 * 80 * 10


def test_every_fold_trains_with_its_own_seed(monkeypatch):
    prepared = [_Prepared(_Record(f"p{i // 2:03d}", ("normal", "benign", "malignant")[i // 2 % 3]))
                for i in range(60)]
    data = _synthetic(60)
    calls = []

    def fake_scores(row, schedule, sigma, model_config, data, train_idx, test_idx, seed):
        calls.append((seed, tuple(test_idx)))
        return np.random.default_rng(seed).random(len(test_idx)), None

    monkeypatch.setattr(model_quality, "centralised_scores", fake_scores)
    result = model_quality.evaluate(model_quality.Row("nodp"), model_quality.Schedule(), None, data, prepared,
                                    k=5, seeds=[0, 1])
    assert [seed for seed, _ in calls] == [0, 1, 2, 3, 4, 1000, 1001, 1002, 1003, 1004]
    assert len(result["aucs"]) == 2
    # the folds depend on the training seed; inside a seed, every image is tested once
    assert sorted(i for _, test in calls[:5] for i in test) == list(range(60))
    assert [test for _, test in calls[:5]] != [test for _, test in calls[5:]]


@pytest.mark.parametrize("noise_multiplier", [0.6, 2.0])
def test_fast_fedsgd_equals_train_local(noise_multiplier):
    """Same seed: the fast engine and one `train_local` call per hospital and round give the same weights and
    privacy accounting; the 4-image hospital (expected batch 1) has empty Poisson batches in some rounds."""
    torch.set_num_threads(1)
    data = _synthetic(45)
    sites = [list(range(0, 4)), list(range(4, 24)), list(range(24, 45))]
    config = FedSGDConfig(rounds=6, steps_per_epoch=4, learning_rate=1.0, noise_multiplier=noise_multiplier,
                          cell_loss_weight=10.0)
    empty = []
    for r in range(config.rounds):
        sampler = torch.Generator().manual_seed(round_seed(7, r, 0))
        torch.empty((), dtype=torch.int64).random_(generator=sampler)
        empty.append(not bool((torch.rand(4, generator=sampler) < 0.25).any()))
    assert any(empty) and not all(empty)
    model_config = resolve("demo").run.model_config()
    weights, outcomes = [], []
    for engine in ("train_local", "fast"):
        torch.manual_seed(3)
        model = build_model(model_config)
        outcomes.append(fedsgd(model, data, sites, config=config, seed=7, engine=engine))
        weights.append(model.state_dict())
    torch.manual_seed(3)
    start = build_model(model_config).state_dict()
    for key in weights[0]:
        assert not torch.equal(weights[0][key], start[key])
        torch.testing.assert_close(weights[1][key], weights[0][key], rtol=1e-5, atol=1e-6)
    assert outcomes[1].accountant_states == outcomes[0].accountant_states
    assert outcomes[1].epsilons == pytest.approx(outcomes[0].epsilons, rel=1e-12)


def test_site_batch_size_gives_the_exact_sample_rate():
    for n in range(12, 300):
        batch = site_batch_size(n, 4)
        assert math.ceil(n / batch) == 4
    with pytest.raises(ValueError):
        site_batch_size(5, 4)


@pytest.mark.parametrize("epsilon", [1.0, 3.0, 8.0])
def test_noise_is_calibrated_to_the_epsilon_target(epsilon):
    sigma = model_quality.calibrate_noise(epsilon, sample_rate=0.25, steps=80)
    accountant = PrivacyAccountant("rdp")
    accountant.step(noise_multiplier=sigma, sample_rate=0.25, steps=80)
    assert accountant.epsilon(1e-5) == pytest.approx(epsilon, abs=1e-3)
    assert accountant.epsilon(1e-5) <= epsilon
    # distributed noise: the sum carries sigma; one hospital's share alone spends more
    row = model_quality.Row("distributed", hospitals=3, epsilon=epsilon)
    assert model_quality.site_noise(row, sigma) == pytest.approx(sigma / math.sqrt(3))
    assert model_quality.epsilon_of(sigma / math.sqrt(3), sample_rate=0.25, steps=80) > epsilon + 0.5
