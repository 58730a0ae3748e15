"""The one inference path: bundle -> preprocessing -> model -> probabilities, maps back onto the original image."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from common.bundle import BundleError, BundleMeta, save_bundle
from common.inference import Predictor, cell_map_to_frame
from common.models import InferenceModel, build_model
from common.operating_point import OperatingPoint
from common.preprocessing import Geometry, PreprocessConfig, preprocess
from common.run_config import RunConfig
from common.weights import exchanged_weights
from signed_files import TRUSTED, bundle_signature, resign


def _phantom(height=300, width=200, side="right"):
    image = np.zeros((height, width), dtype=np.float32)
    cols = slice(width // 2, width) if side == "right" else slice(0, width // 2)
    image[40:260, cols] = 0.7
    image[120:140, (3 * width // 4 if side == "right" else width // 4):][:, :10] = 1.0  # a bright spot
    return image


def test_unwarp_inverts_warp_inside_the_crop():
    image = _phantom()
    pre = preprocess(image, breast_side=None, config=PreprocessConfig(size=128))
    assert pre.geometry.flipped
    back = pre.geometry.unwarp(pre.image)
    inside = np.zeros_like(image, dtype=bool)
    inside[45:255, 105:195] = True
    assert np.abs(back[inside] - image[inside]).max() < 0.2
    assert back[:, :95].max() == 0.0  # outside the crop
    # a map with one hot output pixel comes back where map_point sends the original pixel
    g = pre.geometry
    x, y = g.map_point(150, 130)
    frame = np.zeros((128, 128), dtype=np.float32)
    frame[int(round(y)), int(round(x))] = 1.0
    hot = np.unravel_index(np.argmax(g.unwarp(frame)), image.shape)
    assert abs(hot[0] - 130) <= 2 and abs(hot[1] - 150) <= 2


def test_unwarp_refuses_a_map_of_another_size():
    geometry = Geometry.fit((10, 10), (0, 0, 10, 10), flipped=False, size=8)
    with pytest.raises(ValueError, match="output shape"):
        geometry.unwarp(np.zeros((4, 4)))


def test_cell_map_to_frame_repeats_each_cell():
    frame = cell_map_to_frame(np.array([[1.0, 2.0], [3.0, 4.0]]), 6)
    assert frame.shape == (6, 6)
    assert frame[0, 0] == 1.0 and frame[2, 3] == 2.0 and frame[5, 0] == 3.0 and frame[5, 5] == 4.0


def _bundle(tmp_path, threshold: float | None):
    run = RunConfig(model="cnn", image_size=64)
    torch.manual_seed(0)
    model = build_model(run.model_config())
    info = {} if threshold is None else {"operating_point": OperatingPoint(
        threshold=threshold, rule="sensitivity", target=0.9, sensitivity=0.9, specificity=0.5, source="t").to_json()}
    meta = BundleMeta(model_config=run.model_config(), preprocess_config=PreprocessConfig(size=64), info=info)
    return save_bundle(tmp_path / "m.mammofl", exchanged_weights(model), meta, sign=bundle_signature()), model, meta


def test_predictor_matches_the_model_and_decides_at_the_operating_point(tmp_path):
    path, model, meta = _bundle(tmp_path, threshold=0.0)
    predictor = Predictor.from_bundle(path, trusted=TRUSTED)
    image = _phantom()
    prediction = predictor.predict_pixels(image)
    reference = InferenceModel(meta.model_config, model.eval())
    with torch.no_grad():
        logits = reference(torch.from_numpy(preprocess(image, breast_side=None, config=meta.preprocess_config)
                                            .image)[None, None])
    assert np.allclose(prediction.probabilities, torch.softmax(logits, 1)[0].numpy(), atol=1e-6)
    assert prediction.probabilities.sum() == pytest.approx(1.0, abs=1e-6)
    assert prediction.decision_name == "malignant"  # threshold 0: everything is called malignant
    grid = prediction.cell_probabilities.shape[-1]
    assert prediction.cell_probabilities.shape == (3, grid, grid)
    assert np.allclose(prediction.cell_probabilities.sum(axis=0), 1.0, atol=1e-5)
    assert prediction.on_original(prediction.cell_map()).shape == image.shape


def test_predictor_without_operating_point_uses_argmax(tmp_path):
    path, _, _ = _bundle(tmp_path, threshold=None)
    predictor = Predictor.from_bundle(path, trusted=TRUSTED)
    assert predictor.threshold is None
    probs = np.array([[0.2, 0.5, 0.3], [0.1, 0.1, 0.8]])
    assert predictor.decide(probs).tolist() == [1, 2]


def test_a_bundle_made_with_other_preprocessing_is_refused(tmp_path):
    path, _, _ = _bundle(tmp_path, threshold=0.5)
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta["preprocess_fingerprint"] = "0" * 64
    payload["meta"] = json.dumps(meta)
    torch.save(payload, path)
    resign(path)  # signed as made: the version check, not the signature, refuses it
    with pytest.raises(BundleError, match="another preprocessing algorithm"):
        Predictor.from_bundle(path, trusted=TRUSTED)
