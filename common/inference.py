"""One inference path: original image -> preprocessing -> frozen stage -> trained model -> class probabilities.

Screening, reports, explanations and the notebook all go through :class:`Predictor`, so a model is always used the
way it was trained (the bundle's preprocessing and model configs) and every map it makes can be drawn on the
original image:

1. ``common.preprocessing.preprocess`` (segment, crop, flip, resize, pad) with the bundle's ``PreprocessConfig``;
2. ``common.models.InferenceModel``: resize to the model's size, frozen feature stage (EfficientNet kinds), the
   trained cell classifier -> image logits (B, 3) and cell logits (B, 3, G, G);
3. softmax over classes -> image probabilities (3,) and cell probabilities (3, G, G);
4. maps back onto the original image (:func:`cell_map_to_frame`, then ``Geometry.unwarp``: unpad, resize,
   unflip, uncrop).

Decisions use the bundle's operating point (``common.operating_point.decide``); without one, arg-max.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.bundle import BundleMeta, load_bundle
from common.models import InferenceModel
from common.operating_point import OperatingPoint, decide
from common.preprocessing import Preprocessed, preprocess
from common.records import CLASS_NAMES
from common.signing import TrustedKeys


@dataclass(frozen=True, eq=False)
class Prediction:
    """One image's result: class probabilities (3,), cell probabilities (3, G, G) in the preprocessed frame, the
    decision at the operating point (a class index) and the preprocessing that produced the model's view."""

    probabilities: np.ndarray
    cell_probabilities: np.ndarray
    decision: int
    preprocessed: Preprocessed

    @property
    def decision_name(self) -> str:
        return CLASS_NAMES[self.decision]

    def cell_map(self, class_name: str = "malignant") -> np.ndarray:
        """(G, G) cell probabilities of one class."""
        return self.cell_probabilities[CLASS_NAMES.index(class_name)]

    def on_original(self, frame_map: np.ndarray) -> np.ndarray:
        """A map of the preprocessed frame (size x size, or a cell grid) drawn on the original image's pixels."""
        frame = np.asarray(frame_map, dtype=np.float32)
        size = self.preprocessed.geometry.size
        if frame.shape != (size, size):
            frame = cell_map_to_frame(frame, size)
        return self.preprocessed.geometry.unwarp(frame)


def cell_map_to_frame(cell_map: np.ndarray, size: int) -> np.ndarray:
    """(G, G) cell values -> (size, size): each cell covers its ``ceil(size / G)``-pixel square (nearest)."""
    cell_map = np.asarray(cell_map, dtype=np.float32)
    grid = cell_map.shape[0]
    if cell_map.shape != (grid, grid):
        raise ValueError(f"expected a square cell map, got {cell_map.shape}")
    stride = -(-size // grid)
    return np.kron(cell_map, np.ones((stride, stride), dtype=np.float32))[:size, :size]


class Predictor:
    """A trained model with its preprocessing and operating point; see the module doc."""

    def __init__(self, model: torch.nn.Module, meta: BundleMeta, *, device: torch.device | str = "cpu"):
        self.meta = meta
        self.device = torch.device(device)
        self.model = InferenceModel(meta.model_config, model.eval()).to(self.device).eval()
        self.operating_point: OperatingPoint | None = meta.operating_point

    @classmethod
    def from_bundle(cls, path: Path, *, trusted: TrustedKeys, device: torch.device | str = "cpu") -> Predictor:
        """Load a released bundle signed by one of the `trusted` keys (refused with ``common.bundle.BundleError``
        if unsigned, tampered, signed by another key, or unusable by this version)."""
        model, meta = load_bundle(path, trusted=trusted)
        return cls(model, meta, device=device)

    @property
    def threshold(self) -> float | None:
        return None if self.operating_point is None else self.operating_point.threshold

    def preprocess(self, pixels: np.ndarray, *, breast_side: str | None = None) -> Preprocessed:
        """Step 1 with the bundle's preprocessing config."""
        return preprocess(pixels, breast_side=breast_side, config=self.meta.preprocess_config)

    @torch.no_grad()
    def predict(self, images: Sequence[Preprocessed], *, batch_size: int = 8) -> list[Prediction]:
        """Steps 2-3 for preprocessed images, in order."""
        out: list[Prediction] = []
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            batch = torch.from_numpy(np.stack([p.image for p in chunk])).unsqueeze(1).to(self.device)
            logits, cells = self.model(batch, return_cells=True)
            probs = F.softmax(logits.float(), dim=1).cpu().numpy()
            cell_probs = F.softmax(cells.float(), dim=1).cpu().numpy()
            decisions = self.decide(probs)
            out.extend(Prediction(probabilities=probs[i], cell_probabilities=cell_probs[i],
                                  decision=int(decisions[i]), preprocessed=chunk[i]) for i in range(len(chunk)))
        return out

    def predict_pixels(self, pixels: np.ndarray, *, breast_side: str | None = None) -> Prediction:
        """Steps 1-3 for one original image."""
        return self.predict([self.preprocess(pixels, breast_side=breast_side)])[0]

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Decisions at the operating point (arg-max where the bundle has none)."""
        probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(CLASS_NAMES))
        if self.operating_point is None:
            return probs.argmax(axis=1)
        return decide(probs, self.operating_point.threshold)
