"""FedAvg's weighted average, and the key check: FedAvg with DP off and one full-batch step per site
equals one centralised step on the pooled data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import ConcatDataset

from client.training import DPConfig, LocalTrainConfig, train_local
from common.aggregation import weighted_average
from common.models import MODEL_KINDS, CellDataset, ModelConfig, build_feature_extractor, build_model


def test_weighted_average_exact_numbers():
    a = {"w": torch.tensor([1.0, 2.0]), "count": torch.tensor(5)}
    b = {"w": torch.tensor([5.0, -2.0]), "count": torch.tensor(5)}
    out = weighted_average([(a, 1), (b, 3)])
    assert torch.equal(out["w"], torch.tensor([4.0, -1.0])) and out["w"].dtype == torch.float32
    assert torch.equal(out["count"], torch.tensor(5))
    np_out = weighted_average([({"w": np.array([1.0, 2.0])}, 3), ({"w": np.array([5.0, 6.0])}, 1)])
    np.testing.assert_array_equal(np_out["w"], [2.0, 3.0])


@pytest.mark.parametrize("bad", [
    [({"w": torch.zeros(2)}, 1), ({"v": torch.zeros(2)}, 1)],
    [({"w": torch.zeros(2)}, 1), ({"w": torch.zeros(3)}, 1)],
    [({"c": torch.tensor(1)}, 1), ({"c": torch.tensor(2)}, 1)],
    [({"w": torch.zeros(2)}, 0)],
    [],
])
def test_weighted_average_refuses_inconsistent_updates(bad):
    with pytest.raises(ValueError):
        weighted_average(bad)


def _site(config: ModelConfig, n: int, seed: int) -> CellDataset:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, config.image_size, config.image_size, generator=g)
    extractor = build_feature_extractor(config)
    if extractor is not None:
        with torch.no_grad():
            images = extractor(images)
    labels = torch.randint(0, 3, (n,), generator=g)
    targets = torch.randint(-1, 3, (n, 2, 2), generator=g)
    return CellDataset(images, labels, targets)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_fedavg_of_full_batch_steps_equals_one_centralised_step(kind):
    torch.set_num_threads(1)
    config = ModelConfig(kind=kind, image_size=64)
    sites = [_site(config, 3, seed=1), _site(config, 5, seed=2)]
    train = LocalTrainConfig(epochs=1, batch_size=64, learning_rate=0.5, cell_loss_weight=1.0,
                             dp=DPConfig(enabled=False))
    torch.manual_seed(0)
    start = {k: v.clone() for k, v in build_model(config).state_dict().items()}

    def one_step(data) -> dict[str, torch.Tensor]:
        model = build_model(config)
        model.load_state_dict(start)
        outcome = train_local(model, data, config=train, accountant_state=None, device="cpu")
        assert outcome.steps == 1 and outcome.num_examples == len(data)
        return outcome.weights

    federated = weighted_average([(one_step(site), len(site)) for site in sites])
    centralised = one_step(ConcatDataset(sites))
    assert set(federated) == set(centralised)
    moved = 0.0
    for key in centralised:
        torch.testing.assert_close(federated[key], centralised[key], rtol=1e-5, atol=1e-6)
        moved = max(moved, float((centralised[key] - start[key]).abs().max()))
    assert moved > 1e-3  # the step really changed the weights
