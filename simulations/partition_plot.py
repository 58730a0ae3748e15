"""A picture of how a data set was cut into virtual hospitals: classes and background tissue per hospital.

Two stacked bar charts side by side, one bar per hospital (and one for the held-out test set when there is one):
images per class (normal / benign / malignant) and images per mini-MIAS background tissue (F fatty, G glandular,
D dense). Counts come from :func:`common.partitioning.partition_summary`, the same numbers the run reports.
Drawn with matplotlib's Agg canvas (no display, no global pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.partitioning import TISSUE_ORDER, partition_summary
from common.records import CLASS_NAMES, ImageRecord

CLASS_COLOURS = {"normal": "#8fbc8f", "benign": "#f0c05a", "malignant": "#c8504b"}
TISSUE_COLOURS = {"F": "#d9c7a7", "G": "#a68a64", "D": "#5c4a3a"}
TISSUE_LABELS = {"F": "F (fatty)", "G": "G (glandular)", "D": "D (dense)"}


def plot_partitions(partitions: Sequence[Sequence[ImageRecord]], out: Path, *, title: str,
                    test: Sequence[ImageRecord] = ()) -> Path:
    """Write the partition plot of `partitions` (plus the held-out `test` set, if any) as PNG to `out`."""
    groups = list(partitions) + ([test] if test else [])
    names = [f"hospital {k}" for k in range(len(partitions))] + (["test (held out)"] if test else [])
    rows = partition_summary(groups)
    figure = Figure(figsize=(max(7.0, 1.6 * len(groups) + 3.0), 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    by_class, by_tissue = figure.subplots(1, 2)
    _stacked(by_class, names, [[row["class_counts"][c] for row in rows] for c in CLASS_NAMES],
             labels=list(CLASS_NAMES), colours=[CLASS_COLOURS[c] for c in CLASS_NAMES],
             title="images per class")
    untyped = [row["n_images"] - sum(row["tissue_counts"].values()) for row in rows]
    tissue_series = [[row["tissue_counts"][t] for row in rows] for t in TISSUE_ORDER]
    tissue_labels = [TISSUE_LABELS[t] for t in TISSUE_ORDER]
    tissue_colours = [TISSUE_COLOURS[t] for t in TISSUE_ORDER]
    if any(untyped):
        tissue_series.append(untyped)
        tissue_labels.append("unknown")
        tissue_colours.append("#cccccc")
    _stacked(by_tissue, names, tissue_series, labels=tissue_labels, colours=tissue_colours,
             title="images per background tissue")
    for axes, row_names in ((by_class, names), (by_tissue, names)):
        axes.set_xticks(range(len(row_names)), [_tick(n, r) for n, r in zip(row_names, rows, strict=True)],
                        fontsize=8)
    figure.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png", dpi=110)
    return out


def _stacked(axes, names: list[str], series: list[list[int]], *, labels: list[str], colours: list[str],
             title: str) -> None:
    bottoms = [0] * len(names)
    for values, label, colour in zip(series, labels, colours, strict=True):
        bars = axes.bar(range(len(names)), values, bottom=bottoms, label=label, color=colour, edgecolor="white")
        axes.bar_label(bars, labels=[str(v) if v else "" for v in values], label_type="center", fontsize=7,
                       color=_text_colour(colour))
        bottoms = [b + v for b, v in zip(bottoms, values, strict=True)]
    axes.set_title(title, fontsize=10)
    axes.set_ylabel("images")
    axes.legend(fontsize=7, loc="upper right", framealpha=0.8)
    axes.set_ylim(0, max(bottoms + [1]) * 1.18)


def _tick(name: str, row: dict) -> str:
    return f"{name}\n{row['n_patients']} patients"


def _text_colour(fill: str) -> str:
    """Black on light fills, white on dark ones."""
    r, g, b = (int(fill[i:i + 2], 16) / 255 for i in (1, 3, 5))
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
