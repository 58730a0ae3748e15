"""Operating point from score histograms: every number equals the one computed from the raw probabilities."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, roc_auc_score

from common.operating_point import (
    BINS,
    EDGES,
    LOGIT_RANGE,
    ScoreHistogram,
    auc,
    bootstrap_interval,
    calibration,
    choose_operating_point,
    confusion_at,
    counts_at,
    group_edges,
    decide,
    precision_recall_curve,
    roc_curve,
    score_bin,
)


def _scores(seed: int = 0, n: int = 400):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    probs = rng.dirichlet([1.0, 1.0, 1.0], n)
    probs[labels == 2, 2] += 0.4
    probs /= probs.sum(axis=1, keepdims=True)
    probs[:40, 2] = EDGES[rng.integers(1, BINS, 40)]  # scores exactly on bin edges
    probs[40:80, 2] = probs[80:120, 2]  # and ties
    return labels, probs


def test_bins_are_equal_in_logit_half_open_and_the_last_includes_one():
    assert len(EDGES) == BINS + 1 and EDGES[0] == 0.0 and EDGES[-1] == 1.0
    logits = np.log(EDGES[1:-1] / (1 - EDGES[1:-1]))
    assert np.allclose(np.diff(logits), 2 * LOGIT_RANGE / (BINS - 2)) and logits[0] == pytest.approx(-LOGIT_RANGE)
    assert score_bin([0.0, EDGES[1] * 0.99, EDGES[1], 0.5, EDGES[-2], 1.0]).tolist() == [0, 0, 1, 50, 99, 99]
    with pytest.raises(ValueError, match="NaN"):
        score_bin([np.nan])


def test_scores_close_to_zero_still_get_distinct_thresholds():
    labels = np.array([2, 2, 2, 0, 0, 0])
    p_malignant = np.array([0.004, 0.006, 0.009, 0.001, 0.002, 0.003])
    probs = np.stack([1 - p_malignant, np.zeros(6), p_malignant], axis=1)
    point = choose_operating_point(ScoreHistogram.of(labels, probs), rule="youden")
    assert (point.sensitivity, point.specificity) == (1.0, 1.0) and 0.003 < point.threshold <= 0.004


def test_decisions_and_confusion_match_the_raw_scores_at_every_threshold():
    labels, probs = _scores()
    histogram = ScoreHistogram.of(labels, probs)
    assert histogram.total == len(labels)
    for threshold in EDGES:
        decided = decide(probs, threshold)
        assert ((decided == 2) == (probs[:, 2] >= threshold - 1e-12)).all()
        assert confusion_at(histogram, threshold) == confusion_matrix(labels, decided, labels=[0, 1, 2]).tolist()
        counts = counts_at(histogram, threshold)
        assert counts.tp == int(((decided == 2) & (labels == 2)).sum())
        assert counts.fp == int(((decided == 2) & (labels != 2)).sum())


def test_below_the_threshold_the_more_probable_of_normal_and_benign_is_decided():
    probs = np.array([[0.5, 0.2, 0.3], [0.2, 0.5, 0.3], [0.35, 0.35, 0.3], [0.1, 0.1, 0.8]])
    assert decide(probs, 0.5).tolist() == [0, 1, 0, 2]
    assert decide(probs, 0.3).tolist() == [2, 2, 2, 2]


def test_auc_equals_sklearn_when_scores_sit_in_distinct_bins():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 3, 60)
    p_malignant = ((EDGES[:-1] + EDGES[1:]) / 2)[rng.permutation(BINS)[:60]]  # one image per bin: no ties in a bin
    probs = np.stack([(1 - p_malignant) / 2, (1 - p_malignant) / 2, p_malignant], axis=1)
    histogram = ScoreHistogram.of(labels, probs)
    assert auc(histogram) == pytest.approx(roc_auc_score(labels == 2, p_malignant), abs=1e-12)
    fpr, tpr = roc_curve(histogram)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)


def test_sensitivity_rule_takes_the_highest_threshold_reaching_the_target():
    labels, probs = _scores(1)
    histogram = ScoreHistogram.of(labels, probs)
    point = choose_operating_point(histogram, rule="sensitivity", target=0.9, source="test")
    sensitivity = lambda t: ((probs[:, 2] >= t - 1e-12) & (labels == 2)).sum() / (labels == 2).sum()  # noqa: E731
    next_edge = EDGES[np.searchsorted(EDGES, point.threshold) + 1]
    assert sensitivity(point.threshold) >= 0.9 > sensitivity(next_edge)
    assert point.sensitivity == pytest.approx(sensitivity(point.threshold))
    assert (point.rule, point.target, point.source) == ("sensitivity", 0.9, "test")


def test_youden_rule_maximises_sensitivity_plus_specificity():
    labels, probs = _scores(2)
    histogram = ScoreHistogram.of(labels, probs)
    point = choose_operating_point(histogram, rule="youden")
    j = [(c.sensitivity + c.specificity - 1) for c in (counts_at(histogram, t) for t in EDGES)]
    assert point.sensitivity + point.specificity - 1 == pytest.approx(max(j))
    assert point.target is None


def test_choice_needs_both_classes_and_a_known_rule():
    only_normal = ScoreHistogram.of([0, 0], [[0.9, 0.05, 0.05], [0.8, 0.1, 0.1]])
    with pytest.raises(ValueError, match="malignant and non-malignant"):
        choose_operating_point(only_normal)
    with pytest.raises(ValueError, match="rule"):
        choose_operating_point(ScoreHistogram.of(*_scores()), rule="argmax")


def test_histograms_add_up_and_round_trip():
    labels, probs = _scores()
    whole = ScoreHistogram.of(labels, probs)
    halves = ScoreHistogram.of(labels[:150], probs[:150]) + ScoreHistogram.of(labels[150:], probs[150:])
    assert (whole.counts == halves.counts).all()
    assert (ScoreHistogram.from_flat(whole.flat()).counts == whole.counts).all()
    assert (ScoreHistogram.from_json(whole.to_json()).counts == whole.counts).all()
    for bad in ([1.5] * 600, [1] * 599, [float("nan")] * 600):
        with pytest.raises(ValueError):
            ScoreHistogram.from_flat(bad)
    with pytest.raises(ValueError, match=">= 0"):
        ScoreHistogram(-whole.counts)


def test_precision_recall_calibration_and_bootstrap():
    labels, probs = _scores()
    histogram = ScoreHistogram.of(labels, probs)
    recall, precision = precision_recall_curve(histogram)
    assert recall[-1] == 1.0 and precision[-1] == pytest.approx((labels == 2).mean())
    predicted, observed, sizes = calibration(histogram, groups=10)
    assert sizes.sum() == len(labels)
    first = probs[:, 2] < group_edges(10)[1]
    assert observed[0] == pytest.approx((labels[first] == 2).mean())
    low, high = bootstrap_interval(histogram, auc, resamples=200, seed=1)
    assert low < auc(histogram) < high
    assert bootstrap_interval(ScoreHistogram.empty(), auc) is None
