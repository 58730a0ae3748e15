"""Test support: a small, complete run directory written by hand, following the run-directory contract.

Scores are drawn from a seeded generator; the score histogram, operating point and the numbers at it are made
with ``common.operating_point`` exactly as a run makes them, so a report can be checked against them. Strings
that end up in the page can be made hostile (markup in hospital names, notes, error, gallery labels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from common import operating_point as op
from common.metrics import classification_metrics
from common.records import CLASS_NAMES, ImageRecord
from simulations.partition_plot import plot_partitions

HOSTILE = '<script>alert("x")</script><img src=x onerror=alert(1)>&amp;'
LABELS = np.repeat([0, 1, 2], [60, 25, 15])  # 100 test images


@dataclass(frozen=True)
class SampleRun:
    path: Path
    labels: np.ndarray
    probs: np.ndarray
    histogram: op.ScoreHistogram
    point: op.OperatingPoint
    at_point: dict
    document: dict


def scores(seed: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """(labels, class probabilities) with some signal: malignant images score higher on average."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(len(LABELS), 3))
    logits[np.arange(len(LABELS)), LABELS] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return LABELS.copy(), probs


def at_operating_point(labels: np.ndarray, probs: np.ndarray, threshold: float) -> dict:
    """What a run records as ``final["at_operating_point"]``: decisions at the threshold, scored."""
    decisions = op.decide(probs, threshold)
    matrix = np.zeros((3, 3), dtype=np.int64)
    np.add.at(matrix, (labels, decisions), 1)
    counts = op.counts_at(op.ScoreHistogram.of(labels, probs), threshold)
    return {"threshold": threshold, "confusion_matrix": matrix.tolist(), "sensitivity": counts.sensitivity,
            "specificity": counts.specificity, "precision": counts.precision,
            "accuracy": float(np.trace(matrix) / matrix.sum())}


def write_sample_run(path: Path, *, hostile: bool = False, with_operating_point: bool = True,
                     with_gallery: bool = True, with_partitions: bool = True) -> SampleRun:
    """A completed three-hospital, three-round federated run in `path` (see the module doc)."""
    path.mkdir(parents=True, exist_ok=True)
    labels, probs = scores()
    histogram = op.ScoreHistogram.of(labels, probs)
    point = op.choose_operating_point(histogram, rule="sensitivity", target=0.8,
                                      source="federated validation (3 hospitals, 100 images)")
    at_point = at_operating_point(labels, probs, point.threshold)
    hospitals = [f"partition-{k}" for k in range(3)]
    note_hospital = HOSTILE if hostile else "partition-2"
    rounds = []
    for r in (1, 2, 3):
        train_notes = [f"{note_hospital}: refused: budget {HOSTILE if hostile else 'exhausted'}"] if r == 3 else []
        rounds.append({
            "round": r, "train_loss": 1.2 - 0.1 * r, "epsilon_max": 1.5 * r,
            "replies": {"train": {"round": r, "sampled": 3, "valid": 3 - (r == 3), "refused": int(r == 3),
                                  "rejected": 0, "failed": 0, "missing": 0, "notes": train_notes},
                        "evaluate": {"round": r, "sampled": 3, "valid": 3, "refused": 0, "rejected": 0,
                                     "failed": 0, "missing": 0, "notes": []}},
            "federated_eval": {"num_examples": 90, "eval_loss": 1.0 - 0.05 * r, "auc_malignant": 0.55 + 0.03 * r},
            "centralised_eval": {"num_examples": 100, "eval_loss": 1.05 - 0.05 * r,
                                 "auc_malignant": 0.5 + 0.05 * r},
        })
    argmax = classification_metrics(labels, probs)
    final = {"source": "centralised-test", "round": 3, "class_names": list(CLASS_NAMES), "num_examples": 100,
             "eval_loss": 0.9, **{k: argmax[k] for k in ("auc_malignant", "auc_benign_vs_malignant", "accuracy",
                                                           "precision", "recall", "specificity", "f1_macro")},
             "confusion_matrix": argmax["confusion_matrix"].tolist()
             if hasattr(argmax["confusion_matrix"], "tolist") else argmax["confusion_matrix"],
             "score_histogram": histogram.to_json()}
    if with_operating_point:
        final.update(operating_point=point.to_json(), at_operating_point=at_point)
    privacy = {name: {"epsilon": 4.5 + k, "epsilon_own_noise": 9.25 + k, "delta": 1e-5, "noise_multiplier": 1.1,
                      "max_grad_norm": 1.0, "steps": 30, "accountant": "rdp", "dp": True, "last_round": 3}
               for k, name in enumerate(hospitals)}
    privacy["partition-2"]["refusals"] = 1
    if hostile:
        privacy[HOSTILE] = dict(privacy.pop("partition-2"))
    document = {
        "format": "mammofl-run/1", "status": "failed" if hostile else "completed",
        "error": f"RuntimeError: {HOSTILE}" if hostile else None, "rounds": rounds, "final": final,
        "privacy": privacy,
        "config": {"num-server-rounds": 3, "strategy": "fedavg", "model": "effnet_head", "image-size": 512,
                   "dp": True, "noise-multiplier": 1.75, "max-grad-norm": 1.0, "delta": 1e-5, "accountant": "rdp",
                   "dp-mode": "distributed", "sim-partition": "iid", "sim-test-fraction": 0.2},
        "versions": {"python": "3.11.7", "torch": "2.14.1", "flwr": "1.42.0", "opacus": "1.6.0",
                     "mammo-fl": "0.1.0"},
        "resumed": [], "simulation": {"preset": "demo", "num-hospitals": 3, "mode": "federated"},
        "explanations": {"methods": ["cell_scores", "grad_cam"], "images": 8, "asked": 3, "notes": [],
                         "hospitals": {"partition-0": {"images": 3}, "partition-1": {"images": 5},
                                       (HOSTILE if hostile else "partition-2"): {"error": "NodeFailure: x"}},
                         "per_method": {"cell_scores": {"pointing_game": 0.625, "mass_inside": 0.3125,
                                                        "random_baseline": 0.0425},
                                        "grad_cam": {"pointing_game": 0.375, "mass_inside": 0.25,
                                                    "random_baseline": 0.0425}}},
    }
    (path / "metrics.json").write_text(json.dumps(document, indent=2))
    counts = [{"normal": 20, "benign": 8, "malignant": 5}, {"normal": 21, "benign": 7, "malignant": 5},
              {"normal": 19, "benign": 9, "malignant": 6}]
    simulation = {"preset": "demo", "num-hospitals": 3, "mode": "federated", "data-dir": "/data/mini-mias",
                  "partitions": {
                      "hospitals": [{"partition": k, "n_images": sum(c.values()), "n_patients": sum(c.values()) // 2,
                                     "class_counts": c} for k, c in enumerate(counts)],
                      "test": {"partition": 0, "n_images": 100, "n_patients": 50,
                               "class_counts": {"normal": 60, "benign": 25, "malignant": 15}}}}
    (path / "simulation.json").write_text(json.dumps(simulation, indent=2))
    if with_partitions:
        records = [[ImageRecord(path=Path(f"/nowhere/{k}-{i}.png"), label=CLASS_NAMES[i % 3], patient_id=f"{k}-{i}",
                                background_tissue="FGD"[i % 3]) for i in range(6 + k)] for k in range(3)]
        plot_partitions(records, path / "partitions.png", title="3 hospitals")
    if with_gallery:
        write_gallery(path, [("normal", 0.05, "normal"), ("malignant", 0.81, "malignant"),
                             ("benign", 0.4, HOSTILE if hostile else "malignant")])
    return SampleRun(path, labels, probs, histogram, point, at_point, document)


def write_gallery(run_dir: Path, entries: list[tuple[str, float, str]], *, extra: list | None = None) -> list[dict]:
    """``gallery/`` with one coloured 64x48 PNG per entry (label, P(malignant), decision) and its index."""
    folder = run_dir / "gallery"
    folder.mkdir(exist_ok=True)
    index = []
    for k, (label, p, decision) in enumerate(entries):
        name = f"test-{k:02d}.png"
        pixels = np.zeros((48, 64, 3), dtype=np.uint8)
        pixels[..., 0] = np.linspace(0, 255, 64, dtype=np.uint8)[None, :]
        pixels[..., 1] = 40 * k
        Image.fromarray(pixels).save(folder / name)
        index.append({"file": name, "label": label, "p_malignant": p, "decision": decision})
    (folder / "gallery.json").write_text(json.dumps(index + list(extra or []), indent=2))
    return index
