"""A hospital explains a model on its validation images: counts equal the per-image scores, heatmaps stay local."""

from __future__ import annotations

import json

import numpy as np
import torch

from client.app import explanation_reply_metrics
from client.explanation_round import explain_images, explainable_images
from common import wire
from common.explanations import explain, explainable, mass_inside, pointing_game, random_baseline
from common.models import InferenceModel, LabelledImage, build_model
from common.node_policy import NodePolicy
from common.run_config import NodeConfig, RunConfig


def _image(label: int, lesion: bool, seed: int) -> LabelledImage:
    rng = np.random.default_rng(seed)
    image = np.zeros((64, 64), dtype=np.float32)
    image[8:56, 0:40] = rng.uniform(0.3, 0.6, size=(48, 40))
    breast = image > 0
    mask = None
    if lesion:
        mask = np.zeros((64, 64), dtype=bool)
        mask[20:30, 10:20] = True
        image[mask] = 0.95
    return LabelledImage(image=image, label=label, lesion_mask=mask, breast_mask=breast)


def test_counts_are_the_sums_of_the_per_image_scores_and_files_stay_in_the_state_dir(tmp_path):
    run = RunConfig(model="cnn", image_size=64)
    torch.manual_seed(0)
    model = InferenceModel(run.model_config(), build_model(run.model_config()).eval())
    images = [_image(2, True, 0), _image(0, False, 1), _image(1, True, 2), _image(1, False, 3)]
    chosen = explainable_images(images)
    assert [item.label for item in chosen] == [2, 1]  # normal and unannotated images are not scored
    methods = ("cell_scores", "grad_cam")
    tally = explain_images(model, chosen, methods, out_dir=tmp_path / "explanations" / "run-7")
    reference = explainable(model)
    assert tally.images == 2
    assert tally.baseline_sum == sum(random_baseline(i.lesion_mask, i.breast_mask) for i in chosen)
    for method in methods:
        maps = [explain(method, reference, torch.from_numpy(i.image)[None, None], target=i.label)[0].detach().numpy()
                for i in chosen]
        assert tally.hits[method] == sum(pointing_game(m, i.lesion_mask, i.breast_mask) for m, i in zip(maps, chosen))
        assert np.isclose(tally.mass_sum[method],
                          sum(mass_inside(m, i.lesion_mask, i.breast_mask) for m, i in zip(maps, chosen)))
    written = sorted(p.name for p in (tmp_path / "explanations" / "run-7").iterdir())
    assert written == ["image-0000-cell_scores.png", "image-0000-grad_cam.png", "image-0001-cell_scores.png",
                       "image-0001-grad_cam.png", "results.json"]
    results = json.loads((tmp_path / "explanations" / "run-7" / "results.json").read_text())
    assert [r["label"] for r in results["images"]] == ["malignant", "benign"]
    node = NodeConfig(data_dir=tmp_path, state_dir=tmp_path, policy=NodePolicy(max_epsilon=1.0))
    reply = explanation_reply_metrics(tally, node)
    assert reply[wire.EXPLAINED_IMAGES] == 2
    assert reply[wire.explain_key("grad_cam", "hits")] == tally.hits["grad_cam"]
    assert set(reply) == {wire.EXPLAINED_IMAGES, wire.EXPLAIN_BASELINE_SUM,
                          *(wire.explain_key(m, q) for m in methods for q in ("hits", "mass-sum"))}
