"""The localisation benchmark's own parts: tallies pooled over folds, the table, which images count, one fold end to
end on a small real model. No mini-MIAS: synthetic mammogram-like images through the real preprocessing."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import localisation
from bench.localisation import Settings, Tally, format_table, lesion_images, summarise
from client.hospital_data import PreparedImage
from common.models import ModelConfig, build_feature_extractor, build_model, compute_inputs
from common.preprocessing import PreprocessConfig, preprocess
from common.records import ImageRecord, LesionCircle

pytestmark = [pytest.mark.filterwarnings("ignore:Full backward hook is firing")]


def test_summary_of_a_tally():
    tally = Tally()
    for hit, mass, baseline in [(True, 0.5, 0.1), (True, 0.1, 0.05), (False, 0.0, 0.05), (True, 0.2, 0.0)]:
        tally.add(hit, mass, baseline, empty=mass == 0)
    tally.correlations += [0.1, math.nan, 0.3]
    s = summarise(tally)
    assert s["images"] == 4 and s["empty_maps"] == 1
    assert s["pointing_game"] == 0.75
    assert s["pointing_game_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert s["mass_inside"] == pytest.approx(0.2)
    assert s["mass_inside_se"] == pytest.approx(np.std([0.5, 0.1, 0.0, 0.2], ddof=1) / 2)
    assert s["random"] == pytest.approx(0.05)
    assert s["randomisation_images"] == 2
    assert s["randomisation_rank_correlation"] == pytest.approx(0.2)
    assert s["randomisation_rank_correlation_se"] == pytest.approx(np.std([0.1, 0.3], ddof=1) / math.sqrt(2))
    assert summarise(Tally()) == {"images": 0}


def test_folds_pool_as_one_tally():
    a, b, together = Tally(), Tally(), Tally()
    for i, (hit, mass) in enumerate([(True, 0.3), (False, 0.1), (True, 0.6)]):
        (a if i < 2 else b).add(hit, mass, 0.02, empty=not hit)
        together.add(hit, mass, 0.02, empty=not hit)
    a.correlations.append(0.5)
    b.correlations.append(0.1)
    together.correlations += [0.5, 0.1]
    assert summarise(a.merge(b)) == pytest.approx(summarise(together))


def test_table_rows():
    tally = Tally()
    tally.add(True, 0.25, 0.05)
    tally.add(False, 0.15, 0.03)
    summary = {"grad_cam": {"all": summarise(tally)}, "occlusion": {"all": summarise(Tally())}}
    table = format_table(summary).splitlines()
    assert table[0].startswith("| method | images (empty maps) | pointing game | random | mass inside |")
    assert table[2] == "| Grad-CAM | 2 (0) | 0.50 ± 0.35 | 0.040 | 0.200 ± 0.050 | 0.040 | - |"
    assert len(table) == 3  # no row for a method without images


def test_settings_size_the_expensive_methods():
    settings = Settings(ig_steps=4, occlusion_window=64, occlusion_stride=32)
    assert settings.options("integrated_gradients") == {"steps": 4, "internal_batch_size": 2}
    assert settings.options("occlusion") == {"window": 64, "stride": 32, "perturbations_per_eval": 1}
    assert settings.options("grad_cam") == {}
    assert (512 - Settings().occlusion_window) % Settings().occlusion_stride == 0  # every pixel is occluded


SIZE = 64


def _prepared(label: str, circles: tuple[LesionCircle, ...], seed: int) -> PreparedImage:
    """A 128-px image: a bright half-disc breast on the left, black elsewhere, preprocessed to 64 px."""
    rng = np.random.default_rng(seed)
    rows, cols = np.ogrid[:128, :128]
    breast = (rows - 64) ** 2 + cols ** 2 <= 90 ** 2
    pixels = np.where(breast, 0.5 + 0.2 * rng.random((128, 128)), 0.0).astype(np.float32)
    for c in circles:
        pixels[(rows - c.y) ** 2 + (cols - c.x) ** 2 <= c.r ** 2] = 0.95
    record = ImageRecord(path=Path(f"synthetic{seed}.png"), label=label, patient_id=f"p{seed}", lesions=circles)
    return PreparedImage(record, preprocess(pixels, breast_side="left", config=PreprocessConfig(size=SIZE)))


@pytest.fixture(scope="module")
def prepared() -> list[PreparedImage]:
    return [_prepared("malignant", (LesionCircle(30, 60, 8),), 0),
            _prepared("normal", (), 1),
            _prepared("benign", (LesionCircle(40, 40, 6),), 2),
            _prepared("malignant", (LesionCircle(120, 5, 3),), 3)]  # the circle lies outside the breast


def test_lesion_images_keep_circles_inside_the_breast(prepared):
    images, missed = lesion_images(prepared, [0, 1, 2, 3])
    assert [item.index for item in images] == [0, 2]
    assert [item.label for item in images] == [2, 1]
    assert missed == 1
    assert all((item.lesion & item.breast).any() for item in images)
    assert images[0].lesion.shape == (SIZE, SIZE)


def test_one_fold_end_to_end(prepared):
    config = ModelConfig(kind="effnet_head", image_size=SIZE)
    torch.manual_seed(0)
    model = build_model(config)
    extractor = build_feature_extractor(config)
    inputs = compute_inputs([p.preprocessed.image for p in prepared], config, extractor)
    data = type("Data", (), {"inputs": inputs})()  # explain_fold reads only the cached features
    images, _ = lesion_images(prepared, range(len(prepared)))
    settings = Settings(ig_steps=2, occlusion_window=32, occlusion_stride=32, randomisation_images=1)
    cpu = dict.fromkeys(localisation.METHOD_ORDER, 0.0)
    tallies = localisation.explain_fold(model, config, extractor, data, prepared, images, settings, seed=3,
                                        cpu_seconds=cpu)
    for name in localisation.METHOD_ORDER:
        assert tallies[name]["all"].images == 2 and tallies[name]["malignant"].images == 1, name
        expected = 1 if name in ("integrated_gradients", "occlusion") else 2
        assert len(tallies[name]["all"].correlations) == expected, name
        assert cpu[name] > 0, name
    baseline = tallies["cell_scores"]["all"].baseline
    assert baseline == pytest.approx(sum(float((i.lesion & i.breast).sum() / i.breast.sum()) for i in images))
    assert all(p.requires_grad for p in model.parameters())  # the trained model is not changed
