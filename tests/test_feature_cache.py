"""The per-hospital cache of frozen features: computed once, reused after a restart, keyed by content."""

from __future__ import annotations

import numpy as np
import torch

from client.feature_cache import FeatureCache
from common.models import ModelConfig, build_feature_extractor

CONFIG = ModelConfig(kind="effnet_head", image_size=64, feature_layer="head")


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((64, 64), dtype=np.float32) for _ in range(n)]


def test_features_computed_once_and_reused(tmp_path):
    torch.set_num_threads(1)
    images = _images(3)
    first = FeatureCache(tmp_path).inputs(images, CONFIG)
    assert first.shape == (3, 1280, 2, 2) and first.dtype == torch.float16
    with torch.no_grad():
        direct = build_feature_extractor(CONFIG)(torch.from_numpy(np.stack(images)))
    torch.testing.assert_close(first.float(), direct, rtol=2e-3, atol=2e-3)

    files = sorted(tmp_path.rglob("*.npy"))
    assert len(files) == 3 and all(len(f.stem) == 64 for f in files)  # sha256 names, nothing else
    stamps = [f.stat().st_mtime_ns for f in files]
    again = FeatureCache(tmp_path).inputs([images[2], images[0]], CONFIG)  # a restarted node
    assert torch.equal(again, first[[2, 0]])
    assert [f.stat().st_mtime_ns for f in sorted(tmp_path.rglob("*.npy"))] == stamps


def test_other_stage_other_folder_and_cnn_not_cached(tmp_path):
    cache = FeatureCache(tmp_path)
    images = _images(1)
    cache.inputs(images, CONFIG)
    tail = ModelConfig(kind="effnet_finetune", image_size=64, finetune_from=15)
    assert cache.inputs(images, tail).shape == (1, 192, 2, 2)
    assert cache.stage_dir(CONFIG) != cache.stage_dir(tail)
    assert len(list(tmp_path.rglob("*.npy"))) == 2
    same_layer = ModelConfig(kind="effnet_head", image_size=64, feature_layer="block14")
    assert cache.stage_dir(same_layer) == cache.stage_dir(tail)  # one frozen stage, one cache
    assert torch.equal(cache.inputs(images, same_layer), cache.inputs(images, tail))
    cnn = cache.inputs(images, ModelConfig(kind="cnn", image_size=32))
    assert cnn.shape == (1, 1, 32, 32) and len(list(tmp_path.rglob("*.npy"))) == 2
