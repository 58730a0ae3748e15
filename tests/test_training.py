"""Local training with real Opacus: cumulative epsilon, empty Poisson batches, weights, FedProx, evaluation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader

from client.privacy_ledger import PrivacyLedger
from client.training import DPConfig, LocalTrainConfig, evaluate_local, plan_dp_round, train_local
from common.models import CellDataset, ModelConfig, build_model
from common.training_config import GRAD_SAMPLE_MODES

HEAD = ModelConfig(kind="effnet_head", image_size=64)  # 2 x 2 cells of 192 block-14 features


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _dataset(n: int = 8, seed: int = 0) -> CellDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    targets = torch.full((n, 2, 2), -1)
    targets[labels == 0] = 0
    targets[labels > 0, 0, 0] = labels[labels > 0]
    return CellDataset(torch.rand(n, 192, 2, 2, generator=g) * 6, labels, targets)


def _config(**dp) -> LocalTrainConfig:
    return LocalTrainConfig(batch_size=2, learning_rate=0.1, seed=7,
                            dp=DPConfig(noise_multiplier=1.1, max_grad_norm=1.0, **dp))


def _fresh_rdp(history) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=1e-5)


def test_epsilon_equals_fresh_opacus_rdp_and_accumulates():
    model, data, config = build_model(HEAD), _dataset(), _config()
    first = train_local(model, data, config=config, accountant_state=None, device="cpu")
    assert (first.steps, first.sample_rate, first.accountant) == (4, 0.25, "rdp")
    assert first.accountant_state == {"history": [(1.1, 0.25, 4)], "mechanism": "rdp"}
    assert first.epsilon == _fresh_rdp([(1.1, 0.25, 4)])

    second = train_local(model, data, config=config, accountant_state=first.accountant_state, device="cpu")
    assert second.accountant_state["history"] == [(1.1, 0.25, 8)]
    assert second.epsilon == _fresh_rdp([(1.1, 0.25, 8)]) > first.epsilon


def test_epsilon_grows_across_resumed_runs_through_the_ledger(tmp_path):
    data, config = _dataset(), _config()
    epsilons = []
    for run in range(2):  # a new process each run: a new model and ledger object on the same file
        ledger = PrivacyLedger(tmp_path / "ledger.json")
        plan = plan_dp_round(len(data), config=config)
        decision = ledger.check_budget(noise_multiplier=plan.noise_multiplier, sample_rate=plan.sample_rate,
                                       steps=plan.steps, delta=1e-5, max_epsilon=100.0)
        outcome = train_local(build_model(HEAD), data, config=config,
                              accountant_state=ledger.accountant_state(), device="cpu")
        recorded = ledger.record(noise_multiplier=outcome.noise_multiplier, sample_rate=outcome.sample_rate,
                                 steps=outcome.steps, delta=1e-5, run_id=f"run-{run}", server_round=1)
        assert outcome.epsilon == recorded == decision.epsilon_after
        assert ledger.accountant_state() == outcome.accountant_state
        epsilons.append(outcome.epsilon)
    assert epsilons[1] > epsilons[0] and epsilons[1] == _fresh_rdp([(1.1, 0.25, 8)])


@pytest.mark.parametrize("mode", GRAD_SAMPLE_MODES)
def test_empty_poisson_batches_still_step_and_count(mode):
    data = _dataset(n=2)
    config = LocalTrainConfig(batch_size=1, epochs=10, seed=3, dp=DPConfig(grad_sample_mode=mode))
    replica = DPDataLoader.from_data_loader(
        DataLoader(data, batch_size=1, generator=torch.Generator().manual_seed(3)))
    sizes = [len(batch[0]) if batch else 0 for _ in range(10) for batch in replica]
    assert 0 in sizes  # this seed gives empty batches (q = 1/2)
    outcome = train_local(build_model(HEAD), data, config=config, accountant_state=None, device="cpu")
    assert outcome.steps == 20 and outcome.accountant_state["history"] == [(1.0, 0.5, 20)]
    assert math.isfinite(outcome.train_loss)


@pytest.mark.parametrize("kind", ["cnn", "effnet_head"])
def test_grad_sample_modes_give_the_same_update(kind):
    """Same seed = same Poisson batches and the same noise: the modes must agree on the clipped sums."""
    config = ModelConfig(kind=kind, image_size=64)
    g = torch.Generator().manual_seed(5)
    shape = (1, 64, 64) if kind == "cnn" else (192, 2, 2)
    data = CellDataset(torch.rand(6, *shape, generator=g), torch.arange(6) % 3, torch.randint(-1, 3, (6, 2, 2), generator=g))
    torch.manual_seed(0)
    start = build_model(config).state_dict()
    weights = {}
    for mode in GRAD_SAMPLE_MODES:
        model = build_model(config)
        model.load_state_dict(start)
        train = LocalTrainConfig(batch_size=3, learning_rate=0.5, seed=11,
                                 dp=DPConfig(noise_multiplier=0.3, max_grad_norm=0.5, grad_sample_mode=mode))
        weights[mode] = train_local(model, data, config=train, accountant_state=None, device="cpu").weights
    for mode in GRAD_SAMPLE_MODES[1:]:
        for key in start:
            torch.testing.assert_close(weights[mode][key], weights["hooks"][key], rtol=1e-4, atol=1e-5)
    assert any(not torch.equal(weights["hooks"][k], start[k]) for k in start)


def test_weights_are_plain_and_model_reusable():
    model = build_model(HEAD)
    keys = set(model.state_dict())
    outcome = train_local(model, _dataset(), config=_config(), accountant_state=None, device="cpu")
    assert set(outcome.weights) == keys == {"head.net.weight", "head.net.bias"}
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    assert torch.equal(outcome.weights["head.net.weight"], model.state_dict()["head.net.weight"])
    again = train_local(model, _dataset(), config=_config(), accountant_state=None, device="cpu")
    assert again.steps == 4


def test_dp_off_has_no_privacy_numbers_and_keeps_state():
    state = {"history": [(1.1, 0.25, 4)], "mechanism": "rdp"}
    outcome = train_local(build_model(HEAD), _dataset(), config=_config(enabled=False),
                          accountant_state=state, device="cpu")
    assert (outcome.epsilon, outcome.delta, outcome.noise_multiplier) == (None, None, None)
    assert outcome.accountant_state is state and outcome.steps == 4


def test_fedprox_pulls_towards_start_weights():
    data = _dataset(n=4)
    plain = LocalTrainConfig(batch_size=4, learning_rate=0.1, dp=DPConfig(enabled=False))
    prox = LocalTrainConfig(batch_size=4, learning_rate=0.1, proximal_mu=0.5, dp=DPConfig(enabled=False))
    torch.manual_seed(0)
    start = build_model(HEAD)
    w0 = {k: v.clone() for k, v in start.state_dict().items()}
    a, b = build_model(HEAD), build_model(HEAD)
    a.load_state_dict(w0)
    b.load_state_dict(w0)
    w1 = train_local(a, data, config=plain, accountant_state=None, device="cpu").weights
    wp = train_local(b, data, config=prox, accountant_state=None, device="cpu").weights
    for key in w0:
        torch.testing.assert_close(wp[key], w1[key] - 0.1 * 0.5 * (w1[key] - w0[key]))


def test_evaluate_local_loss_and_metrics():
    model, data = build_model(HEAD), _dataset(n=9)
    outcome = evaluate_local(model, data, device="cpu")
    with torch.no_grad():
        logits = model(data.inputs)
    assert outcome.num_examples == 9
    assert outcome.loss == pytest.approx(float(F.cross_entropy(logits, data.labels)), rel=1e-6)
    assert sum(map(sum, outcome.metrics["confusion_matrix"])) == 9
    assert outcome.metrics["auc_malignant"] is not None
    empty = evaluate_local(model, CellDataset(torch.zeros(0, 192, 2, 2), torch.zeros(0), torch.zeros(0, 2, 2)),
                           device="cpu")
    assert empty.num_examples == 0 and math.isnan(empty.loss) and empty.metrics == {}


def test_plan_matches_opacus_schedule():
    plan = plan_dp_round(10, config=LocalTrainConfig(batch_size=3, epochs=2))
    assert (plan.sample_rate, plan.steps) == (0.25, 8)
    capped = plan_dp_round(10, config=LocalTrainConfig(batch_size=3, epochs=2, max_steps=5))
    assert capped.steps == 5


def test_sampling_and_noise_streams_are_independent_but_reproducible():
    """One seed must not drive both the Poisson sampler and the noise: the noise would be a function of the
    sampling draws. The two streams come from the seed, differ, and repeat for the same seed."""
    from client.training import stream_seeds

    sampling, noise = stream_seeds(7)
    assert sampling != noise and sampling != 7 and noise != 7
    assert stream_seeds(7) == (sampling, noise)
    assert stream_seeds(8) != (sampling, noise)
    assert stream_seeds(None) == (None, None)
    first = [torch.Generator().manual_seed(s).initial_seed() for s in (sampling, noise)]
    assert first[0] != first[1]
    model_a, model_b = build_model(HEAD), build_model(HEAD)
    model_b.load_state_dict(model_a.state_dict())
    a = train_local(model_a, _dataset(), config=_config(), accountant_state=None, device="cpu")
    b = train_local(model_b, _dataset(), config=_config(), accountant_state=None, device="cpu")
    for key in a.weights:
        assert torch.equal(a.weights[key], b.weights[key])
