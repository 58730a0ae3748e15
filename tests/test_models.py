"""Models: real EfficientNet-Lite0 weights, DP-compatibility of every kind, cells, pooling, loss, data sets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib import cbook
from opacus import PrivacyEngine
from opacus.validators import ModuleValidator
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from common.models import (
    MODEL_KINDS,
    CellDataset,
    FrozenFeatureExtractor,
    InferenceModel,
    LabelledImage,
    ModelConfig,
    build_dataset,
    build_feature_extractor,
    build_model,
    cell_grid,
    cell_targets,
    circle_mask,
    lesion_aware_loss,
    load_pretrained,
    topk_abnormal_pool,
)
from common.models.cell_classifier import classwise_topk_pool
from common.models.efficientnet_lite import IMAGENET_MEAN, IMAGENET_STD
from common.records import LesionCircle

MILITARY_UNIFORM = 652  # ImageNet class of the classic Grace Hopper portrait


@pytest.fixture(scope="module")
def pretrained():
    torch.set_num_threads(1)
    return load_pretrained()


def _grace_hopper() -> torch.Tensor:
    image = Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB")
    w, h = image.size
    s = min(w, h)
    image = image.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)).resize((224, 224), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    return (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def test_real_imagenet_weights_recognise_a_known_photo(pretrained):
    with torch.no_grad():
        probs = pretrained(_grace_hopper()).softmax(dim=1)[0]
    assert int(probs.argmax()) == MILITARY_UNIFORM
    assert float(probs[MILITARY_UNIFORM]) > 0.3  # measured 0.43; random weights give ~0.001


@pytest.mark.parametrize("layer", ["block10", "head"])
def test_folded_extractor_equals_original_network(pretrained, layer):
    gray = torch.rand(2, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    x = (gray.expand(-1, 3, -1, -1) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = pretrained.stem(x)
        for block in pretrained._blocks[: 11 if layer == "block10" else 16]:
            ref = block(ref)
        if layer == "head":
            ref = pretrained.head(ref)
        out = FrozenFeatureExtractor(layer)(gray)
    assert out.shape == ref.shape == ((2, 112, 4, 4) if layer == "block10" else (2, 1280, 2, 2))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def _no_batchnorm_no_inplace(module: nn.Module) -> None:
    for name, sub in module.named_modules():
        assert not isinstance(sub, nn.modules.batchnorm._BatchNorm), name
        assert not getattr(sub, "inplace", False), name


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_every_kind_is_opacus_valid(kind):
    config = ModelConfig(kind=kind, image_size=64)
    model = build_model(config)
    assert all(m.training for m in model.modules())  # Opacus only records activations in train mode
    assert ModuleValidator.validate(model, strict=False) == []
    _no_batchnorm_no_inplace(model)
    full = InferenceModel(config, model)
    _no_batchnorm_no_inplace(full)
    assert ModuleValidator.validate(full, strict=False) == []
    assert all(not p.requires_grad for p in (full.extractor.parameters() if full.extractor else []))
    logits, cells = full(torch.rand(2, 1, 64, 64), return_cells=True)
    assert logits.shape == (2, 3) and cells.shape == (2, 3, cell_grid(config), cell_grid(config))


def _tiny_inputs(config: ModelConfig, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    extractor = build_feature_extractor(config)
    images = torch.rand(n, 1, config.image_size, config.image_size, generator=generator)
    if extractor is None:
        return images
    with torch.no_grad():
        return extractor(images)


@pytest.mark.parametrize("kind", MODEL_KINDS)
def test_one_real_opacus_step_on_every_kind(kind):
    torch.manual_seed(0)
    config = ModelConfig(kind=kind, image_size=64)
    model = build_model(config)
    n = 6
    dataset = CellDataset(_tiny_inputs(config, n), torch.tensor([0, 1, 2, 0, 1, 2]),
                          torch.tensor([[[0, 0], [0, 0]], [[1, -1], [-1, -1]], [[-1, 2], [-1, -1]]] * 2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = PrivacyEngine(accountant="rdp")
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(dataset, batch_size=3), noise_multiplier=1.0, max_grad_norm=1.0,
        poisson_sampling=True)
    inputs, labels, cells = torch.zeros(0), torch.zeros(0), torch.zeros(0)
    for inputs, labels, cells in loader:
        if len(labels):
            break
    optimizer.zero_grad()
    image_logits, cell_logits = private(inputs, return_cells=True)
    lesion_aware_loss(image_logits, cell_logits, labels, cells).mean().backward()
    optimizer.step()
    assert engine.accountant.history == [(1.0, 0.5, 1)]
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert set(changed) == {k for k, p in model.named_parameters() if p.requires_grad}


def test_topk_pool_takes_the_most_abnormal_cells():
    cells = torch.zeros(1, 3, 2, 2)
    cells[0, :, 0, 0] = torch.tensor([5.0, 0.0, 0.0])  # clearly normal
    cells[0, :, 0, 1] = torch.tensor([0.0, 0.0, 4.0])  # malignant-looking
    cells[0, :, 1, 0] = torch.tensor([0.0, 2.0, 0.0])  # benign-looking, less abnormal
    cells[0, :, 1, 1] = torch.tensor([1.0, 0.0, 0.0])
    assert torch.equal(topk_abnormal_pool(cells, 1), torch.tensor([[0.0, 0.0, 4.0]]))
    assert torch.equal(topk_abnormal_pool(cells, 2), torch.tensor([[0.0, 1.0, 2.0]]))
    assert torch.equal(topk_abnormal_pool(cells, 10), cells.mean(dim=(2, 3)))


def test_classwise_pool_scores_each_class_by_its_own_cells():
    cells = torch.zeros(1, 3, 1, 3)
    cells[0, :, 0, 0] = torch.tensor([0.0, 0.0, 9.0])  # malignant-looking
    cells[0, :, 0, 1] = torch.tensor([0.0, 9.0, 0.0])  # benign-looking
    logp = torch.log_softmax(cells, dim=1)[0, :, 0]  # (3 classes, 3 cells)
    got = classwise_topk_pool(cells, 1)[0]
    torch.testing.assert_close(got, torch.stack([logp[0].min(), logp[1].max(), logp[2].max()]))
    got2 = classwise_topk_pool(cells, 2)[0]
    torch.testing.assert_close(got2, torch.stack([logp[0].sort().values[:2].mean(),
                                                  logp[1].sort().values[1:].mean(),
                                                  logp[2].sort().values[1:].mean()]))


def test_input_norm_makes_the_head_blind_to_each_images_feature_scale():
    torch.manual_seed(0)
    config = ModelConfig(kind="effnet_head", image_size=64)
    assert config.input_norm and config.feature_layer == "block14"
    model = build_model(config).eval()
    features = torch.rand(2, 192, 2, 2) * 6
    rescaled = features * torch.tensor([3.0, 0.5]).view(2, 1, 1, 1) + torch.tensor([1.0, -2.0]).view(2, 1, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(rescaled), model(features), rtol=1e-4, atol=1e-4)
        plain = build_model(ModelConfig(kind="effnet_head", image_size=64, input_norm=False)).eval()
        assert not torch.allclose(plain(rescaled), plain(features), atol=1e-2)
    assert not [p for p in model.body.parameters()]  # no weights to train, nothing learnt across images


def test_cell_targets_from_a_lesion_circle():
    lesion = circle_mask([LesionCircle(x=19.5, y=7.5, r=3.5)], (32, 32))  # 0.3 of two cells each
    breast = np.zeros((32, 32), dtype=bool)
    breast[:, :24] = True  # right quarter is background
    got = cell_targets(2, grid=4, lesion_mask=lesion, breast_mask=breast)
    expected = np.array([[-1, -1, 2, 0],
                         [-1, -1, 2, 0],
                         [-1, -1, -1, 0],
                         [-1, -1, -1, 0]])
    np.testing.assert_array_equal(got, expected)
    assert cell_targets(1, grid=4, lesion_mask=lesion, outside_lesion="normal")[3, 0] == 0
    assert (cell_targets(2, grid=4) == -1).all()  # abnormal, no annotation: image loss only
    assert (cell_targets(0, grid=4, lesion_mask=None) == 0).all()


def test_small_lesion_still_marks_its_best_cell():
    lesion = circle_mask([LesionCircle(x=13, y=13, r=1)], (32, 32))  # ~1% of a cell
    got = cell_targets(1, grid=4, lesion_mask=lesion)
    assert got[1, 1] == 1 and (got == 1).sum() == 1


def test_loss_is_image_term_plus_balanced_cell_term():
    image = torch.zeros(2, 3)
    cells = torch.zeros(2, 3, 1, 2)
    cells[0, 2, 0, 0] = 10.0  # confident malignant cell
    targets = torch.tensor([[[2, 0]], [[-1, -1]]])
    loss = lesion_aware_loss(image, cells, torch.tensor([2, 1]), targets)
    log3 = torch.log(torch.tensor(3.0))
    lesion_ce = -torch.log_softmax(torch.tensor([0.0, 0.0, 10.0]), 0)[2]
    torch.testing.assert_close(loss, torch.stack([log3 + 0.5 * (lesion_ce + log3), log3]))
    assert torch.equal(lesion_aware_loss(image, cells, torch.tensor([2, 1]), targets, cell_weight=0),
                       torch.full((2,), float(log3)))


def test_build_dataset_items_for_cnn():
    config = ModelConfig(kind="cnn", image_size=64)
    lesion = circle_mask([LesionCircle(x=40, y=40, r=10)], (128, 128))
    items = [LabelledImage(np.zeros((128, 128), np.float32), 0),
             LabelledImage(np.ones((128, 128), np.float32), 2, lesion_mask=lesion)]
    dataset = build_dataset(items, config)
    inputs, label, target = dataset[1]
    assert inputs.shape == (1, 64, 64) and torch.allclose(inputs, torch.ones(1, 64, 64))
    assert label == 2 and target.shape == (2, 2) and target.dtype == torch.long
    assert target.tolist() == [[2, -1], [-1, -1]]
    assert dataset[0][2].tolist() == [[0, 0], [0, 0]]


def test_config_rejects_unknown_kind_and_round_trips():
    with pytest.raises(ValueError, match="unknown model kind"):
        ModelConfig(kind="resnet")
    config = ModelConfig(kind="effnet_finetune", finetune_from=14, top_k=3, pooling="abnormal")
    assert ModelConfig.from_dict(config.to_dict()) == config
    assert config.extractor_layer == "block13"
