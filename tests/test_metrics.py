"""classification_metrics against scikit-learn on fixed arrays, and its undefined cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from common.metrics import classification_metrics, scalar_metrics
from common.records import CLASS_NAMES

Y = np.array([0, 0, 0, 1, 1, 2, 2, 2, 0, 1])
P = np.array([
    [0.7, 0.2, 0.1], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5],
    [0.1, 0.2, 0.7], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1], [0.5, 0.4, 0.1],
])


def test_matches_sklearn():
    m = classification_metrics(Y, P)
    pred = P.argmax(1)
    abnormal = Y > 0
    assert m["auc_malignant"] == pytest.approx(roc_auc_score(Y == 2, P[:, 2]))
    assert m["auc_benign_vs_malignant"] == pytest.approx(
        roc_auc_score(Y[abnormal] == 2, P[abnormal, 2] / (P[abnormal, 1] + P[abnormal, 2])))
    assert m["accuracy"] == pytest.approx(accuracy_score(Y, pred))
    assert m["precision"] == pytest.approx(precision_score(Y == 2, pred == 2))
    assert m["recall"] == pytest.approx(recall_score(Y == 2, pred == 2))
    assert m["specificity"] == pytest.approx(recall_score(Y != 2, pred != 2))
    assert m["f1_macro"] == pytest.approx(f1_score(Y, pred, average="macro"))
    assert m["confusion_matrix"] == confusion_matrix(Y, pred, labels=[0, 1, 2]).tolist()
    assert m["class_order"] == list(CLASS_NAMES) and m["n"] == 10


def test_exact_values_on_fixed_arrays():
    m = classification_metrics(Y, P)
    # predictions: 0 0 2 1 2 2 0 2 0 0 -> malignant predicted 4x, 2 of them right
    assert m["confusion_matrix"] == [[3, 0, 1], [1, 1, 1], [1, 0, 2]]
    assert (m["precision"], m["recall"], m["accuracy"]) == (0.5, 2 / 3, 0.6)
    assert m["specificity"] == 5 / 7


def test_undefined_metrics_are_none():
    only_normal = classification_metrics([0, 0, 0], [[0.9, 0.05, 0.05]] * 3)
    assert only_normal["auc_malignant"] is None
    assert only_normal["auc_benign_vs_malignant"] is None
    assert only_normal["precision"] is None and only_normal["recall"] is None
    assert only_normal["specificity"] == 1.0 and only_normal["accuracy"] == 1.0
    no_benign = classification_metrics([0, 2, 2], [[0.8, 0.1, 0.1], [0.1, 0.1, 0.8], [0.2, 0.1, 0.7]])
    assert no_benign["auc_benign_vs_malignant"] is None and no_benign["auc_malignant"] == 1.0
    empty = classification_metrics([], np.zeros((0, 3)))
    assert empty["accuracy"] is None and empty["f1_macro"] is None and empty["n"] == 0


def test_scalar_metrics_drop_none_and_flatten_counts():
    flat = scalar_metrics(classification_metrics([0, 0], [[0.9, 0.05, 0.05], [0.2, 0.1, 0.7]]))
    assert "auc_malignant" not in flat and "class_order" not in flat
    assert flat["cm_normal_malignant"] == 1.0 and flat["cm_normal_normal"] == 1.0
    assert all(isinstance(v, float) for v in flat.values())


def test_bad_input_refused():
    with pytest.raises(ValueError):
        classification_metrics([0, 3], [[1, 0, 0], [1, 0, 0]])
    with pytest.raises(ValueError):
        classification_metrics([0], [[np.nan, 0, 0]])
