"""Membership-inference attacks (common.membership_inference) on constructed losses with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from common import membership_inference as mi


def test_perfectly_separable_losses_give_advantage_one_and_auc_one():
    result = mi.loss_threshold_attack([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    assert (result.advantage, result.auc, result.threshold, result.tpr, result.fpr) == (1.0, 1.0, -0.3, 1.0, 0.0)
    assert (result.members, result.non_members) == (3, 3)


def test_members_with_larger_losses_give_no_advantage():
    result = mi.loss_threshold_attack([5.0, 6.0], [1.0, 2.0])
    assert (result.advantage, result.auc, result.threshold) == (0.0, 0.0, math.inf)
    assert result.to_json()["threshold"] is None


def test_hand_computed_advantage_auc_and_ties():
    # thresholds 3, 2, 1, 0: TPR .5 .5 1 1, FPR 0 .5 .5 1 -> best .5, first reached at 3; 3 of 4 pairs ordered
    assert mi.best_advantage([3.0, 1.0], [2.0, 0.0]) == (0.5, 3.0, 0.5, 0.0)
    assert mi.attack_auc([3.0, 1.0], [2.0, 0.0]) == 0.75
    assert mi.attack_auc([1.0, 1.0], [1.0, 1.0]) == 0.5 and mi.best_advantage([1.0], [1.0])[0] == 0.0
    assert mi.attack_auc([2.0, 1.0], [1.0]) == 0.75  # one win, one tie


def test_auc_and_advantage_equal_sklearn_with_ties():
    rng = np.random.default_rng(3)
    members = np.round(rng.normal(0.3, 1.0, 157), 1)  # rounded: many ties
    non_members = np.round(rng.normal(0.0, 1.0, 211), 1)
    truth = np.r_[np.ones(len(members)), np.zeros(len(non_members))]
    scores = np.r_[members, non_members]
    assert mi.attack_auc(members, non_members) == pytest.approx(roc_auc_score(truth, scores), abs=1e-12)
    fpr, tpr, _ = roc_curve(truth, scores, drop_intermediate=False)
    assert mi.best_advantage(members, non_members)[0] == pytest.approx(float(np.max(tpr - fpr)), abs=1e-12)


def test_identical_distributions_stay_under_the_null_bound():
    rng = np.random.default_rng(0)
    n = 20_000
    bound = mi.null_advantage_bound(n, n, alpha=1e-3)
    assert bound == pytest.approx(2 * math.sqrt(math.log(4000) / (2 * n)))  # 0.0288
    losses = rng.exponential(1.0, (2, n))
    labels = rng.integers(0, 3, (2, n))
    loss = mi.loss_threshold_attack(losses[0], losses[1])
    ratio = mi.calibrated_likelihood_ratio_attack(losses[0], labels[0], losses[1], labels[1], seed=1)
    for result in (loss, ratio):
        assert 0.0 <= result.advantage < bound
        assert abs(result.auc - 0.5) < 0.01


def test_chance_advantage_matches_the_exact_kolmogorov_smirnov_null():
    # m = n: P(D+ >= k/n) = C(2n, n - k) / C(2n, n) (Gnedenko-Korolyuk); the 95% quantile is the least k/n whose
    # P(D+ > k/n) = P(D+ >= (k+1)/n) <= 5 %
    n = 20
    tail = [math.comb(2 * n, n - k) / math.comb(2 * n, n) for k in range(n + 1)] + [0.0]
    exact = min(k for k in range(n + 1) if tail[k + 1] <= 0.05) / n
    assert exact == 0.35
    assert mi.chance_advantage(n, n, draws=20_000, seed=0) == pytest.approx(exact, abs=1 / n + 1e-9)
    assert mi.chance_advantage(1, 1, quantile=0.95) == 1.0  # one member ranked first half of the time
    assert mi.chance_advantage(1, 1, quantile=0.25) == 0.0


def test_logit_confidence_of_a_loss():
    assert mi.logit_confidence([-math.log(0.8)])[0] == pytest.approx(math.log(4.0))
    assert mi.logit_confidence([-math.log(0.5)])[0] == pytest.approx(0.0, abs=1e-12)
    assert np.isfinite(mi.logit_confidence([0.0, 1e-20, 50.0])).all()
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    assert mi.cross_entropy_losses(probs, [0, 2]) == pytest.approx([-math.log(0.7), -math.log(0.8)])


def _losses_from_phi(phi: np.ndarray) -> np.ndarray:
    return np.log1p(np.exp(-phi))  # p = sigmoid(phi), loss = -log p


def test_calibration_finds_leakage_that_class_difficulty_hides_from_the_loss_threshold():
    # class 0 is easy (phi near 3), class 1 hard (phi near -2); within each class members sit 0.5 higher
    rng = np.random.default_rng(7)
    labels = np.repeat([0, 1], 200)
    centre = np.where(labels == 0, 3.0, -2.0)
    members = _losses_from_phi(centre + 0.5 + rng.normal(0, 0.1, 400))
    non_members = _losses_from_phi(centre + rng.normal(0, 0.1, 400))
    loss = mi.loss_threshold_attack(members, non_members)
    ratio = mi.calibrated_likelihood_ratio_attack(members, labels, non_members, labels, seed=0)
    assert ratio.advantage > 0.95 and ratio.auc > 0.99
    assert loss.advantage < 0.6


def test_audit_balances_counts_and_reports_both_attacks():
    rng = np.random.default_rng(1)
    audit = mi.audit(rng.exponential(0.5, 50), rng.integers(0, 3, 50), rng.exponential(1.0, 12),
                     rng.integers(0, 3, 12), seed=5)
    assert (audit.members, audit.non_members) == (12, 12)
    again = mi.audit(rng.exponential(0.5, 50), rng.integers(0, 3, 50), rng.exponential(1.0, 12),
                     rng.integers(0, 3, 12), seed=5)
    assert again.chance_advantage_95 == audit.chance_advantage_95  # depends on counts and seed only
    document = audit.to_json()
    assert document["attack_names"] == list(mi.ATTACKS)
    assert document["advantage"] == max(a["advantage"] for a in document["attacks"].values())
    assert document["auc"] == max(a["auc"] for a in document["attacks"].values())
    assert set(document) == {"advantage", "auc", "members", "non_members", "seed", "chance_advantage_95",
                             "attack_names", "attacks"}
    keep_m, keep_n = mi.balanced_subsample(50, 12, seed=5)
    assert len(keep_m) == len(set(keep_m)) == 12 and list(keep_n) == list(range(12))
    assert np.array_equal(keep_m, mi.balanced_subsample(50, 12, seed=5)[0])


def test_bad_inputs_are_refused_with_a_reason():
    with pytest.raises(ValueError, match="no member scores"):
        mi.loss_threshold_attack([], [1.0])
    with pytest.raises(ValueError, match="non-member scores must be finite"):
        mi.loss_threshold_attack([1.0], [math.nan])
    with pytest.raises(ValueError, match="3 member losses but 2 labels"):
        mi.calibrated_likelihood_ratio_attack([1, 2, 3], [0, 1], [1, 2], [0, 1], seed=0)
    with pytest.raises(ValueError, match="at least 2 members and 2 non-members"):
        mi.audit([1.0, 2.0], [0, 0], [1.0], [0], seed=0)


# ---------------------------------------------------------------- the release gate of a simulation
def _smoke_centralised(mias_dir, out, bound: float):
    import os
    import subprocess
    import sys

    env = {**os.environ, "COLUMNS": "200", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "simulations.cli", "run", "--preset", "smoke", "--mode",
                           "centralised", "--data-dir", str(mias_dir), "--out", str(out), "--no-live",
                           "--set", f"sim-max-attack-advantage={bound}"], capture_output=True, text=True, timeout=300,
                          env=env)


@pytest.mark.slow
@pytest.mark.parametrize("bound", [0.0001, 1.0])
def test_release_gate_withholds_a_model_whose_attack_advantage_exceeds_the_bound(mias_dir, tmp_path, bound):
    import json

    out = tmp_path / "run"
    done = _smoke_centralised(mias_dir, out, bound)
    section = json.loads((out / "metrics.json").read_text())["membership_inference"]
    assert (section["members"], section["non_members"]) == (8, 8)  # smoke: 8 held-out images, members subsampled
    assert section["attack_names"] == list(mi.ATTACKS)
    assert 0.0 < section["advantage"] <= 1.0 and 0.0 <= section["auc"] <= 1.0
    assert section["gate"]["max_attack_advantage"] == bound and section["gate"]["enabled"] is True
    assert "loss" not in json.dumps(section).replace("loss_threshold", "")  # aggregates only, no losses
    if bound < section["advantage"]:
        assert done.returncode == 1, done.stderr[-3000:]
        assert section["gate"]["passed"] is False and section["gate"]["model"] == "model.unreleased"
        assert not (out / "model.mammofl").exists() and (out / "model.unreleased").is_file()
        message = " ".join(done.stderr.split())
        assert (f"error: release withheld: membership-inference advantage {section['advantage']:.4f}" in message
                and f"exceeds run config sim-max-attack-advantage {bound:g}" in message), message[-2000:]
        assert (out / "report.html").is_file()  # the run itself is complete and reported
    else:
        assert done.returncode == 0, done.stderr[-3000:]
        assert section["gate"]["passed"] is True and (out / "model.mammofl").is_file()
        assert not (out / "model.unreleased").exists()
        assert f"membership inference: attack advantage {section['advantage']:.3f}" in done.stdout
    assert bound == 1.0 or bound < section["advantage"]  # the first case really exercises the failing gate
