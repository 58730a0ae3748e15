"""The report's gallery: test predictions of the released model with heatmap overlays (public data only).

Only simulations make one: the held-out test images are public mini-MIAS images on the coordinator's side. A
hospital's images never appear in a coordinator's report (federated explanations return counts only).

Contract read by the report (``server.report``): ``<run dir>/gallery/gallery.json`` is a list of
``{"file", "label", "p_malignant", "decision", "method"}`` (``file`` relative to ``gallery/``), one PNG per entry.
The images shown: up to ``per_class`` of each true class, the highest P(malignant) first, so the strongest
calls and the misses of each class are both visible.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from common.inference import Predictor
from common.records import CLASS_NAMES
from common.run_config import RunConfig

log = logging.getLogger(__name__)

GALLERY_DIR = "gallery"
GALLERY_FILE = "gallery.json"


def write_gallery(run_dir: Path, run: RunConfig, bundle: Path, *, per_class: int = 2,
                  method: str = "cell_scores") -> Path:
    """Explain `per_class` held-out test images of each class with the bundle's model (verified against the run's
    signing keys, ``server.signing_keys.run_trusted_keys``); returns the JSON path."""
    from client.hospital_data import PreparedImage, preprocess_records, simulation_test_records
    from client.preprocess_cache import PreprocessCache
    from common.explanations import explain, explainable
    from common.overlay import overlay_png

    from server.signing_keys import run_trusted_keys

    predictor = Predictor.from_bundle(bundle, trusted=run_trusted_keys(run, Path(run_dir)))
    cache = PreprocessCache(Path(run.sim_state_dir) / "coordinator" / "cache" / "preprocessed")
    prepared, _ = preprocess_records(simulation_test_records(run), cache=cache,
                                     config=predictor.meta.preprocess_config)
    predictions = predictor.predict([p.preprocessed for p in prepared])
    chosen: list[tuple[PreparedImage, object]] = []
    for label in CLASS_NAMES:
        pairs = [(p, q) for p, q in zip(prepared, predictions) if p.record.label == label]
        pairs.sort(key=lambda pair: -float(pair[1].probabilities[CLASS_NAMES.index("malignant")]))
        chosen.extend(pairs[:per_class])
    model = explainable(predictor.model)
    out = Path(run_dir) / GALLERY_DIR
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for item, prediction in chosen:
        image = torch.from_numpy(item.preprocessed.image)[None, None]
        target = CLASS_NAMES.index("malignant")
        heatmap = explain(method, model, image, target=target)[0].detach().cpu().numpy()
        circles = [item.preprocessed.geometry.map_circle(c) for c in item.record.lesions]
        name = f"{item.record.path.stem}-{method}.png"
        p_malignant = float(prediction.probabilities[target])
        title = (f"{item.record.path.stem}: {item.record.label}; P(malignant) {p_malignant:.2f}, "
                 f"decision {prediction.decision_name}")
        (out / name).write_bytes(overlay_png(item.preprocessed.image, heatmap, circles=circles, title=title))
        entries.append({"file": name, "label": item.record.label, "p_malignant": p_malignant,
                        "decision": prediction.decision_name, "method": method})
    path = out / GALLERY_FILE
    path.write_text(json.dumps(entries, indent=2) + "\n")
    log.info("gallery: %d held-out test images explained with %s in %s", len(entries), method, out)
    return path
