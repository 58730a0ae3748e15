"""The run report's figures, each returned as PNG bytes (``server.report`` embeds them and writes them to disk).

Every figure is drawn on its own ``matplotlib.figure.Figure`` with the Agg canvas: no display, no pyplot, no
global state, so figures can be drawn from any thread and never leak into each other. Curves computed from a
score histogram use ``common.operating_point`` (the same numbers as the operating point and its metrics).
Same input, same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common import operating_point as op

DPI = 100
FEDERATED_COLOUR = "#2a6fb0"
CENTRALISED_COLOUR = "#c8504b"
TRAIN_COLOUR = "#4c8c4a"
EPSILON_COLOUR = "#7a4fa0"


def round_curves(rounds: Sequence[dict]) -> bytes:
    """Four panels over rounds: train loss; eval loss and malignant AUC (federated and centralised); epsilon max.

    `rounds`: the ``rounds`` entries of ``metrics.json``. Missing values (null, absent) leave gaps; a panel
    without any value says so.
    """
    x = [int(r["round"]) for r in rounds]
    figure = _figure(10.0, 6.4)
    axes = figure.subplots(2, 2, sharex=True)
    panels = [
        (axes[0, 0], "train loss", [("train", TRAIN_COLOUR, [r.get("train_loss") for r in rounds])]),
        (axes[0, 1], "evaluation loss", [
            ("federated (hospitals' validation)", FEDERATED_COLOUR, _eval(rounds, "federated_eval", "eval_loss")),
            ("centralised (held-out test)", CENTRALISED_COLOUR, _eval(rounds, "centralised_eval", "eval_loss"))]),
        (axes[1, 0], "AUC malignant vs rest", [
            ("federated", FEDERATED_COLOUR, _eval(rounds, "federated_eval", "auc_malignant")),
            ("centralised", CENTRALISED_COLOUR, _eval(rounds, "centralised_eval", "auc_malignant"))]),
        (axes[1, 1], "epsilon spent (max over hospitals)", [
            ("epsilon max", EPSILON_COLOUR, [r.get("epsilon_max") for r in rounds])]),
    ]
    for ax, title, series in panels:
        drawn = 0
        for label, colour, values in series:
            y = np.array([float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else np.nan
                          for v in values], dtype=np.float64)
            if np.isfinite(y).any():
                ax.plot(x, y, color=colour, label=label, marker="o" if len(x) <= 20 else None, markersize=3)
                drawn += 1
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if drawn == 0:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="#777777")
        elif len(series) > 1:
            ax.legend(fontsize=7)
    axes[1, 1].set_ylim(bottom=0)
    axes[1, 0].axhline(0.5, color="#999999", linestyle=":", linewidth=1)  # chance
    for ax in axes[1]:
        ax.set_xlabel("round")
    return _png(figure)


def confusion_matrix(matrix: Sequence[Sequence[int]], class_names: Sequence[str], *, title: str) -> bytes:
    """Counts with rows = true class, columns = decided class; each cell also shows its share of its row."""
    counts = np.asarray(matrix, dtype=np.int64)
    if counts.shape != (len(class_names), len(class_names)):
        raise ValueError(f"confusion matrix of shape {counts.shape} for {len(class_names)} classes")
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape, dtype=np.float64), where=rows > 0)
    figure = _figure(4.8, 4.2)
    ax = figure.subplots()
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(j, i, f"{counts[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=10,
                    color="white" if share[i, j] > 0.55 else "black")
    ticks = range(len(class_names))
    ax.set_xticks(ticks, list(class_names))
    ax.set_yticks(ticks, list(class_names))
    ax.set_xlabel("decision")
    ax.set_ylabel("true class")
    ax.set_title(title, fontsize=10)
    return _png(figure)


def roc(histogram: op.ScoreHistogram, point: op.OperatingPoint | None = None) -> bytes:
    """ROC curve of malignant vs rest from the score histogram, with the operating point marked."""
    fpr, tpr = op.roc_curve(histogram)
    area = op.auc(histogram)
    figure = _figure(4.8, 4.4)
    ax = figure.subplots()
    ax.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="chance")
    ax.plot(fpr, tpr, color=FEDERATED_COLOUR, drawstyle="default",
            label=f"AUC {area:.3f}" if area is not None else "AUC n/a")
    if point is not None:
        at = op.counts_at(histogram, point.threshold)
        if at.sensitivity is not None and at.specificity is not None:
            ax.plot([1 - at.specificity], [at.sensitivity], "o", color=CENTRALISED_COLOUR,
                    label=f"operating point (threshold {op.threshold_text(point.threshold)})")
    ax.set_xlabel("false-positive rate (1 - specificity)")
    ax.set_ylabel("sensitivity")
    _unit_square(ax, "ROC: malignant vs rest")
    return _png(figure)


def precision_recall(histogram: op.ScoreHistogram, point: op.OperatingPoint | None = None) -> bytes:
    """Precision-recall curve of malignant vs rest, with the prevalence line and the operating point."""
    recall, precision = op.precision_recall_curve(histogram)
    prevalence = histogram.positives.sum() / max(histogram.total, 1)
    figure = _figure(4.8, 4.4)
    ax = figure.subplots()
    ax.axhline(prevalence, color="#999999", linestyle=":", linewidth=1, label=f"prevalence {prevalence:.2f}")
    ax.plot(recall, precision, color=FEDERATED_COLOUR, label="precision-recall")
    if point is not None:
        at = op.counts_at(histogram, point.threshold)
        if at.sensitivity is not None and at.precision is not None:
            ax.plot([at.sensitivity], [at.precision], "o", color=CENTRALISED_COLOUR,
                    label=f"operating point (threshold {op.threshold_text(point.threshold)})")
    ax.set_xlabel("recall (sensitivity)")
    ax.set_ylabel("precision")
    _unit_square(ax, "precision-recall: malignant vs rest")
    return _png(figure)


def calibration(histogram: op.ScoreHistogram, groups: int = 10) -> bytes:
    """Reliability diagram: observed malignant fraction against mean predicted P(malignant) per score range,
    marker area proportional to the images in the range, with the images per range underneath."""
    predicted, observed, sizes = op.calibration(histogram, groups)
    figure = _figure(4.8, 5.4)
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.plot([0, 1], [0, 1], color="#999999", linestyle=":", linewidth=1, label="perfect calibration")
    if len(sizes):
        top.plot(predicted, observed, color=FEDERATED_COLOUR, linewidth=1)
        top.scatter(predicted, observed, s=20 + 180 * sizes / sizes.max(), color=FEDERATED_COLOUR, zorder=3,
                    label="model")
    top.set_ylabel("observed malignant fraction")
    _unit_square(top, "calibration of P(malignant)")
    totals = histogram.by_class.sum(axis=0)
    edges = op.group_edges(groups)
    bottom.bar(edges[:-1], totals.reshape(groups, -1).sum(axis=1), width=np.diff(edges), align="edge",
               color="#b9c7d8", edgecolor="white")
    bottom.set_xlabel("predicted P(malignant)")
    bottom.set_ylabel("images")
    return _png(figure)


def _eval(rounds: Sequence[dict], section: str, key: str) -> list:
    return [(r.get(section) or {}).get(key) for r in rounds]


def _unit_square(ax, title: str) -> None:
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas (never pyplot's)."""
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
