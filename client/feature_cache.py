"""Per-hospital cache of model inputs: frozen EfficientNet features are computed once per image.

For the "effnet_head" and "effnet_finetune" kinds, the frozen stage (`build_feature_extractor`) is by
far the most expensive part and never changes, so its output is stored on the node's disk, one float16
`.npy` per image, under `root/<stage>/<key>.npy`: the stage directory is named by a digest of the
extractor fingerprint (weights digest, layer, normalisation) and image size, the key is the sha256 of
the preprocessed image's bytes. File names carry no patient information. Writes are atomic. For "cnn"
the inputs are the resized images: nothing is cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from common.models import ModelConfig, build_feature_extractor, compute_inputs
from common.models.feature_extractor import FrozenFeatureExtractor

log = logging.getLogger(__name__)


def image_key(image: np.ndarray) -> str:
    array = np.ascontiguousarray(image, dtype=np.float32)
    digest = hashlib.sha256(str(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


class FeatureCache:
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)
        self._extractors: dict[str, FrozenFeatureExtractor] = {}

    def _extractor(self, config: ModelConfig) -> FrozenFeatureExtractor:
        layer = config.extractor_layer
        if layer not in self._extractors:
            self._extractors[layer] = build_feature_extractor(config)
        return self._extractors[layer]

    def stage_dir(self, config: ModelConfig) -> Path:
        stage = f"{self._extractor(config).fingerprint}:size{config.image_size}"
        return self.root / hashlib.sha256(stage.encode()).hexdigest()[:24]

    def inputs(self, images: Sequence[np.ndarray], config: ModelConfig, *,
               device: torch.device | str = "cpu", batch_size: int = 8) -> torch.Tensor:
        """Model inputs for `images` (preprocessed, (S, S) in [0, 1]), in order; float16 for the effnet
        kinds (computed for missing images only), float32 images for "cnn"."""
        if config.extractor_layer is None:
            return compute_inputs(images, config)
        extractor = self._extractor(config).to(device)
        folder = self.stage_dir(config)
        paths = [folder / f"{image_key(image)}.npy" for image in images]
        missing = [i for i, path in enumerate(paths) if not path.is_file()]
        if missing:
            log.info("computing frozen features for %d of %d images", len(missing), len(images))
            folder.mkdir(parents=True, exist_ok=True)
            for start in range(0, len(missing), batch_size):
                chunk = missing[start:start + batch_size]
                features = compute_inputs([images[i] for i in chunk], config, extractor,
                                          batch_size=batch_size, dtype=torch.float16)
                for i, feature in zip(chunk, features):
                    _atomic_save(paths[i], feature.numpy())
        if not paths:
            return torch.empty(0, dtype=torch.float16)
        return torch.from_numpy(np.stack([np.load(path) for path in paths]))


def _atomic_save(path: Path, array: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".", suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
