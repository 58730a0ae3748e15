"""Explanations: exact maps of tiny hand-weighted networks (as Captum's own tests), the model-randomisation check on
a real EfficientNet model, localisation scores on hand-made masks, and the Opacus-free model copy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from opacus.grad_sample import GradSampleModule
from scipy.stats import spearmanr
from torch import nn

from common.explanations import (
    MALIGNANT,
    METHODS,
    cell_score_map,
    explain,
    explainable,
    grad_cam,
    integrated_gradients,
    mass_inside,
    model_randomisation_check,
    occlusion,
    pointing_game,
    random_baseline,
    randomised_head,
    rank_correlation,
)
from common.models import CellClassifier, InferenceModel, ModelConfig, build_model, lesion_aware_loss
from common.models.cell_classifier import CellHead

BENIGN = 1

# 4 x 4 image; the 2 x 2 sum-pooling body gives cell features A = [[10, 2], [2, 7]].
X = torch.tensor([[1.0, 2, 0, 1],
                  [3, 4, 1, 0],
                  [0, 1, 2, 2],
                  [1, 0, 2, 1]]).reshape(1, 1, 4, 4)
A = np.array([[10.0, 2], [2, 7]])


def tiny_classifier() -> CellClassifier:
    """body: 2x2 conv, stride 2, weights all 1 (cell feature = block sum); head: cell logits (0, 0, feature);
    "abnormal" top-1 pooling: image logits = the logits of the cell with the largest feature."""
    body = nn.Conv2d(1, 1, 2, stride=2, bias=False)
    head = CellHead(1, 3)
    with torch.no_grad():
        body.weight.fill_(1.0)
        head.net.weight.copy_(torch.tensor([0.0, 0.0, 1.0]).reshape(3, 1, 1, 1))
        head.net.bias.zero_()
    return CellClassifier(body, head, top_k=1, pooling="abnormal")


def blocks(cells: np.ndarray) -> np.ndarray:
    """(2, 2) -> (4, 4), each value over its 2 x 2 block."""
    return np.kron(cells, np.ones((2, 2)))


def test_tiny_network_logits():
    logits, cells = tiny_classifier()(X, return_cells=True)
    assert logits.tolist() == [[0.0, 0.0, 10.0]]
    assert cells[0, 2].tolist() == A.tolist()


def test_grad_cam_exact_map_nearest():
    # d(image logit)/dA = 1 on the chosen cell: channel weight 1/4 (mean over 4 cells); map ReLU(A / 4).
    cam = grad_cam(explainable(tiny_classifier()), X, upsample="nearest")
    assert cam.shape == (1, 4, 4)
    np.testing.assert_allclose(cam[0].numpy(), blocks(A / 4), atol=1e-6)


def test_grad_cam_exact_map_bilinear():
    # bilinear, align_corners False, 2 -> 4: output pixel centres at -0.25, 0.25, 0.75, 1.25 cells (edges clamp).
    w = np.array([[1, 0], [0.75, 0.25], [0.25, 0.75], [0, 1]])
    cam = grad_cam(explainable(tiny_classifier()), X)
    np.testing.assert_allclose(cam[0].numpy(), w @ (A / 4) @ w.T, atol=1e-6)


def test_grad_cam_of_a_class_the_head_ignores_is_zero():
    cam = grad_cam(explainable(tiny_classifier()), X, BENIGN)
    assert cam.abs().max().item() == 0.0


def test_integrated_gradients_exact_map():
    # Along the path a * X the chosen cell stays (0, 0) and the logit is a * 10: the gradient is 1 on that block,
    # so the attribution is X there and 0 elsewhere, for any number of steps (completeness: it sums to 10).
    for steps in (4, 16):
        ig = integrated_gradients(explainable(tiny_classifier()), X, steps=steps, internal_batch_size=3)
        expected = X[0, 0].numpy() * blocks(np.array([[1.0, 0], [0, 0]]))
        np.testing.assert_allclose(ig[0].numpy(), expected, atol=1e-5)
        assert ig.sum().item() == pytest.approx(10.0, abs=1e-4)


def test_occlusion_exact_map_disjoint_windows():
    # Blacking out block (0, 0) leaves 7 as the largest cell: 10 - 7 = 3 on that block; other blocks change nothing.
    occ = occlusion(explainable(tiny_classifier()), X, window=2, stride=2)
    np.testing.assert_allclose(occ[0].numpy(), blocks(np.array([[3.0, 0], [0, 0]])), atol=1e-6)


def test_occlusion_overlapping_windows_average_per_pixel():
    model = tiny_classifier()
    total, count = np.zeros((4, 4)), np.zeros((4, 4))
    with torch.no_grad():
        base = model(X)[0, MALIGNANT].item()
        for r in range(3):
            for c in range(3):
                hidden = X.clone()
                hidden[..., r:r + 2, c:c + 2] = 0
                total[r:r + 2, c:c + 2] += base - model(hidden)[0, MALIGNANT].item()
                count[r:r + 2, c:c + 2] += 1
    occ = occlusion(explainable(model), X, window=2, stride=1)
    np.testing.assert_allclose(occ[0].numpy(), total / count, atol=1e-6)
    assert occ[0, 0, 0].item() == pytest.approx(3.0)  # only the window at (0, 0) covers the corner: 10 - 7


def test_cell_score_map_exact():
    expected = np.exp(A) / (2 + np.exp(A))  # softmax of (0, 0, A)
    maps = cell_score_map(explainable(tiny_classifier()), X)
    np.testing.assert_allclose(maps[0].numpy(), blocks(expected), rtol=1e-6)
    np.testing.assert_allclose(cell_score_map(explainable(tiny_classifier()), X, [BENIGN])[0].numpy(),
                               blocks(1 / (2 + np.exp(A))), rtol=1e-6)


def test_explain_dispatches_and_refuses_a_training_model():
    model = explainable(tiny_classifier())
    assert set(METHODS) == {"grad_cam", "integrated_gradients", "occlusion", "cell_scores"}
    torch.testing.assert_close(explain("occlusion", model, X, window=2, stride=2),
                               occlusion(model, X, window=2, stride=2))
    with pytest.raises(ValueError, match="unknown explanation method"):
        explain("saliency", model, X)
    with pytest.raises(ValueError, match="explainable"):
        explain("grad_cam", tiny_classifier().train(), X)
    with pytest.raises(ValueError, match="2 targets for 1 images"):
        explain("grad_cam", model, X, [1, 2])


SIZE = 128  # 4 x 4 cells of 32 px


def _images(centres: list[tuple[int, int] | None], seed: int = 1) -> torch.Tensor:
    """Noisy grey images, with a bright disc of radius 12 px at each given (row, col) centre."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    images = 0.3 + 0.1 * torch.rand(len(centres), 1, SIZE, SIZE, generator=g)
    for image, centre in zip(images, centres):
        if centre is not None:
            image[0][(rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= 144] = 0.95
    return images


@pytest.fixture(scope="module")
def effnet() -> InferenceModel:
    """A real "effnet_head" model (frozen EfficientNet-Lite0 features, 128 px) whose head learnt that a bright
    disc is malignant: 60 Adam steps on 8 images, the disc's cell the lesion cell."""
    config = ModelConfig(kind="effnet_head", image_size=SIZE)
    torch.manual_seed(0)
    model = InferenceModel(config, build_model(config))
    centres = [(48, 48), (80, 16), (16, 112), (112, 80), None, None, None, None]
    with torch.no_grad():
        features = model.extractor(_images(centres, seed=2))
    labels = torch.tensor([MALIGNANT] * 4 + [0] * 4)
    cells = torch.zeros(8, 4, 4, dtype=torch.long)
    for i, centre in enumerate(centres[:4]):
        cells[i, centre[0] // 32, centre[1] // 32] = MALIGNANT
    optimizer = torch.optim.Adam(model.model.parameters(), lr=0.05)
    for _ in range(60):
        optimizer.zero_grad()
        logits, cell_logits = model.model(features, return_cells=True)
        lesion_aware_loss(logits, cell_logits, labels, cells).mean().backward()
        optimizer.step()
    return model


TEST_CENTRES = [(80, 80), (16, 48)]


def test_grad_cam_and_cell_map_from_cached_features_equal_the_image_path(effnet):
    model = explainable(effnet)
    images = _images(TEST_CENTRES)
    with torch.no_grad():
        features = model.extractor(images)
    classifier = explainable(model.model)
    for method in ("grad_cam", "cell_scores"):
        from_images = explain(method, model, images)
        from_features = explain(method, classifier, features, size=SIZE)
        assert from_images.shape == (2, SIZE, SIZE)
        torch.testing.assert_close(from_features, from_images, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="size"):
        grad_cam(classifier, features)


OPTIONS = {"integrated_gradients": {"steps": 8, "internal_batch_size": 8},
           "occlusion": {"window": 32, "stride": 32, "perturbations_per_eval": 16}}


def test_trained_model_maps_point_at_the_lesion(effnet):
    model = explainable(effnet)
    images = _images(TEST_CENTRES)
    rows, cols = np.ogrid[:SIZE, :SIZE]
    lesions = [(rows - r) ** 2 + (cols - c) ** 2 <= 144 for r, c in TEST_CENTRES]
    for method in METHODS:
        maps = explain(method, model, images, **OPTIONS.get(method, {}))
        hits = [pointing_game(m.numpy(), lesion) for m, lesion in zip(maps, lesions)]
        assert hits == [True, True], method


def test_attributions_change_when_the_head_is_randomised(effnet):
    model = explainable(effnet)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = _images(TEST_CENTRES)
    randomised = randomised_head(model, seed=5)
    assert not torch.equal(randomised.model.head.net.weight, model.model.head.net.weight)
    torch.testing.assert_close(randomised.extractor.stem.weight, model.extractor.stem.weight)
    for method in METHODS:
        trained = explain(method, model, images, **OPTIONS.get(method, {}))
        correlation = model_randomisation_check(method, model, images, seed=5, attributions=trained,
                                                **OPTIONS.get(method, {}))
        assert correlation < 0.85, method  # the same model: 1 (below)
    again = explain("grad_cam", model, images)
    assert rank_correlation(again[0].numpy(), explain("grad_cam", model, images)[0].numpy()) == pytest.approx(1.0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key  # the model explained is never changed


def test_rank_correlation_is_spearman_with_mean_ranks_for_ties():
    a = np.array([[1.0, 2, 2], [3, 0, 5]])
    b = np.array([[1.0, 3, 2], [4, 1, 1]])
    assert rank_correlation(a, b) == pytest.approx(spearmanr(a.ravel(), b.ravel()).statistic)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    mask = np.array([[True, True, True], [True, False, False]])
    assert rank_correlation(a, b, mask) == pytest.approx(spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic)
    assert np.isnan(rank_correlation(np.ones((2, 2)), a[:, :2]))


# --- localisation -------------------------------------------------------------------------------------------

LESION = np.zeros((4, 4), dtype=bool)
LESION[0:2, 0:2] = True
BREAST = np.zeros((4, 4), dtype=bool)
BREAST[:, 0:2] = True  # left half


def test_pointing_game_unique_maximum():
    heat = np.zeros((4, 4))
    heat[1, 1] = 5.0
    assert pointing_game(heat, LESION)
    heat[3, 3] = 9.0
    assert not pointing_game(heat, LESION)
    assert pointing_game(heat, LESION, BREAST)  # (3, 3) lies outside the breast: the maximum there is (1, 1)


def test_pointing_game_ties_point_at_the_maximal_pixel_nearest_their_centroid():
    heat = np.zeros((4, 4))
    heat[1:3, 1:3] = 2.0  # centroid (1.5, 1.5): four maximal pixels at equal distance, (1, 1) first
    single = np.zeros((4, 4), dtype=bool)
    single[1, 1] = True
    assert pointing_game(heat, single)
    single[:] = False
    single[2, 2] = True
    assert not pointing_game(heat, single)
    heat = np.zeros((4, 4))
    heat[0, 0:3] = 1.0  # centroid (0, 1): pixel (0, 1) itself
    single[:] = False
    single[0, 1] = True
    assert pointing_game(heat, single)


def test_a_constant_map_points_nowhere_and_only_positive_values_carry_mass():
    assert not pointing_game(np.zeros((4, 4)), LESION)
    assert not pointing_game(np.where(BREAST, -1.0, 3.0), LESION, BREAST)  # constant inside the breast
    heat = np.full((4, 4), -3.0)
    heat[0, 1] = -0.5  # all negative: the maximum still points
    assert pointing_game(heat, LESION)
    assert mass_inside(heat, LESION) == 0.0


def test_mass_inside_counts_positive_attribution_in_the_region():
    heat = np.array([[4.0, 0, 0, 0],
                     [0, -1, 0, 0],
                     [1, 0, 0, 0],
                     [0, 0, 0, 3]])
    assert mass_inside(heat, LESION) == pytest.approx(4 / 8)  # negative values count as 0
    assert mass_inside(heat, LESION, BREAST) == pytest.approx(4 / 5)  # (3, 3) is outside the breast


def test_random_baseline_is_the_lesion_share_and_what_random_maps_score():
    assert random_baseline(LESION) == pytest.approx(4 / 16)
    assert random_baseline(LESION, BREAST) == pytest.approx(4 / 8)
    lesion = np.zeros((4, 4), dtype=bool)
    lesion[0, :3] = True
    expected = random_baseline(lesion, BREAST)
    assert expected == pytest.approx(2 / 8)
    rng = np.random.default_rng(0)
    maps = rng.random((4000, 4, 4))
    hits = np.mean([pointing_game(m, lesion, BREAST) for m in maps])
    mass = np.mean([mass_inside(m, lesion, BREAST) for m in maps])
    assert hits == pytest.approx(expected, abs=0.025)
    assert mass == pytest.approx(expected, abs=0.01)


def test_localisation_checks_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        pointing_game(np.zeros((4, 4)), np.zeros((4, 5), dtype=bool))


# --- the model attributions run on ---------------------------------------------------------------------------

def _hook_count(module: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _opacus_wrapped() -> GradSampleModule:
    wrapped = GradSampleModule(tiny_classifier())
    wrapped.train()
    # a backward pass leaves per-sample gradients on the parameters
    wrapped(X.repeat(3, 1, 1, 1).requires_grad_(True))[:, MALIGNANT].sum().backward()
    return wrapped


def test_explainable_unwraps_opacus_and_leaves_the_original_alone():
    wrapped = _opacus_wrapped()
    hooks = _hook_count(wrapped)
    state = {k: v.clone() for k, v in wrapped.state_dict().items()}
    assert hooks > 0 and all(k.startswith("_module.") for k in state)
    model = explainable(wrapped)
    assert isinstance(model, CellClassifier) and not model.training
    assert set(model.state_dict()) == {k.removeprefix("_module.") for k in state}
    assert _hook_count(model) == 0
    assert all(not p.requires_grad and p.grad is None and not hasattr(p, "grad_sample")
               for p in model.parameters())
    # the original: still wrapped, hooked, training, with its per-sample gradients and the same weights
    assert _hook_count(wrapped) == hooks and wrapped.training
    assert all(p.requires_grad and p.grad_sample is not None for p in wrapped.parameters())
    assert all(torch.equal(v, state[k]) for k, v in wrapped.state_dict().items())
    np.testing.assert_allclose(grad_cam(model, X, upsample="nearest")[0].numpy(), blocks(A / 4), atol=1e-6)


def test_explainable_unwraps_a_wrapped_model_inside_an_inference_model():
    config = ModelConfig(kind="cnn", image_size=32, cnn_width=4)
    inner = build_model(config)
    wrapped = InferenceModel(config, GradSampleModule(inner))
    model = explainable(wrapped)
    assert isinstance(model.model, CellClassifier) and _hook_count(model) == 0
    assert isinstance(wrapped.model, GradSampleModule) and _hook_count(wrapped) > 0
    images = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(images), inner.eval()(images))
    assert grad_cam(model, images).shape == (2, 32, 32)
