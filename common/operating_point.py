"""The malignancy operating point: score histograms, threshold choice, decisions and curves.

Per-image scores never leave a hospital, so everything a coordinator needs to choose a threshold, draw ROC,
precision-recall and calibration curves or bootstrap a confidence interval is a :class:`ScoreHistogram`: counts of
P(malignant) in ``BINS`` bins, per true class. The bins are equal in logit(P): ``EDGES`` are 0, the
``BINS - 1`` values sigmoid(-10) .. sigmoid(10) at equal logit steps of 0.2, and 1 (0.05 in P at 0.5, 0.0002
near 0.001), so a model whose scores all lie near 0 or 1 still gets distinct thresholds: the demo's top-k
pooled log-probabilities put most P(malignant) between 1e-4 and 0.4. Summed over hospitals it is the pooled histogram
exactly; it is computed the same way from a held-out test set in simulation.

Decision at threshold ``t`` (:func:`decide`): malignant when P(malignant) >= t, else the more probable of normal
and benign. Binary metrics count malignant as positive. A threshold is always a bin edge (:func:`snap_threshold`),
so every number computed from the histogram at that threshold equals the number computed from the raw scores.

Rules (:func:`choose_operating_point`):

- ``sensitivity``: the highest threshold whose sensitivity is at least ``target`` (fewest false positives at
  that sensitivity);
- ``youden``: the threshold maximising sensitivity + specificity - 1 (ties: the higher threshold).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from common.records import CLASS_NAMES

MALIGNANT = CLASS_NAMES.index("malignant")
_OTHERS = tuple(i for i in range(len(CLASS_NAMES)) if i != MALIGNANT)  # (normal, benign)
BINS = 100
LOGIT_RANGE = 10.0
#: Bin edges in P(malignant): bin b holds [EDGES[b], EDGES[b + 1]); the last bin also holds 1.
EDGES = np.concatenate([[0.0], 1.0 / (1.0 + np.exp(-np.linspace(-LOGIT_RANGE, LOGIT_RANGE, BINS - 1))), [1.0]])
SHAPE = (len(CLASS_NAMES), len(_OTHERS), BINS)
RULES = ("sensitivity", "youden")


@dataclass(frozen=True)
class ScoreHistogram:
    """counts[c, k, b]: images of true class c (CLASS_NAMES order) whose P(malignant) falls in bin b of BINS and
    whose more probable non-malignant class is k (0 normal, 1 benign; a tie is normal, as :func:`decide`).

    The middle axis makes the three-class confusion matrix at any threshold exact (:func:`confusion_at`)."""

    counts: np.ndarray

    def __post_init__(self) -> None:
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.shape != SHAPE:
            raise ValueError(f"score histogram must have shape {SHAPE}, got {counts.shape}")
        if (counts < 0).any():
            raise ValueError("score histogram counts must be >= 0")
        object.__setattr__(self, "counts", counts)

    @classmethod
    def empty(cls) -> ScoreHistogram:
        return cls(np.zeros(SHAPE, dtype=np.int64))

    @classmethod
    def of(cls, labels, probs) -> ScoreHistogram:
        """Histogram of labels (N,) and class probabilities (N, 3)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        probs = np.asarray(probs, dtype=np.float64).reshape(len(labels), len(CLASS_NAMES))
        if len(labels) and (labels.min() < 0 or labels.max() >= len(CLASS_NAMES)):
            raise ValueError(f"labels must be in 0..{len(CLASS_NAMES) - 1}")
        fallback = (probs[:, _OTHERS[1]] > probs[:, _OTHERS[0]]).astype(np.int64)
        counts = np.zeros(SHAPE, dtype=np.int64)
        np.add.at(counts, (labels, fallback, score_bin(probs[:, MALIGNANT])), 1)
        return cls(counts)

    def __add__(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(self.counts + other.counts)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    @property
    def by_class(self) -> np.ndarray:
        """(3, BINS) images per true class and bin."""
        return self.counts.sum(axis=1)

    @property
    def positives(self) -> np.ndarray:
        """(BINS,) malignant images per bin."""
        return self.by_class[MALIGNANT]

    @property
    def negatives(self) -> np.ndarray:
        """(BINS,) non-malignant images per bin."""
        return self.by_class.sum(axis=0) - self.by_class[MALIGNANT]

    def flat(self) -> list[int]:
        """The counts as one list (C order), as they travel in an evaluation reply."""
        return [int(v) for v in self.counts.reshape(-1)]

    @classmethod
    def from_flat(cls, values) -> ScoreHistogram:
        values = np.asarray(values)
        if values.size != int(np.prod(SHAPE)) or not np.all(np.isfinite(values)) or (values != np.round(values)).any():
            raise ValueError(f"a score histogram is {int(np.prod(SHAPE))} integer counts")
        return cls(values.astype(np.int64).reshape(SHAPE))

    def to_json(self) -> dict:
        return {"bins": BINS, "logit_range": LOGIT_RANGE, "class_names": list(CLASS_NAMES),
                "counts": self.counts.tolist()}

    @classmethod
    def from_json(cls, data: dict) -> ScoreHistogram:
        """Refuses a histogram made with other bins (their counts would be read against the wrong edges)."""
        if data.get("bins") != BINS or data.get("logit_range") != LOGIT_RANGE:
            raise ValueError(f"score histogram of {data.get('bins')} bins over logit range {data.get('logit_range')}"
                             f", this version uses {BINS} over {LOGIT_RANGE}")
        return cls(np.asarray(data["counts"], dtype=np.int64))


def score_bin(scores) -> np.ndarray:
    """Bin index of each P(malignant): bin b holds [EDGES[b], EDGES[b + 1]), the last bin also 1.0."""
    scores = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    return np.clip(np.searchsorted(EDGES, np.clip(scores, 0.0, 1.0), side="right") - 1, 0, BINS - 1)


def snap_threshold(threshold: float) -> float:
    """The bin edge at or below `threshold` (decisions are exact from histograms only at bin edges)."""
    return float(EDGES[_first_bin(threshold)])


@dataclass(frozen=True)
class BinaryCounts:
    """Malignant-vs-rest counts at one threshold."""

    tp: int
    fn: int
    fp: int
    tn: int

    @property
    def sensitivity(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)


def counts_at(histogram: ScoreHistogram, threshold: float) -> BinaryCounts:
    """Binary counts when scores >= `threshold` (a bin edge) are called malignant."""
    first = _first_bin(threshold)
    pos, neg = histogram.positives, histogram.negatives
    return BinaryCounts(tp=int(pos[first:].sum()), fn=int(pos[:first].sum()),
                        fp=int(neg[first:].sum()), tn=int(neg[:first].sum()))


@dataclass(frozen=True)
class OperatingPoint:
    """The malignancy threshold a model is used at, and how it was chosen."""

    threshold: float
    rule: str
    target: float | None
    sensitivity: float | None
    specificity: float | None
    source: str  # which data chose it, e.g. "federated validation (3 hospitals, 52 images)"

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> OperatingPoint:
        return cls(**{k: data.get(k) for k in ("threshold", "rule", "target", "sensitivity", "specificity",
                                               "source")})


def choose_operating_point(histogram: ScoreHistogram, *, rule: str = "sensitivity", target: float = 0.9,
                           source: str = "") -> OperatingPoint:
    """The threshold chosen by `rule` on `histogram` (see the module doc). Without a malignant or a non-malignant
    image nothing can be chosen: raises ValueError."""
    if rule not in RULES:
        raise ValueError(f"operating-point rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "sensitivity" and not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target!r}")
    if histogram.positives.sum() == 0 or histogram.negatives.sum() == 0:
        raise ValueError("an operating point needs malignant and non-malignant images")
    thresholds = EDGES
    counts = [counts_at(histogram, t) for t in thresholds]
    sens = np.array([c.sensitivity for c in counts])
    spec = np.array([c.specificity for c in counts])
    if rule == "sensitivity":
        index = int(np.flatnonzero(sens >= target - 1e-12).max())  # threshold 0 always qualifies
    else:
        youden = sens + spec - 1.0
        index = int(np.flatnonzero(youden >= youden.max() - 1e-12).max())
    return OperatingPoint(threshold=float(thresholds[index]), rule=rule,
                          target=float(target) if rule == "sensitivity" else None,
                          sensitivity=float(sens[index]), specificity=float(spec[index]), source=source)


def threshold_text(threshold: float) -> str:
    """A threshold as people read it: 3 significant digits (edges near 0 are small: 0.00119, not 0.00)."""
    return f"{float(threshold):.3g}"


def decide(probs, threshold: float) -> np.ndarray:
    """Class decisions (N,) at the malignancy threshold: malignant when P(malignant) >= threshold (bin-exact),
    else the more probable of normal and benign."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, len(CLASS_NAMES))
    malignant = score_bin(probs[:, MALIGNANT]) >= _first_bin(threshold)
    fallback = np.where(probs[:, _OTHERS[1]] > probs[:, _OTHERS[0]], _OTHERS[1], _OTHERS[0])
    return np.where(malignant, MALIGNANT, fallback)


def confusion_at(histogram: ScoreHistogram, threshold: float) -> list[list[int]]:
    """The three-class confusion matrix (rows true, columns decided; CLASS_NAMES order) of :func:`decide` at
    `threshold`, exactly as from the raw probabilities."""
    first = _first_bin(threshold)
    matrix = np.zeros((len(CLASS_NAMES), len(CLASS_NAMES)), dtype=np.int64)
    for true in range(len(CLASS_NAMES)):
        matrix[true, MALIGNANT] = histogram.counts[true, :, first:].sum()
        for k, other in enumerate(_OTHERS):
            matrix[true, other] = histogram.counts[true, k, :first].sum()
    return matrix.tolist()


def _first_bin(threshold: float) -> int:
    """Index of the bin edge at or below `threshold` (a threshold within 1e-12 of an edge is that edge)."""
    return int(np.searchsorted(EDGES, float(threshold) + 1e-12, side="right") - 1)


def roc_curve(histogram: ScoreHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every bin edge, from threshold 1 down to 0."""
    counts = [counts_at(histogram, t) for t in EDGES[::-1]]
    fpr = np.array([1.0 - (c.specificity if c.specificity is not None else 1.0) for c in counts])
    tpr = np.array([c.sensitivity if c.sensitivity is not None else 0.0 for c in counts])
    return fpr, tpr


def auc(histogram: ScoreHistogram) -> float | None:
    """ROC AUC of malignant vs rest from the histogram (ties within a bin count one half), None if undefined."""
    pos, neg = histogram.positives.astype(np.float64), histogram.negatives.astype(np.float64)
    if pos.sum() == 0 or neg.sum() == 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(neg)[:-1]])
    return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def precision_recall_curve(histogram: ScoreHistogram) -> tuple[np.ndarray, np.ndarray]:
    """(recall, precision) at every bin edge where something is called malignant, threshold 1 down to 0."""
    recall, precision = [], []
    for t in EDGES[::-1]:
        c = counts_at(histogram, t)
        if c.precision is not None and c.sensitivity is not None:
            recall.append(c.sensitivity)
            precision.append(c.precision)
    return np.array(recall), np.array(precision)


def calibration(histogram: ScoreHistogram, groups: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean predicted P(malignant) per group, observed malignant fraction, images) over `groups` runs of
    consecutive bins (equal logit ranges, :func:`group_edges`); a bin's midpoint stands for the scores inside it;
    empty groups are left out."""
    per = _group_size(groups)
    centres = (EDGES[:-1] + EDGES[1:]) / 2
    totals = histogram.by_class.sum(axis=0)
    predicted, observed, sizes = [], [], []
    for g in range(groups):
        span = slice(g * per, (g + 1) * per)
        n = totals[span].sum()
        if n:
            predicted.append(float((centres[span] * totals[span]).sum() / n))
            observed.append(float(histogram.positives[span].sum() / n))
            sizes.append(int(n))
    return np.array(predicted), np.array(observed), np.array(sizes)


def group_edges(groups: int = 10) -> np.ndarray:
    """(groups + 1,) P(malignant) edges of the groups :func:`calibration` uses."""
    return EDGES[::_group_size(groups)]


def _group_size(groups: int) -> int:
    if groups < 1 or BINS % groups:
        raise ValueError(f"groups must divide {BINS}")
    return BINS // groups


def bootstrap_interval(histogram: ScoreHistogram, statistic, *, resamples: int = 1000, level: float = 0.95,
                       seed: int = 0) -> tuple[float, float] | None:
    """Percentile bootstrap interval of `statistic(histogram) -> float | None`, resampling images (multinomial
    over the histogram's cells). None when fewer than half the resamples give a value."""
    rng = np.random.default_rng(seed)
    flat = histogram.counts.reshape(-1)
    n = int(flat.sum())
    if n == 0:
        return None
    values = []
    for _ in range(resamples):
        value = statistic(ScoreHistogram(rng.multinomial(n, flat / n).reshape(histogram.counts.shape)))
        if value is not None:
            values.append(value)
    if len(values) < resamples / 2:
        return None
    low, high = np.quantile(values, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(low), float(high)


def _ratio(num: int, den: int) -> float | None:
    return None if den == 0 else num / den
