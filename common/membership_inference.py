"""Membership-inference attacks on a released model, from per-example losses (numpy only).

An attack gives every example a *membership score* (higher = "was in the training set") and is judged on known
members and known non-members:

- **advantage** = max over thresholds t of TPR(t) - FPR(t), where the attack says "member" when score >= t
  (Yeom et al., "Privacy Risk in Machine Learning: Analyzing the Connection to Overfitting", CSF 2018, Def. 4;
  the threshold t = +inf is included, so the advantage is >= 0). The threshold is chosen on the very examples it
  is scored on, so even a model that leaks nothing shows a positive advantage on few examples:
  :func:`chance_advantage` gives that level (the null distribution of the maximum depends only on the two
  counts, whatever the model) and :func:`null_advantage_bound` a guaranteed bound.
- **auc** = P(score of a random member > score of a random non-member), ties counting one half (Mann-Whitney).

Attacks (the adversary sees the model's output on an example and its label, and holds population data, i.e.
examples from the same distribution that were not trained on; no shadow models):

- ``loss_threshold`` (Yeom et al. 2018): score = -loss, the image cross-entropy -log p(y | x). Members tend to
  have smaller losses.
- ``calibrated_likelihood_ratio``: the offline likelihood-ratio test of LiRA (Carlini et al., "Membership
  Inference Attacks From First Principles", IEEE S&P 2022, §IV-C offline variant with a global, not per-example,
  variance) on the logit-scaled confidence phi = log p_y - log(1 - p_y) (their §IV-B: phi is close to Gaussian).
  Without shadow models the "OUT" Gaussian cannot be fitted per example; it is fitted per true class on population
  (non-member) data, which makes it the class-dependent population attack of Ye et al. ("Enhanced Membership
  Inference Attacks against Machine Learning Models", CCS 2022, Attack P) in LiRA's Gaussian form. Score =
  (phi - mu_c) / sigma_c, the one-sided test statistic (the OUT p-value 1 - Phi(score) is monotone in it, so the
  ROC is the same). It calibrates away how hard each class is, which a single loss threshold cannot.
  The population data are the non-members themselves, cross-fitted: members and non-members are each cut at
  random into two halves, and the examples of one half are scored with the Gaussians fitted on the OTHER half's
  non-members, so no non-member is scored by a fit that saw it (and, under no leakage, members and non-members
  of a half are exchangeable: :func:`chance_advantage` still applies). A class with fewer than
  ``MIN_CLASS_REFERENCE`` reference examples, or no spread, uses the Gaussian of all reference examples.

:func:`audit` subsamples the larger side to equal counts (fixed seed) and runs both attacks. Losses stay in the
caller's memory: nothing here writes files.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

LOSS_THRESHOLD = "loss_threshold"
CALIBRATED_LIKELIHOOD_RATIO = "calibrated_likelihood_ratio"
ATTACKS = (LOSS_THRESHOLD, CALIBRATED_LIKELIHOOD_RATIO)
#: Reference (non-member) examples a class needs for its own Gaussian; fewer: the Gaussian of all classes.
MIN_CLASS_REFERENCE = 3
_TINY = 1e-12
_CHUNK = 250  # Monte Carlo draws of chance_advantage per array


@dataclass(frozen=True)
class AttackResult:
    """How well one attack separates members from non-members (see the module doc for the definitions).

    ``threshold``, ``tpr``, ``fpr``: where the advantage is reached (member when score >= threshold)."""

    name: str
    advantage: float
    auc: float
    threshold: float
    tpr: float
    fpr: float
    members: int
    non_members: int

    def to_json(self) -> dict:
        out = asdict(self)
        out["threshold"] = self.threshold if math.isfinite(self.threshold) else None
        return out


@dataclass(frozen=True)
class MembershipAudit:
    """Both attacks on balanced members / non-members; ``advantage`` and ``auc`` are the strongest attack's."""

    attacks: tuple[AttackResult, ...]
    members: int
    non_members: int
    seed: int
    chance_advantage_95: float

    @property
    def advantage(self) -> float:
        return max(a.advantage for a in self.attacks)

    @property
    def auc(self) -> float:
        return max(a.auc for a in self.attacks)

    def to_json(self) -> dict:
        """The ``membership_inference`` section of a run's ``metrics.json`` (no per-example number)."""
        return {"advantage": self.advantage, "auc": self.auc, "members": self.members,
                "non_members": self.non_members, "seed": self.seed,
                "chance_advantage_95": self.chance_advantage_95,
                "attack_names": [a.name for a in self.attacks],
                "attacks": {a.name: a.to_json() for a in self.attacks}}


# ---------------------------------------------------------------- scoring an attack
def attack_auc(member_scores, non_member_scores) -> float:
    """P(member score > non-member score) + P(equal) / 2 (the Mann-Whitney statistic, average ranks for ties)."""
    members, non_members = _scores(member_scores, "member"), _scores(non_member_scores, "non-member")
    values = np.concatenate([members, non_members])
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2.0)[inverse]  # 1-based average ranks
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2.0) / (m * n))


def best_advantage(member_scores, non_member_scores) -> tuple[float, float, float, float]:
    """(advantage, threshold, tpr, fpr): the largest TPR - FPR of "member when score >= threshold" over all
    thresholds, +inf included (advantage 0 at TPR = FPR = 0); ties between thresholds go to the highest."""
    members, non_members = _scores(member_scores, "member"), _scores(non_member_scores, "non-member")
    values = np.unique(np.concatenate([members, non_members]))[::-1]  # candidate thresholds, descending
    tpr = (len(members) - np.searchsorted(np.sort(members), values, side="left")) / len(members)
    fpr = (len(non_members) - np.searchsorted(np.sort(non_members), values, side="left")) / len(non_members)
    gain = tpr - fpr
    best = int(np.argmax(gain))
    if gain[best] <= 0:
        return 0.0, math.inf, 0.0, 0.0
    return float(gain[best]), float(values[best]), float(tpr[best]), float(fpr[best])


def score_attack(name: str, member_scores, non_member_scores) -> AttackResult:
    advantage, threshold, tpr, fpr = best_advantage(member_scores, non_member_scores)
    return AttackResult(name=name, advantage=advantage, auc=attack_auc(member_scores, non_member_scores),
                        threshold=threshold, tpr=tpr, fpr=fpr, members=len(member_scores),
                        non_members=len(non_member_scores))


# ---------------------------------------------------------------- the attacks
def cross_entropy_losses(probabilities, labels) -> np.ndarray:
    """-log p(label) per example from (N, K) class probabilities and (N,) integer labels."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.int64)
    if probabilities.ndim != 2 or labels.shape != (len(probabilities),):
        raise ValueError(f"expected (N, K) probabilities and (N,) labels, got {probabilities.shape} and "
                         f"{labels.shape}")
    return -np.log(np.clip(probabilities[np.arange(len(labels)), labels], _TINY, 1.0))


def logit_confidence(losses) -> np.ndarray:
    """phi = log p - log(1 - p) of the true class's probability p = exp(-loss) (stable for p near 0 and 1)."""
    losses = np.maximum(np.asarray(losses, dtype=np.float64), _TINY)
    return -losses - np.log(-np.expm1(-losses))


def loss_threshold_attack(member_losses, non_member_losses) -> AttackResult:
    """Yeom et al.: member when the loss is small (score = -loss)."""
    return score_attack(LOSS_THRESHOLD, -_scores(member_losses, "member"),
                        -_scores(non_member_losses, "non-member"))


def calibrated_likelihood_ratio_attack(member_losses, member_labels, non_member_losses, non_member_labels, *,
                                       seed: int) -> AttackResult:
    """Per-class Gaussian OUT test on phi, cross-fitted on the non-members in two halves (see the module doc)."""
    member_phi = logit_confidence(_scores(member_losses, "member"))
    non_member_phi = logit_confidence(_scores(non_member_losses, "non-member"))
    member_labels = _labels(member_labels, len(member_phi), "member")
    non_member_labels = _labels(non_member_labels, len(non_member_phi), "non-member")
    if len(non_member_phi) < 2:
        raise ValueError("the likelihood-ratio attack needs at least 2 non-members (one per half)")
    rng = np.random.default_rng(seed)
    member_half = _halves(len(member_phi), rng)
    non_member_half = _halves(len(non_member_phi), rng)
    member_scores = np.empty_like(member_phi)
    non_member_scores = np.empty_like(non_member_phi)
    for half in (0, 1):
        reference = non_member_half != half
        fit = _class_gaussians(non_member_phi[reference], non_member_labels[reference])
        rows = member_half == half
        member_scores[rows] = _standardise(member_phi[rows], member_labels[rows], fit)
        rows = non_member_half == half
        non_member_scores[rows] = _standardise(non_member_phi[rows], non_member_labels[rows], fit)
    return score_attack(CALIBRATED_LIKELIHOOD_RATIO, member_scores, non_member_scores)


# ---------------------------------------------------------------- an audit
def balanced_subsample(members: int, non_members: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices keeping min(members, non_members) of each side, drawn without replacement with `seed`."""
    count = min(members, non_members)
    rng = np.random.default_rng(seed)
    return (np.sort(rng.choice(members, size=count, replace=False)),
            np.sort(rng.choice(non_members, size=count, replace=False)))


def audit(member_losses, member_labels, non_member_losses, non_member_labels, *, seed: int) -> MembershipAudit:
    """Both attacks on equal counts of members and non-members (the larger side subsampled with `seed`)."""
    member_losses = _scores(member_losses, "member")
    non_member_losses = _scores(non_member_losses, "non-member")
    member_labels = _labels(member_labels, len(member_losses), "member")
    non_member_labels = _labels(non_member_labels, len(non_member_losses), "non-member")
    if min(len(member_losses), len(non_member_losses)) < 2:
        raise ValueError(f"a membership audit needs at least 2 members and 2 non-members, got "
                         f"{len(member_losses)} and {len(non_member_losses)}")
    keep_m, keep_n = balanced_subsample(len(member_losses), len(non_member_losses), seed=seed)
    losses_m, labels_m = member_losses[keep_m], member_labels[keep_m]
    losses_n, labels_n = non_member_losses[keep_n], non_member_labels[keep_n]
    attacks = (loss_threshold_attack(losses_m, losses_n),
               calibrated_likelihood_ratio_attack(losses_m, labels_m, losses_n, labels_n, seed=seed))
    return MembershipAudit(attacks=attacks, members=len(keep_m), non_members=len(keep_n), seed=seed,
                           chance_advantage_95=chance_advantage(len(keep_m), len(keep_n), seed=seed))


# ---------------------------------------------------------------- what no leakage looks like
def chance_advantage(members: int, non_members: int, *, quantile: float = 0.95, draws: int = 2000,
                     seed: int = 0) -> float:
    """The `quantile` of the best-threshold advantage when members and non-members are exchangeable (a model that
    leaks nothing), by Monte Carlo over random assignments of the labels to ranks. Distribution-free for
    continuous scores: it depends only on the two counts (it is the one-sided two-sample Kolmogorov-Smirnov
    statistic)."""
    if members < 1 or non_members < 1:
        raise ValueError("chance_advantage needs at least one member and one non-member")
    rng = np.random.default_rng(seed)
    total = members + non_members
    best = []
    for start in range(0, draws, _CHUNK):  # bounded memory on large audits
        rows = min(_CHUNK, draws - start)
        is_member = np.argsort(rng.random((rows, total)), axis=1) < members  # a random ranking per draw
        gain = np.cumsum(is_member, axis=1) / members - np.cumsum(~is_member, axis=1) / non_members
        best.append(np.maximum(gain.max(axis=1), 0.0))
    return float(np.quantile(np.concatenate(best), quantile))


def null_advantage_bound(members: int, non_members: int, *, alpha: float = 0.05) -> float:
    """A bound b with P(advantage > b) <= alpha when members and non-members come from one distribution.

    advantage <= sup|F_m - F| + sup|G_n - F| (F the common CDF, F_m, G_n the empirical ones); each term exceeds
    sqrt(log(4 / alpha) / (2 k)) with probability <= alpha / 2 by the Dvoretzky-Kiefer-Wolfowitz inequality with
    Massart's constant (valid for every k)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    term = math.log(4 / alpha) / 2
    return math.sqrt(term / members) + math.sqrt(term / non_members)


# ---------------------------------------------------------------- internals
def _scores(values, side: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(array) == 0:
        raise ValueError(f"no {side} scores")
    if not np.isfinite(array).all():
        raise ValueError(f"{side} scores must be finite")
    return array


def _labels(values, count: int, side: str) -> np.ndarray:
    labels = np.asarray(values, dtype=np.int64).reshape(-1)
    if len(labels) != count:
        raise ValueError(f"{count} {side} losses but {len(labels)} labels")
    return labels


def _halves(count: int, rng: np.random.Generator) -> np.ndarray:
    """0/1 per example, the two halves as equal as possible, in random order."""
    return rng.permutation(np.arange(count) % 2)


def _gaussian(phi: np.ndarray) -> tuple[float, float] | None:
    if len(phi) < 2:
        return None
    spread = float(np.std(phi, ddof=1))
    return (float(np.mean(phi)), spread) if spread > 0 else None


def _class_gaussians(phi: np.ndarray, labels: np.ndarray) -> dict:
    pooled = _gaussian(phi) or ((float(np.mean(phi)), 1.0) if len(phi) else (0.0, 1.0))
    fit: dict = {None: pooled}
    for label in np.unique(labels):
        rows = phi[labels == label]
        if len(rows) >= MIN_CLASS_REFERENCE:
            fit[int(label)] = _gaussian(rows) or pooled
    return fit


def _standardise(phi: np.ndarray, labels: np.ndarray, fit: dict) -> np.ndarray:
    out = np.empty_like(phi)
    for i, (value, label) in enumerate(zip(phi, labels)):
        mean, spread = fit.get(int(label), fit[None])
        out[i] = (value - mean) / spread
    return out
