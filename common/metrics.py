"""Classification metrics for the three classes of `CLASS_NAMES` (normal, benign, malignant).

`classification_metrics(y_true, probs)` returns (class index order = `CLASS_NAMES`):

- `auc_malignant`: ROC AUC of malignant vs the rest, scored by P(malignant).
- `auc_benign_vs_malignant`: ROC AUC among abnormal images only (benign or malignant), scored by
  P(malignant) / (P(benign) + P(malignant)).
- `accuracy`: three-class accuracy of the arg-max prediction.
- `precision`, `recall`, `specificity`: binary, malignant as the positive class, arg-max prediction.
- `f1_macro`: unweighted mean of the per-class F1 over the classes present in the labels or the
  predictions (scikit-learn's `average="macro"`).
- `confusion_matrix`: rows = true class, columns = predicted class, in `class_order`.
- `class_order`, `n`: the class names and the number of examples.

A metric that is undefined for the given data (an AUC with one class absent, precision with no malignant
prediction, ...) is None, never NaN and never an exception.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, roc_auc_score

from common.records import CLASS_NAMES

MALIGNANT = CLASS_NAMES.index("malignant")
BENIGN = CLASS_NAMES.index("benign")


def _auc(positive: np.ndarray, score: np.ndarray) -> float | None:
    if positive.size == 0 or positive.all() or not positive.any():
        return None
    return float(roc_auc_score(positive, score))


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den


def classification_metrics(y_true: Sequence[int] | np.ndarray,
                           probs: Sequence[Sequence[float]] | np.ndarray) -> dict[str, Any]:
    """Metrics of class probabilities `probs` (N, 3) against integer labels `y_true` (N,)."""
    y = np.asarray(y_true, dtype=np.int64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(len(y), len(CLASS_NAMES))
    if len(y) and (y.min() < 0 or y.max() >= len(CLASS_NAMES)):
        raise ValueError(f"labels must be in 0..{len(CLASS_NAMES) - 1}")
    if not np.isfinite(p).all():
        raise ValueError("probabilities contain NaN or Inf")
    pred = p.argmax(axis=1)
    labels = list(range(len(CLASS_NAMES)))
    cm = confusion_matrix(y, pred, labels=labels) if len(y) else np.zeros((3, 3), dtype=np.int64)

    abnormal = y != CLASS_NAMES.index("normal")
    abnormal_mass = p[abnormal, BENIGN] + p[abnormal, MALIGNANT]
    relative_malignant = np.divide(p[abnormal, MALIGNANT], abnormal_mass,
                                   out=np.full(abnormal_mass.shape, 0.5), where=abnormal_mass > 0)

    true_pos = int(np.sum((y == MALIGNANT) & (pred == MALIGNANT)))
    pred_pos = int(np.sum(pred == MALIGNANT))
    actual_pos = int(np.sum(y == MALIGNANT))
    actual_neg = len(y) - actual_pos
    true_neg = int(np.sum((y != MALIGNANT) & (pred != MALIGNANT)))
    return {
        "auc_malignant": _auc(y == MALIGNANT, p[:, MALIGNANT]),
        "auc_benign_vs_malignant": _auc(y[abnormal] == MALIGNANT, relative_malignant),
        "accuracy": _ratio(int(np.sum(pred == y)), len(y)),
        "precision": _ratio(true_pos, pred_pos),
        "recall": _ratio(true_pos, actual_pos),
        "specificity": _ratio(true_neg, actual_neg),
        "f1_macro": float(f1_score(y, pred, average="macro", zero_division=0)) if len(y) else None,
        "confusion_matrix": cm.astype(int).tolist(),
        "class_order": list(CLASS_NAMES),
        "n": int(len(y)),
    }


def scalar_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Only the defined numbers, for wire formats that carry flat floats.

    None values are dropped; the confusion matrix becomes counts `cm_<true>_<predicted>` (class names),
    which a coordinator can sum across hospitals.
    """
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if key == "confusion_matrix":
            for i, row in enumerate(value):
                for j, count in enumerate(row):
                    flat[f"cm_{CLASS_NAMES[i]}_{CLASS_NAMES[j]}"] = float(count)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[key] = float(value)
    return flat
