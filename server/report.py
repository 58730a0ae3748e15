"""``report.html``: a run directory explained in one self-contained page, plus its figures as PNG.

:func:`build_report` reads a run directory (``server.run_directory`` documents ``metrics.json``) and writes

- ``report.html``: opens offline, every image embedded (``common.html_page``);
- ``figures/*.png``: the same figures as files (:data:`FIGURE_FILES`).

Inputs, all optional except ``metrics.json``; a missing or unreadable one leaves a note in its section, never a
crash:

- ``metrics.json`` ``rounds`` (curves, replies), ``privacy`` (epsilon, delta per hospital), ``config``,
  ``final``; in ``final``: ``score_histogram`` (``ScoreHistogram.to_json()``), ``operating_point``
  (``OperatingPoint.to_json()``) and ``at_operating_point`` (``confusion_matrix``, ``sensitivity``,
  ``specificity``, ``precision``, ``accuracy`` at the threshold). ROC, precision-recall and calibration curves
  and the bootstrap 95% confidence intervals (1000 resamples of the images, percentile) come from the histogram.
- ``simulation.json`` (simulations): preset, mode, images per class per hospital and in the held-out test set.
- ``partitions.png`` (simulations): the partition plot, embedded as it is.
- ``gallery/gallery.json`` with the PNG overlays beside it (simulations on public data only): a list of
  ``{"file": "x.png", "label": "malignant", "p_malignant": 0.8, "decision": "malignant"}``; ``file`` is a
  plain file name inside ``gallery/`` (anything else is refused and listed), ``label`` the true class,
  ``p_malignant`` the model's P(malignant), ``decision`` the class decided at the operating point.

Writing is atomic: everything is rendered in memory first; the figures go to a temporary folder that replaces
``figures/`` and the page to a temporary file that replaces ``report.html``. A failure leaves the previous report
(or none) and no temporary files.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import html_page as h
from common import operating_point as op
from common.records import CLASS_NAMES
from server import report_figures
from server.run_directory import METRICS_FILE

log = logging.getLogger(__name__)

REPORT_FILE = "report.html"
FIGURE_DIR = "figures"
GALLERY_DIR = "gallery"
GALLERY_INDEX = "gallery.json"
SIMULATION_FILE = "simulation.json"
PARTITION_PLOT = "partitions.png"
#: Figure key -> file name under ``figures/``.
FIGURE_FILES = {
    "rounds": "round-curves.png",
    "confusion": "confusion-matrix.png",
    "roc": "roc.png",
    "precision_recall": "precision-recall.png",
    "calibration": "calibration.png",
}
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0
TEST_ROW = "test (held out)"


class ReportError(RuntimeError):
    """The run directory cannot be reported on (no readable metrics.json)."""


@dataclass
class _Run:
    """What the report reads from a run directory, and the figures it draws on the way."""

    path: Path
    document: dict
    simulation: dict | None
    simulation_problem: str | None
    figures: dict[str, bytes] = field(default_factory=dict)

    @property
    def final(self) -> dict:
        final = self.document.get("final")
        return final if isinstance(final, dict) else {}

    @property
    def rounds(self) -> list[dict]:
        rounds = self.document.get("rounds")
        if not isinstance(rounds, list):
            return []
        return [r for r in rounds if isinstance(r, dict) and _is_number(r.get("round"))]

    @property
    def privacy(self) -> dict[str, dict]:
        privacy = self.document.get("privacy")
        return {str(k): v for k, v in privacy.items() if isinstance(v, dict)} if isinstance(privacy, dict) else {}

    @property
    def simulation_section(self) -> dict:
        """``metrics.json`` ``simulation`` (preset, num-hospitals, mode); empty for a deployment."""
        sim = self.document.get("simulation")
        return sim if isinstance(sim, dict) else {}

    @property
    def config(self) -> dict:
        config = self.document.get("config")
        return config if isinstance(config, dict) else {}

    @property
    def class_names(self) -> list[str]:
        names = self.final.get("class_names")
        return [str(n) for n in names] if isinstance(names, list) and names else list(CLASS_NAMES)


def build_report(run_dir: Path) -> Path:
    """Write ``report.html`` and ``figures/*.png`` into `run_dir` (see the module doc); returns the page's path.

    Raises ReportError when `run_dir` has no readable ``metrics.json``.
    """
    run_dir = Path(run_dir).expanduser().resolve()
    run = _read(run_dir)
    page = _page(run)
    _write(run_dir, page.render(), run.figures)
    path = run_dir / REPORT_FILE
    log.info("report written: %s", path)
    return path


# ---------------------------------------------------------------- reading
def _read(run_dir: Path) -> _Run:
    metrics = run_dir / METRICS_FILE
    if not metrics.is_file():
        raise ReportError(f"{metrics}: not found (is {run_dir} a run directory?)")
    try:
        document = json.loads(metrics.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ReportError(f"{metrics}: not readable JSON ({error})") from error
    if not isinstance(document, dict):
        raise ReportError(f"{metrics}: expected a JSON object, found {type(document).__name__}")
    simulation, problem = None, None
    path = run_dir / SIMULATION_FILE
    if path.is_file():
        try:
            simulation = json.loads(path.read_text())
            if not isinstance(simulation, dict):
                simulation, problem = None, f"{SIMULATION_FILE} is not a JSON object"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            problem = f"{SIMULATION_FILE} is not readable JSON ({error})"
    return _Run(run_dir, document, simulation, problem)


def _histogram(run: _Run) -> tuple[op.ScoreHistogram | None, str | None]:
    """(the final score histogram, or None and why)."""
    data = run.final.get("score_histogram")
    if data is None:
        return None, ("metrics.json has no final.score_histogram (older run, or the run did not finish): "
                      "curves and confidence intervals need it")
    try:
        histogram = op.ScoreHistogram.from_json(data)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        return None, f"final.score_histogram in metrics.json is not usable: {error}"
    if histogram.total == 0:
        return None, "final.score_histogram in metrics.json is empty (no evaluated images)"
    return histogram, None


def _operating_point(run: _Run) -> tuple[op.OperatingPoint | None, str | None]:
    data = run.final.get("operating_point")
    if data is None:
        return None, "metrics.json has no final.operating_point (older run): decisions shown are argmax"
    try:
        point = op.OperatingPoint.from_json(data)
        if not isinstance(point.threshold, (int, float)) or not 0.0 <= point.threshold <= 1.0:
            raise ValueError(f"threshold {point.threshold!r} is not a number in [0, 1]")
    except (ValueError, TypeError, AttributeError) as error:
        return None, f"final.operating_point in metrics.json is not usable: {error}"
    return point, None


# ---------------------------------------------------------------- the page
def _page(run: _Run) -> h.Page:
    sim = run.simulation_section
    what = ", ".join(str(x) for x in (sim.get("mode"), sim.get("preset") and f"preset {sim['preset']}") if x)
    page = h.Page(title=f"MammoFL run report: {run.path.name}",
                  subtitle=f"{run.path}" + (f" ({what})" if what else ""),
                  footer=f"Written by mammo-fl {_version(run)} from {METRICS_FILE} on "
                         f"{dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}. "
                         f"Rebuild with: mammofl-sim report RUN_DIR")
    histogram, histogram_problem = _histogram(run)
    point, point_problem = _operating_point(run)
    page.section("Run", _run_summary(run))
    page.section("Training curves", _curves(run))
    page.section("Final metrics", _final_metrics(run, histogram, histogram_problem, point))
    page.section("Confusion matrix at the operating point", _confusion(run, point, point_problem))
    page.section("ROC and precision-recall", _roc_pr(run, histogram, histogram_problem, point))
    page.section("Calibration", _calibration(run, histogram, histogram_problem))
    page.section("Hospitals", _hospitals(run))
    page.section("Partitions", _partitions(run))
    page.section("Explanations at the hospitals", _explanations(run))
    page.section("Gallery of test predictions", _gallery(run))
    page.section("Model card", _model_card(run, point))
    return page


def _run_summary(run: _Run) -> h.Markup:
    doc, config, sim = run.document, run.config, run.simulation_section
    rounds = run.rounds
    status = doc.get("status")
    parts = []
    if status != "completed":
        state = {"failed": "failed", "running": "is still running (or was interrupted)"}.get(
            status, f"has status {status!r}" if status else "has no status")
        parts.append(h.notice(f"This run {state}: the numbers below are those of its last recorded round.",
                              warning=status == "failed"))
    if doc.get("error"):
        parts.append(h.notice(h.strong("Error: "), str(doc["error"]), warning=True))
    versions = doc.get("versions") if isinstance(doc.get("versions"), dict) else {}
    resumed = doc.get("resumed") if isinstance(doc.get("resumed"), list) else []
    parts.append(h.definition_list([
        ("status", str(status)),
        ("mode", str(sim.get("mode", "federated (deployment)" if not sim else "n/a"))),
        ("preset", _text(sim.get("preset"))),
        ("hospitals", _text(sim.get("num-hospitals", len(run.privacy) or None))),
        ("rounds recorded", f"{len(rounds)} of {_text(config.get('num-server-rounds'))}"),
        ("model", _text(config.get("model"))),
        ("strategy", _text(config.get("strategy"))),
        ("differential privacy", _dp_summary(config)),
        ("final metrics from", _source(run.final.get("source"))),
        ("resumed", "; ".join(f"from round {r.get('from_round')} at {r.get('at')}" for r in resumed
                              if isinstance(r, dict)) or "no"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) or None),
    ]))
    return h.join(*parts)


def _curves(run: _Run) -> h.Markup:
    rounds = run.rounds
    if not rounds:
        return h.notice("No round recorded in metrics.json yet.")
    run.figures["rounds"] = report_figures.round_curves(rounds)
    rows = []
    for r in rounds:
        fed = r.get("federated_eval") if isinstance(r.get("federated_eval"), dict) else {}
        cen = r.get("centralised_eval") if isinstance(r.get("centralised_eval"), dict) else {}
        train = ((r.get("replies") or {}).get("train") or {}) if isinstance(r.get("replies"), dict) else {}
        rows.append([_int(r.get("round")), _num(r.get("train_loss")), _num(fed.get("eval_loss")),
                     _num(fed.get("auc_malignant")), _num(cen.get("eval_loss")), _num(cen.get("auc_malignant")),
                     _num(r.get("epsilon_max")), _replies(train)])
    return h.join(
        h.figure(run.figures["rounds"], alt="training curves over rounds",
                 caption="Train loss, evaluation loss and malignant-vs-rest AUC (federated: pooled over the "
                         "hospitals' validation splits; centralised: the held-out test set, simulations only) and "
                         "the largest epsilon spent by any hospital, per round. Gaps: not recorded."),
        h.collapsible(f"Per-round numbers ({len(rounds)} rounds)", h.table(
            ["round", "train loss", "fed. eval loss", "fed. AUC", "central eval loss", "central AUC",
             "epsilon max", "train replies valid/sampled"], rows)))


def _final_metrics(run: _Run, histogram: op.ScoreHistogram | None, problem: str | None,
                   point: op.OperatingPoint | None) -> h.Markup:
    final = run.final
    if not final:
        return h.notice("metrics.json has no final metrics (the run did not complete).")
    at = final.get("at_operating_point") if isinstance(final.get("at_operating_point"), dict) else {}
    intervals: dict[str, tuple[float, float] | None] = {}
    from_histogram: dict[str, float | None] = {}
    if histogram is not None:
        statistics = _binary_statistics(point.threshold if point is not None else None)
        for name, statistic in statistics.items():
            from_histogram[name] = statistic(histogram)
            intervals[name] = op.bootstrap_interval(histogram, statistic, resamples=BOOTSTRAP_RESAMPLES,
                                                    seed=BOOTSTRAP_SEED)
    where = "at the operating point" if point is not None else "(no operating point)"
    rows = [
        ["AUC malignant vs rest", final.get("auc_malignant"), _interval(intervals.get("auc"))],
        [f"sensitivity (recall, malignant) {where}", _first(at.get("sensitivity"), from_histogram.get("sensitivity")),
         _interval(intervals.get("sensitivity"))],
        [f"specificity (malignant vs rest) {where}", _first(at.get("specificity"), from_histogram.get("specificity")),
         _interval(intervals.get("specificity"))],
        [f"precision (malignant) {where}", _first(at.get("precision"), from_histogram.get("precision")),
         _interval(intervals.get("precision"))],
        [f"accuracy, malignant vs rest {where}", from_histogram.get("binary_accuracy"),
         _interval(intervals.get("binary_accuracy"))],
        [f"accuracy, three classes {where}", at.get("accuracy"), "n/a"],
        ["AUC benign vs malignant", final.get("auc_benign_vs_malignant"), "n/a"],
        ["accuracy, three classes (argmax)", final.get("accuracy"), "n/a"],
        ["F1, macro over classes (argmax)", final.get("f1_macro"), "n/a"],
        ["evaluation loss", final.get("eval_loss"), "n/a"],
    ]
    parts = [h.paragraph(f"Evaluated on {_source(final.get('source'))}",
                         f", {final['num_examples']} images" if isinstance(final.get("num_examples"), int) else "",
                         f", after round {final['round']}" if final.get("round") is not None else "", ". ",
                         "Malignant is the positive class. 95% confidence intervals: percentile bootstrap over the "
                         f"evaluated images ({BOOTSTRAP_RESAMPLES} resamples of the score histogram); a metric "
                         "without an interval cannot be recomputed from the histogram.")]
    if final.get("auc_source"):
        parts.append(h.paragraph("AUC: ", str(final["auc_source"]), "."))
    if problem:
        parts.append(h.notice(problem))
    elif from_histogram.get("auc") is not None:
        parts.append(h.paragraph(f"AUC from the score histogram ({op.BINS} bins; ties within a bin count one "
                                 f"half): {from_histogram['auc']:.3f}."))
    parts.append(h.table(["metric", "value", "95% CI"], [[n, _num(v), ci] for n, v, ci in rows]))
    return h.join(*parts)


def _binary_statistics(threshold: float | None) -> dict[str, Callable[[op.ScoreHistogram], float | None]]:
    statistics: dict[str, Callable[[op.ScoreHistogram], float | None]] = {"auc": op.auc}
    if threshold is None:
        return statistics
    statistics.update(
        sensitivity=lambda s: op.counts_at(s, threshold).sensitivity,
        specificity=lambda s: op.counts_at(s, threshold).specificity,
        precision=lambda s: op.counts_at(s, threshold).precision,
        binary_accuracy=lambda s: _binary_accuracy(op.counts_at(s, threshold)),
    )
    return statistics


def _binary_accuracy(counts: op.BinaryCounts) -> float | None:
    n = counts.tp + counts.fn + counts.fp + counts.tn
    return None if n == 0 else (counts.tp + counts.tn) / n


def _confusion(run: _Run, point: op.OperatingPoint | None, point_problem: str | None) -> h.Markup:
    final, names = run.final, run.class_names
    if not final:
        return h.notice("metrics.json has no final metrics (the run did not complete).")
    at = final.get("at_operating_point") if isinstance(final.get("at_operating_point"), dict) else {}
    parts = []
    if point is not None:
        parts.append(h.definition_list([
            ("threshold on P(malignant)", op.threshold_text(point.threshold)),
            ("rule", _rule(point)),
            ("chosen on", _text(point.source) if point.source else None),
            ("sensitivity / specificity where chosen", f"{_num(point.sensitivity)} / {_num(point.specificity)}"),
            ("sensitivity / specificity here", f"{_num(at.get('sensitivity'))} / {_num(at.get('specificity'))}"),
        ]))
        parts.append(h.paragraph("Decision: malignant when P(malignant) reaches the threshold, otherwise the more "
                                 "probable of normal and benign."))
        matrix, title = at.get("confusion_matrix"), "confusion matrix at the operating point"
        if matrix is None:
            parts.append(h.notice("metrics.json has no final.at_operating_point.confusion_matrix: shown below "
                                  "is the argmax confusion matrix."))
            matrix, title = final.get("confusion_matrix"), "confusion matrix (argmax decisions)"
    else:
        parts.append(h.notice(point_problem or "no operating point"))
        matrix, title = final.get("confusion_matrix"), "confusion matrix (argmax decisions)"
    if matrix is None:
        parts.append(h.notice("metrics.json has no confusion matrix in final."))
        return h.join(*parts)
    try:
        png = report_figures.confusion_matrix(matrix, names, title=title)
    except (ValueError, TypeError) as error:
        parts.append(h.notice(f"the confusion matrix in metrics.json is not usable: {error}", warning=True))
        return h.join(*parts)
    run.figures["confusion"] = png
    rows = [[f"true {names[i]}", *[_int(v) for v in row], _int(sum(row))] for i, row in enumerate(matrix)]
    parts.append(h.figure(png, alt=title, caption="Rows: true class; columns: decision; each cell: images and "
                                                  "share of its row."))
    parts.append(h.table(["", *[f"decided {n}" for n in names], "images"], rows, caption=title))
    return h.join(*parts)


def _roc_pr(run: _Run, histogram: op.ScoreHistogram | None, problem: str | None,
            point: op.OperatingPoint | None) -> h.Markup:
    if histogram is None:
        return h.notice(problem or "no score histogram")
    if histogram.positives.sum() == 0 or histogram.negatives.sum() == 0:
        return h.notice("The evaluated images are all of one kind (malignant or not): no ROC or "
                        "precision-recall curve.")
    run.figures["roc"] = report_figures.roc(histogram, point)
    run.figures["precision_recall"] = report_figures.precision_recall(histogram, point)
    return h.join(
        h.figure(run.figures["roc"], alt="ROC curve, malignant vs rest",
                 caption=f"ROC of malignant vs rest at every threshold on the {op.BINS}-bin score histogram; the "
                         "dot is the operating point."),
        h.figure(run.figures["precision_recall"], alt="precision-recall curve, malignant vs rest",
                 caption="Precision and recall of malignant; the dotted line is the malignant prevalence "
                         "(a model without skill)."))


def _calibration(run: _Run, histogram: op.ScoreHistogram | None, problem: str | None) -> h.Markup:
    if histogram is None:
        return h.notice(problem or "no score histogram")
    run.figures["calibration"] = report_figures.calibration(histogram)
    predicted, observed, sizes = op.calibration(histogram)
    rows = [[f"{p:.3f}", f"{o:.3f}", int(n)] for p, o, n in zip(predicted, observed, sizes, strict=True)]
    return h.join(
        h.figure(run.figures["calibration"], alt="calibration plot of P(malignant)",
                 caption="Observed malignant fraction against the mean predicted P(malignant) in ten equal "
                         "score ranges (marker area: images); on the diagonal a score means what it says."),
        h.collapsible("Calibration numbers", h.table(["mean predicted P(malignant)", "observed malignant fraction",
                                                      "images"], rows)))


def _hospitals(run: _Run) -> h.Markup:
    privacy, counts = run.privacy, _class_counts(run)
    outcomes = _reply_outcomes(run.rounds)
    test = counts.pop(TEST_ROW, None)
    names = sorted(set(privacy) | set(counts) | set(outcomes), key=_hospital_order)
    parts = []
    if run.simulation_problem:
        parts.append(h.notice(run.simulation_problem))
    if not names:
        parts.append(h.notice("metrics.json records no hospital (no privacy section, no replies)."))
    else:
        rows = []
        for name in names:
            p, c, o = privacy.get(name, {}), counts.get(name, {}), outcomes.get(name, {})
            rows.append([name, _int(c.get("n_images")), *[_int(c.get(k)) for k in CLASS_NAMES],
                         _num(p.get("epsilon"), 2), _num(p.get("epsilon_own_noise"), 2), _delta(p.get("delta")),
                         _num(p.get("noise_multiplier"), 3), _int(p.get("steps")), _int(p.get("last_round")),
                         _int(p.get("refusals", o.get("refused", 0))), _int(o.get("rejected", 0)),
                         _int(o.get("failed", 0))])
        if test is not None:
            rows.append([TEST_ROW, _int(test.get("n_images")), *[_int(test.get(k)) for k in CLASS_NAMES],
                         *[h.MISSING] * 9])
        parts.append(h.table(["hospital", "images", *CLASS_NAMES, "epsilon spent", "epsilon, own noise alone",
                              "delta", "noise multiplier", "DP steps", "last round", "refused", "rejected",
                              "failed"], rows,
                             caption="Images per class (simulations: from simulation.json), privacy spent "
                                     "(metrics.json privacy) and replies not aggregated, per hospital"))
        if any("epsilon_own_noise" in p for p in privacy.values()):
            parts.append(h.paragraph("With distributed noise over secure aggregation, 'epsilon spent' is that of "
                                     "the noise in the secure sum (what the coordinator sees); 'own noise alone' is "
                                     "what a hospital's own share gives if secure aggregation failed."))
    parts.append(_reply_table(run.rounds))
    return h.join(*parts)


def _reply_table(rounds: list[dict]) -> h.Markup:
    keys = ("sampled", "valid", "refused", "rejected", "failed", "missing")
    totals = {step: dict.fromkeys(keys, 0) for step in ("train", "evaluate")}
    notes: list[str] = []
    seen = False
    for r in rounds:
        replies = r.get("replies") if isinstance(r.get("replies"), dict) else {}
        for step, total in totals.items():
            report = replies.get(step)
            if not isinstance(report, dict):
                continue
            seen = True
            for key in keys:
                total[key] += report.get(key) if isinstance(report.get(key), int) else 0
            notes += [f"round {r.get('round')} {step}: {n}" for n in report.get("notes") or [] if n]
    if not seen:
        return h.notice("metrics.json records no reply counts.")
    parts = [h.table(["step", *keys], [[step, *[total[k] for k in keys]] for step, total in totals.items()],
                     caption=f"Replies over all {len(rounds)} rounds")]
    if notes:
        parts.append(h.collapsible(f"Replies not aggregated, with reasons ({len(notes)})", h.bullet_list(notes)))
    return h.join(*parts)


def _class_counts(run: _Run) -> dict[str, dict]:
    """Hospital name (as in metrics.json privacy) -> {n_images, normal, benign, malignant}, from simulation.json."""
    partitions = (run.simulation or {}).get("partitions")
    if not isinstance(partitions, dict):
        return {}
    out = {}
    for entry in partitions.get("hospitals") or []:
        if isinstance(entry, dict) and "partition" in entry:
            out[f"partition-{entry['partition']}"] = _counts_row(entry)
    if isinstance(partitions.get("test"), dict):
        out[TEST_ROW] = _counts_row(partitions["test"])
    return out


def _counts_row(entry: dict) -> dict:
    classes = entry.get("class_counts") if isinstance(entry.get("class_counts"), dict) else {}
    return {"n_images": entry.get("n_images"), **{k: classes.get(k) for k in CLASS_NAMES}}


def _reply_outcomes(rounds: list[dict]) -> dict[str, dict[str, int]]:
    """Hospital -> {refused, rejected, failed} counted from the reply notes ("<hospital>: <outcome>: <why>")."""
    out: dict[str, dict[str, int]] = {}
    for r in rounds:
        replies = r.get("replies") if isinstance(r.get("replies"), dict) else {}
        for report in replies.values():
            notes = report.get("notes") if isinstance(report, dict) else None
            for note in notes if isinstance(notes, list) else []:
                hospital, _, rest = str(note).partition(": ")
                outcome = rest.partition(": ")[0]
                if outcome in ("refused", "rejected", "failed"):
                    entry = out.setdefault(hospital, {"refused": 0, "rejected": 0, "failed": 0})
                    entry[outcome] += 1
    return out


def _partitions(run: _Run) -> h.Markup:
    path = run.path / PARTITION_PLOT
    if not path.is_file():
        return h.notice(f"No {PARTITION_PLOT} in this run directory (simulations draw one; a deployment has no "
                        f"central view of the hospitals' data).")
    try:
        return h.figure(path.read_bytes(), alt="partition plot: images per class and tissue per hospital",
                        caption="How the data set was cut into hospitals: images per class and per background "
                                "tissue, and patients per hospital.")
    except (OSError, ValueError) as error:
        return h.notice(f"{PARTITION_PLOT} could not be embedded: {error}", warning=True)


def _explanations(run: _Run) -> h.Markup:
    """The federated explanations' pooled localisation numbers (``server.federated_explanations``)."""
    section = run.document.get("explanations")
    if not isinstance(section, dict):
        return h.notice("No federated explanations in this run (run config explain-methods was empty, or the run "
                        "did not finish).")
    if section.get("error"):
        return h.notice(f"Federated explanations failed: {_text(section['error'])}", warning=True)
    per_method = section.get("per_method") if isinstance(section.get("per_method"), dict) else {}
    rows = [[name, _rate(rates, "pointing_game"), _rate(rates, "mass_inside"), _rate(rates, "random_baseline")]
            for name, rates in per_method.items() if isinstance(rates, dict)]
    hospitals = section.get("hospitals") if isinstance(section.get("hospitals"), dict) else {}
    parts = [h.paragraph(
        f"After the last round every hospital explained the final model on its own validation images that carry "
        f"a lesion annotation ({_text(section.get('images'))} images in all) and kept the heatmaps; only these "
        "counts came back. Pointing game: share of images whose heatmap maximum lies inside the lesion; mass "
        "inside: mean share of the heatmap's positive mass inside the lesion (both within the breast); random "
        "baseline: mean lesion share of the breast, what a map without information scores on both."),
        h.table(["method", "pointing game", "mass inside lesion", "random baseline"], rows)]
    parts.append(h.table(["hospital", "images explained or error"],
                         [[name, _text(entry.get("images", entry.get("error")))] for name, entry in hospitals.items()
                          if isinstance(entry, dict)]))
    return h.join(*parts)


def _rate(rates: dict, key: str) -> float | None:
    value = rates.get(key)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _gallery(run: _Run) -> h.Markup:
    folder = run.path / GALLERY_DIR
    index = folder / GALLERY_INDEX
    if not index.is_file():
        return h.notice(f"No {GALLERY_DIR}/{GALLERY_INDEX} in this run directory. The gallery of test "
                        "predictions with heatmap overlays is made for simulations on public data only.")
    try:
        entries = json.loads(index.read_text())
        if not isinstance(entries, list):
            raise ValueError("expected a JSON list")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return h.notice(f"{GALLERY_DIR}/{GALLERY_INDEX} is not usable: {error}", warning=True)
    figures, problems = [], []
    for k, entry in enumerate(entries):
        problem = _gallery_problem(entry, folder)
        if problem:
            problems.append(f"entry {k}: {problem}")
            continue
        try:
            figures.append(h.figure((folder / entry["file"]).read_bytes(), alt=f"prediction overlay {entry['file']}",
                                    caption=_gallery_caption(entry)))
        except (OSError, ValueError) as error:
            problems.append(f"entry {k} ({entry['file']}): {error}")
    parts = [h.paragraph(f"{len(figures)} test images with the model's heatmap over them; true class, P(malignant) "
                         "and the decision at the operating point under each.")]
    if figures:
        parts.append(h.gallery(figures))
    if problems:
        parts.append(h.notice(f"{len(problems)} gallery entries left out:", h.bullet_list(problems), warning=True))
    return h.join(*parts)


def _gallery_problem(entry: Any, folder: Path) -> str | None:
    if not isinstance(entry, dict):
        return "not a JSON object"
    name = entry.get("file")
    if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
        return f"'file' must be a plain file name inside {GALLERY_DIR}/, got {name!r}"
    if not (folder / name).is_file():
        return f"{GALLERY_DIR}/{name} not found"
    return None


def _gallery_caption(entry: dict) -> h.Markup:
    p = entry.get("p_malignant")
    score = f"{p:.2f}" if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) else "n/a"
    return h.join(h.strong(entry["file"]), f" · true: {_text(entry.get('label'))} · P(malignant) {score} · "
                  f"decision: {_text(entry.get('decision'))}")


def _model_card(run: _Run, point: op.OperatingPoint | None) -> h.Markup:
    config, privacy = run.config, run.privacy
    simulated = run.simulation is not None or bool(run.simulation_section)
    epsilons = [p["epsilon"] for p in privacy.values() if _is_number(p.get("epsilon"))]
    deltas = sorted({p["delta"] for p in privacy.values() if _is_number(p.get("delta"))})
    accountants = sorted({str(p["accountant"]) for p in privacy.values() if p.get("accountant")})
    own = [p["epsilon_own_noise"] for p in privacy.values() if _is_number(p.get("epsilon_own_noise"))]
    if config.get("dp") is False or any(p.get("dp") is False for p in privacy.values()):
        guarantee = h.join(h.strong("No differential privacy guarantee: "),
                           "this run trained without DP-SGD (dp = false).")
    elif epsilons:
        guarantee = h.join(
            "Sample-level (ε, δ)-differential privacy per hospital, DP-SGD (Opacus), ",
            h.strong(f"ε = {max(epsilons):.2f}"), " (largest over hospitals) at ",
            h.strong(f"δ = {', '.join(_delta(d) for d in deltas) or 'n/a'}"),
            f", accountant {', '.join(accountants) or 'n/a'}, noise multiplier "
            f"{_text(config.get('noise-multiplier'))}, clipping norm {_text(config.get('max-grad-norm'))}, "
            f"noise placement {_text(config.get('dp-mode'))}.",
            f" With distributed noise the guarantee holds while the coordinator sees only the secure sum; a "
            f"hospital's own noise alone gives ε = {max(own):.2f}." if own and max(own) > max(epsilons) else "")
    else:
        guarantee = h.notice("metrics.json records no ε (no privacy section): the guarantee cannot be stated.")
    data = _data_description(run, simulated)
    return h.definition_list([
        ("model", f"{_text(config.get('model'))}, {_text(config.get('image-size'))}-pixel preprocessed images, "
                  f"three classes ({', '.join(run.class_names)}); trained by {_text(config.get('strategy'))} "
                  f"over {len(run.rounds)} rounds."),
        ("intended use", "Research and teaching on federated, differentially private learning for mammography: "
                         "comparing training set-ups and studying model behaviour. Not for diagnosis, screening "
                         "of patients or any clinical decision."),
        ("data", data),
        ("decision", f"malignant when P(malignant) ≥ {op.threshold_text(point.threshold)} ({_rule(point)}), otherwise the more "
                     f"probable of normal and benign." if point is not None else
                     "argmax of the class probabilities (no operating point recorded)."),
        ("privacy guarantee", guarantee),
        ("limitations", h.bullet_list([
            "Not a medical device: not validated clinically, not approved for any clinical use.",
            "Screen-film data: mini-MIAS images are digitised film at reduced resolution; a model trained on them "
            "is not expected to carry over to today's digital mammography.",
            "Small data set: a few hundred images and few malignant cases, so the confidence intervals are wide "
            "and a single run's numbers vary with the seed and the split.",
            "Image-level labels from one public database; no patient-level follow-up, no demographic information, "
            "so performance in sub-populations is unknown.",
            "The operating point was chosen on validation data of the same source; sensitivity and specificity "
            "will differ elsewhere.",
        ])),
    ])


def _data_description(run: _Run, simulated: bool) -> str:
    if not simulated:
        return ("Each hospital's own mammograms, which never left the hospital; the coordinator saw only clipped, "
                "noised model updates and aggregate numbers.")
    config = run.config
    hospitals = (run.simulation or {}).get("num-hospitals", run.simulation_section.get("num-hospitals"))
    limit = config.get("sim-max-patients")
    used = f", {limit} patients used" if _is_number(limit) and limit > 0 else ""
    return (f"Simulation: the public mini-MIAS database (digitised screen-film mammograms, 322 images of 161 "
            f"patients) cut by patient into {_text(hospitals)} virtual hospitals (partition scheme "
            f"{_text(config.get('sim-partition'))}{used}); {_text(config.get('sim-test-fraction'))} of the patients "
            f"held out for testing.")


# ---------------------------------------------------------------- writing
def _write(run_dir: Path, text: str, figures: Mapping[str, bytes]) -> None:
    """Replace ``figures/`` and ``report.html`` by the new ones, each through a temporary sibling."""
    staging = Path(tempfile.mkdtemp(dir=run_dir, prefix=".figures."))
    page_fd, page_tmp = tempfile.mkstemp(dir=run_dir, prefix=".report.", suffix=".tmp")
    target, old = run_dir / FIGURE_DIR, run_dir / f".figures.old.{os.getpid()}"
    try:
        os.chmod(staging, 0o755)
        for key, png in figures.items():
            (staging / FIGURE_FILES[key]).write_bytes(png)
        with os.fdopen(page_fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(page_tmp, 0o644)
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(staging, target)
        except OSError:
            if old.exists() and not target.exists():
                os.replace(old, target)  # put the previous figures back
            raise
        os.replace(page_tmp, run_dir / REPORT_FILE)
    finally:
        for leftover in (staging, old):
            if leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        Path(page_tmp).unlink(missing_ok=True)


# ---------------------------------------------------------------- formatting
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if _is_number(value) else h.MISSING


def _int(value: Any) -> str:
    return str(int(value)) if _is_number(value) and float(value).is_integer() else h.MISSING


def _delta(value: Any) -> str:
    return f"{value:.0e}" if _is_number(value) else h.MISSING


def _text(value: Any) -> str:
    return h.MISSING if value is None or value == "" else str(value)


def _first(*values: Any) -> Any:
    return next((v for v in values if _is_number(v)), None)


def _interval(ci: tuple[float, float] | None) -> str:
    return h.MISSING if ci is None else f"{ci[0]:.3f} – {ci[1]:.3f}"


def _replies(report: dict) -> str:
    if not report:
        return h.MISSING
    return f"{_int(report.get('valid'))}/{_int(report.get('sampled'))}"


def _rule(point: op.OperatingPoint) -> str:
    if point.rule == "sensitivity":
        return f"highest threshold with sensitivity ≥ {_num(point.target, 2)}"
    if point.rule == "youden":
        return "Youden's J (sensitivity + specificity - 1 largest)"
    return _text(point.rule)


def _source(source: Any) -> str:
    return {"centralised-test": "the held-out test set (centralised evaluation)",
            "federated": "the hospitals' validation splits (federated evaluation)"}.get(source, _text(source))


def _dp_summary(config: dict) -> str:
    if config.get("dp") is False:
        return "off (no privacy guarantee)"
    if config.get("dp") is None:
        return h.MISSING
    return (f"on: noise multiplier {_text(config.get('noise-multiplier'))}, clip {_text(config.get('max-grad-norm'))}, "
            f"δ {_delta(config.get('delta'))}, {_text(config.get('dp-mode'))} noise")


def _version(run: _Run) -> str:
    versions = run.document.get("versions") if isinstance(run.document.get("versions"), dict) else {}
    return _text(versions.get("mammo-fl"))


def _hospital_order(name: str) -> tuple[str, int, str]:
    prefix, _, number = name.rpartition("-")
    return (prefix, int(number), name) if number.isdigit() else (name, -1, name)
