"""Explain the global model on the hospital's own validation images; only aggregate localisation numbers leave.

For each validation image whose annotation marks a lesion (benign or malignant, mini-MIAS circles or ROI masks),
every requested method (``common.explanations``) explains the image's true class; the heatmap is scored against
the lesion (pointing game, attribution mass inside the lesion, both within the breast) and drawn over the image
into ``<state dir>/explanations/<run>/`` with a ``results.json``: all of this stays at the hospital. The reply
carries counts and sums only (``common.wire``): images explained, pointing-game hits and the sum of mass
shares per method, and the sum of the random-map baseline (the lesion's share of the breast area).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from common import private_counts
from common.models import InferenceModel, LabelledImage, build_model
from common.records import CLASS_NAMES
from common.run_config import NodeConfig, RunConfig
from common.weights import load_weights

log = logging.getLogger(__name__)

_NORMAL = CLASS_NAMES.index("normal")


@dataclass
class LocalisationTally:
    """Counts and sums over explained images (what a hospital reports)."""

    methods: tuple[str, ...]
    images: int = 0
    baseline_sum: float = 0.0
    hits: dict[str, int] = field(default_factory=dict)
    mass_sum: dict[str, float] = field(default_factory=dict)

    def add(self, method: str, *, hit: bool, mass: float) -> None:
        self.hits[method] = self.hits.get(method, 0) + int(hit)
        self.mass_sum[method] = self.mass_sum.get(method, 0.0) + float(mass)


def explainable_images(images: tuple[LabelledImage, ...] | list[LabelledImage]) -> list[LabelledImage]:
    """Validation images that can be scored: abnormal, with lesion pixels inside the breast."""
    out = []
    for item in images:
        if item.label == _NORMAL or item.lesion_mask is None:
            continue
        breast = item.breast_mask if item.breast_mask is not None else np.ones_like(item.lesion_mask)
        if (item.lesion_mask & breast).any():
            out.append(item)
    return out


def explain_images(inference_model: InferenceModel, images: list[LabelledImage], methods: tuple[str, ...], *,
                   out_dir: Path | None = None) -> LocalisationTally:
    """Explain and score `images` (see :func:`explainable_images`); with `out_dir`, heatmap overlays and
    per-image results are written there (at the hospital)."""
    from common.explanations import explain, explainable, mass_inside, pointing_game, random_baseline
    from common.overlay import overlay_png

    tally = LocalisationTally(methods=methods)
    inference_model = explainable(inference_model)
    results = []
    device = next(inference_model.parameters()).device
    for index, item in enumerate(images):
        batch = torch.from_numpy(np.asarray(item.image, dtype=np.float32))[None, None].to(device)
        tally.images += 1
        tally.baseline_sum += random_baseline(item.lesion_mask, item.breast_mask)
        row = {"image": index, "label": CLASS_NAMES[item.label]}
        for method in methods:
            heatmap = explain(method, inference_model, batch, target=item.label)[0].detach().cpu().numpy()
            hit = bool(pointing_game(heatmap, item.lesion_mask, item.breast_mask))
            mass = float(mass_inside(heatmap, item.lesion_mask, item.breast_mask))
            tally.add(method, hit=hit, mass=mass)
            row[method] = {"pointing_hit": hit, "mass_inside": mass}
            if out_dir is not None:
                _write(out_dir / f"image-{index:04d}-{method}.png",
                       overlay_png(item.image, heatmap, title=f"{method}: {CLASS_NAMES[item.label]}"))
        results.append(row)
    if out_dir is not None:
        _write(out_dir / "results.json", json.dumps({"methods": list(methods), "images": results}, indent=2).encode())
    return tally


def explain_round(*, run: RunConfig, node: NodeConfig, global_weights: dict[str, np.ndarray],
                  methods: tuple[str, ...], run_id: str) -> LocalisationTally:
    """The global model explained on this node's validation split (see the module doc)."""
    from client.node import hospital_data

    data = hospital_data(node, run)
    images = explainable_images(data.val_images)
    model = build_model(run.model_config())
    load_weights(model, global_weights, source="global model to explain")
    inference_model = InferenceModel(run.model_config(), model.eval()).eval()
    out_dir = node.state_dir / "explanations" / f"run-{run_id}"
    tally = explain_images(inference_model, images, methods, out_dir=out_dir)
    log.info("explained %d validation images with lesions (%s); heatmaps kept in %s", tally.images,
             ", ".join(methods), out_dir)
    return tally


def noised_tally(tally: LocalisationTally, *, noise_multiplier: float,
                 rng: np.random.Generator) -> tuple[LocalisationTally, float]:
    """The tally with Gaussian noise on every number, and the noise's standard deviation.

    One image adds 1 to `images`, at most 1 to the baseline sum and, per method, to `hits` and the mass sum:
    L2 sensitivity sqrt(2 + 2 x methods). Counts are rounded (may be negative: the coordinator pools, then
    clips); sums stay real.
    """
    std = private_counts.noise_std(noise_multiplier, 2 + 2 * len(tally.methods))
    noised = LocalisationTally(methods=tally.methods)
    noised.images = int(private_counts.release_counts(np.array(tally.images), std=std, rng=rng))
    noised.baseline_sum = float(tally.baseline_sum + rng.normal(0.0, std))
    for method in tally.methods:
        noised.hits[method] = int(private_counts.release_counts(np.array(tally.hits.get(method, 0)), std=std,
                                                                rng=rng))
        noised.mass_sum[method] = float(tally.mass_sum.get(method, 0.0) + rng.normal(0.0, std))
    return noised, std


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
