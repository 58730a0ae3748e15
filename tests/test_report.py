"""report.html and its figures, built from hand-written run directories (tests/sample_run.py)."""

from __future__ import annotations

import base64
import html
import io
import json
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from common import html_page as h
from common import operating_point as op
from server import report_figures
from server.report import FIGURE_FILES, ReportError, build_report
from simulations.cli import app as sim_app
from sample_run import HOSTILE, write_gallery, write_sample_run

SECTIONS = ["run", "training-curves", "final-metrics", "confusion-matrix-at-the-operating-point",
            "roc-and-precision-recall", "calibration", "hospitals", "partitions", "explanations-at-the-hospitals",
            "gallery-of-test-predictions",
            "model-card"]
PNG = b"\x89PNG\r\n\x1a\n"


class _Page(HTMLParser):
    """Section bodies by id, and every <img> with its attributes."""

    def __init__(self):
        super().__init__()
        self.images: list[dict] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs))


def sections(html_text: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)">(.*?)</section>', html_text, flags=re.S))


def images(html_text: str) -> list[dict]:
    parser = _Page()
    parser.feed(html_text)
    return parser.images


def embedded(image: dict) -> bytes:
    return base64.b64decode(image["src"].removeprefix("data:image/png;base64,"))


def text_of(fragment: str) -> str:
    """Visible text of an HTML fragment, whitespace collapsed, entities decoded."""
    return html.unescape(" ".join(re.sub(r"<[^>]+>", " ", fragment).split()))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    sample = write_sample_run(tmp_path_factory.mktemp("run") / "run")
    path = build_report(sample.path)
    return sample, path, path.read_text(encoding="utf-8")


def test_report_has_every_section_in_order_and_embeds_every_figure(built):
    sample, path, text = built
    assert path == sample.path / "report.html"
    assert list(sections(text)) == SECTIONS
    written = {p.name: p.read_bytes() for p in (sample.path / "figures").iterdir()}
    assert sorted(written) == sorted(FIGURE_FILES.values())
    pictures = [embedded(i) for i in images(text)]
    assert len(pictures) == len(FIGURE_FILES) + 1 + 3  # figures, partition plot, three gallery images
    assert all(p.startswith(PNG) for p in pictures)
    for png in written.values():
        assert png in pictures  # the files under figures/ are exactly the embedded figures
    assert (sample.path / "partitions.png").read_bytes() in pictures
    for name in ("test-00.png", "test-01.png", "test-02.png"):
        assert (sample.path / "gallery" / name).read_bytes() in pictures
    assert not re.search(r"(src|href)=\"(https?:|//)", text) and "<script" not in text
    assert not [p for p in sample.path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_final_metrics_show_the_values_and_bootstrap_intervals_of_the_score_histogram(built):
    sample, _, text = built
    body = text_of(sections(text)["final-metrics"])
    threshold = sample.point.threshold

    def interval(statistic) -> str:
        low, high = op.bootstrap_interval(sample.histogram, statistic, resamples=1000, seed=0)
        return f"{low:.3f} – {high:.3f}"

    counts = op.counts_at(sample.histogram, threshold)
    auc = sample.document["final"]["auc_malignant"]
    assert f"AUC malignant vs rest {auc:.3f} {interval(op.auc)}" in body
    assert (f"sensitivity (recall, malignant) at the operating point {counts.sensitivity:.3f} "
            f"{interval(lambda s: op.counts_at(s, threshold).sensitivity)}") in body
    assert (f"specificity (malignant vs rest) at the operating point {counts.specificity:.3f} "
            f"{interval(lambda s: op.counts_at(s, threshold).specificity)}") in body
    assert (f"precision (malignant) at the operating point {counts.precision:.3f} "
            f"{interval(lambda s: op.counts_at(s, threshold).precision)}") in body
    assert f"accuracy, three classes at the operating point {sample.at_point['accuracy']:.3f} n/a" in body
    assert f"AUC from the score histogram (100 bins; ties within a bin count one half): " \
           f"{op.auc(sample.histogram):.3f}" in body
    assert "100 images, after round 3" in body
    # the histogram's numbers at the threshold are those of the raw scores (threshold on a bin edge)
    positive = sample.labels == 2
    called = sample.probs[:, 2] >= threshold
    assert counts.sensitivity == (called & positive).sum() / positive.sum()


def test_confusion_matrix_and_operating_point_are_shown(built):
    sample, _, text = built
    body = sections(text)["confusion-matrix-at-the-operating-point"]
    plain = text_of(body)
    assert f"threshold on P(malignant) {op.threshold_text(sample.point.threshold)}" in plain
    assert "highest threshold with sensitivity ≥ 0.80" in plain
    assert "federated validation (3 hospitals, 100 images)" in plain
    matrix = sample.at_point["confusion_matrix"]
    for name, row in zip(("normal", "benign", "malignant"), matrix, strict=True):
        assert f"true {name} {row[0]} {row[1]} {row[2]} {sum(row)}" in plain
    assert matrix != sample.document["final"]["confusion_matrix"]  # not the argmax one
    picture = embedded(images(body)[0])
    assert picture == (sample.path / "figures" / "confusion-matrix.png").read_bytes()


def test_hospitals_table_privacy_and_model_card(built):
    _, _, text = built
    parts = sections(text)
    hospitals = text_of(parts["hospitals"])
    assert "partition-0 33 20 8 5 4.50 9.25 1e-05 1.100 30 3 0 0 0" in hospitals
    assert "partition-2 34 19 9 6 6.50 11.25 1e-05 1.100 30 3 1 0 0" in hospitals
    assert "test (held out) 100 60 25 15" in hospitals
    assert "train 9 8 1 0 0 0" in hospitals and "evaluate 9 9 0 0 0 0" in hospitals
    assert "round 3 train: partition-2: refused: budget exhausted" in hospitals
    card = text_of(parts["model-card"])
    assert "ε = 6.50 (largest over hospitals) at δ = 1e-05" in card
    assert "accountant rdp" in card and "own noise alone gives ε = 11.25" in card
    for phrase in ("Not a medical device", "Screen-film data", "Small data set", "Not for diagnosis"):
        assert phrase in card
    gallery = text_of(parts["gallery-of-test-predictions"])
    assert "test-01.png · true: malignant · P(malignant) 0.81 · decision: malignant" in gallery


def test_hostile_strings_from_the_run_directory_are_shown_as_text(tmp_path):
    sample = write_sample_run(tmp_path / "run", hostile=True)
    text = build_report(sample.path).read_text(encoding="utf-8")
    assert "<script" not in text and "onerror=alert(1)>" not in text
    escaped = h.escape(HOSTILE)
    parts = sections(text)
    assert escaped in parts["run"]  # the run's error
    assert escaped in parts["hospitals"]  # a hospital name and a reply note
    assert escaped in parts["gallery-of-test-predictions"]  # a gallery decision
    assert len(images(text)) == len(FIGURE_FILES) + 1 + 3  # no extra <img> from the strings
    assert "This run failed" in text_of(parts["run"])


def test_an_older_run_without_histogram_or_operating_point_still_gets_a_report(tmp_path):
    sample = write_sample_run(tmp_path / "run", with_operating_point=False, with_gallery=False,
                              with_partitions=False)
    document = json.loads((sample.path / "metrics.json").read_text())
    del document["final"]["score_histogram"]
    (sample.path / "metrics.json").write_text(json.dumps(document))
    text = build_report(sample.path).read_text(encoding="utf-8")
    parts = sections(text)
    assert list(parts) == SECTIONS
    for key in ("final-metrics", "roc-and-precision-recall", "calibration"):
        assert "has no final.score_histogram" in parts[key]
    confusion = text_of(parts["confusion-matrix-at-the-operating-point"])
    assert "has no final.operating_point" in confusion and "confusion matrix (argmax decisions)" in confusion
    argmax = document["final"]["confusion_matrix"]
    assert f"true normal {argmax[0][0]} {argmax[0][1]} {argmax[0][2]} {sum(argmax[0])}" in confusion
    assert "No partitions.png" in parts["partitions"] and "No gallery/gallery.json" in parts["gallery-of-test-"
                                                                                            "predictions"]
    assert "argmax of the class probabilities" in text_of(parts["model-card"])
    assert sorted(p.name for p in (sample.path / "figures").iterdir()) == ["confusion-matrix.png",
                                                                            "round-curves.png"]


def test_a_run_that_just_started_gets_a_report_that_says_what_is_missing(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({"format": "mammofl-run/1", "status": "running",
                                                       "error": None, "rounds": [], "final": None,
                                                       "privacy": {}, "config": {"dp": False}}))
    text = build_report(tmp_path).read_text(encoding="utf-8")
    parts = sections(text)
    assert list(parts) == SECTIONS
    assert "No round recorded" in parts["training-curves"]
    assert "no final metrics" in parts["final-metrics"]
    assert "records no hospital" in parts["hospitals"]
    assert "No differential privacy guarantee" in text_of(parts["model-card"])
    assert "is still running" in text_of(parts["run"])
    assert list((tmp_path / "figures").iterdir()) == []


def test_unusable_inputs_are_reported_in_their_section(tmp_path):
    sample = write_sample_run(tmp_path / "run", with_gallery=False)
    document = json.loads((sample.path / "metrics.json").read_text())
    document["final"]["score_histogram"]["counts"] = [[1, 2], [3, 4]]
    document["final"]["operating_point"]["threshold"] = "high"
    (sample.path / "metrics.json").write_text(json.dumps(document))
    (sample.path / "simulation.json").write_text("{not json")
    write_gallery(sample.path, [("malignant", 0.9, "malignant")],
                  extra=[{"file": "../metrics.json", "label": "x"}, {"file": "absent.png"}, "not an object",
                         {"file": "fake.png"}])
    (sample.path / "gallery" / "fake.png").write_bytes(b"GIF89a not a png")
    text = build_report(sample.path).read_text(encoding="utf-8")
    parts = sections(text)
    assert "final.score_histogram in metrics.json is not usable: score histogram must have shape (3, 2, 100), " \
           "got (2, 2)" in parts["final-metrics"]
    assert "final.operating_point in metrics.json is not usable" in parts["confusion-matrix-at-the-operating-point"]
    assert "simulation.json is not readable JSON" in parts["hospitals"]
    gallery = text_of(parts["gallery-of-test-predictions"])
    assert "4 gallery entries left out" in gallery
    assert "entry 1: 'file' must be a plain file name inside gallery/, got '../metrics.json'" in gallery
    assert "entry 2: gallery/absent.png not found" in gallery
    assert "entry 3: not a JSON object" in gallery
    assert "entry 4 (fake.png): not a PNG image" in gallery
    assert len(images(parts["gallery-of-test-predictions"])) == 1


def test_values_of_the_wrong_type_never_crash_the_report(tmp_path):
    junk = {"format": "mammofl-run/1", "status": 3, "error": ["x"], "simulation": "x", "config": [],
            "rounds": [{"round": "one"}, {"round": 1, "train_loss": "abc", "epsilon_max": True, "replies": "x",
                                          "federated_eval": {"eval_loss": "high", "auc_malignant": None}}, 7],
            "final": {"confusion_matrix": [["a", "b", "c"]] * 3, "score_histogram": "x", "operating_point": [],
                      "at_operating_point": "x", "class_names": "normal"},
            "privacy": {"partition-0": {"epsilon": "a lot", "delta": None}, "partition-1": "x"}}
    (tmp_path / "metrics.json").write_text(json.dumps(junk))
    text = build_report(tmp_path).read_text(encoding="utf-8")
    parts = sections(text)
    assert list(parts) == SECTIONS
    assert "rounds recorded 1 of n/a" in text_of(parts["run"])
    assert "the confusion matrix in metrics.json is not usable" in parts["confusion-matrix-at-the-operating-point"]
    assert "partition-0 n/a" in text_of(parts["hospitals"])
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == ["round-curves.png"]


def test_without_metrics_json_there_is_no_report(tmp_path):
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'metrics.json'}: not found")):
        build_report(tmp_path)
    (tmp_path / "metrics.json").write_text("[1, 2")
    with pytest.raises(ReportError, match="metrics.json: not readable JSON"):
        build_report(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_a_failure_while_building_leaves_the_previous_report_and_no_temporary_files(tmp_path, monkeypatch):
    sample = write_sample_run(tmp_path / "run", with_gallery=False)
    before = {p.name for p in sample.path.iterdir()}

    def broken(*_args, **_kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(report_figures, "roc", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        build_report(sample.path)
    assert {p.name for p in sample.path.iterdir()} == before  # no report, no figures/, no temporary
    monkeypatch.undo()
    page = build_report(sample.path)
    first = page.read_bytes()
    figures = {p.name: p.read_bytes() for p in (sample.path / "figures").iterdir()}
    monkeypatch.setattr(report_figures, "roc", broken)
    with pytest.raises(RuntimeError):
        build_report(sample.path)
    assert page.read_bytes() == first
    assert {p.name: p.read_bytes() for p in (sample.path / "figures").iterdir()} == figures
    assert {p.name for p in sample.path.iterdir()} == before | {"report.html", "figures"}


def test_a_rebuild_replaces_the_figures_and_drops_stale_ones(tmp_path):
    sample = write_sample_run(tmp_path / "run", with_gallery=False)
    build_report(sample.path)
    assert (sample.path / "figures" / "roc.png").is_file()
    document = json.loads((sample.path / "metrics.json").read_text())
    del document["final"]["score_histogram"]
    (sample.path / "metrics.json").write_text(json.dumps(document))
    build_report(sample.path)
    assert not (sample.path / "figures" / "roc.png").exists()
    assert (sample.path / "figures" / "round-curves.png").is_file()


def test_cli_rebuilds_the_report_and_prints_its_path(tmp_path):
    sample = write_sample_run(tmp_path / "run", with_gallery=False, with_partitions=False)
    runner = CliRunner()
    done = runner.invoke(sim_app, ["report", str(sample.path)])
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == str(sample.path / "report.html")
    assert (sample.path / "report.html").is_file()
    refused = runner.invoke(sim_app, ["report", str(tmp_path / "nothing")])
    assert refused.exit_code == 2
    assert "metrics.json: not found" in refused.output


# ---------------------------------------------------------------- figures
def pixels(png: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"))


def colour_count(png: bytes, hex_colour: str) -> int:
    rgb = tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))
    return int(np.all(pixels(png) == rgb, axis=-1).sum())


def test_round_curves_are_deterministic_and_sized():
    rounds = [{"round": r, "train_loss": 1.0 / r, "epsilon_max": r * 0.5,
               "federated_eval": {"eval_loss": 0.9, "auc_malignant": 0.6}} for r in (1, 2, 3)]
    first, second = report_figures.round_curves(rounds), report_figures.round_curves(rounds)
    assert first.startswith(PNG) and first == second
    assert pixels(first).shape == (640, 1000, 3)  # 10 x 6.4 inches at 100 dpi
    assert colour_count(first, report_figures.EPSILON_COLOUR) > 100
    assert colour_count(first, report_figures.CENTRALISED_COLOUR) == 0  # no centralised evaluation recorded


def test_roc_marks_the_operating_point_only_when_given():
    labels = np.repeat([0, 1, 2], [30, 10, 10])
    probs = np.tile([0.5, 0.3, 0.2], (50, 1))
    probs[labels == 2] = [0.1, 0.1, 0.8]
    histogram = op.ScoreHistogram.of(labels, probs)
    point = op.choose_operating_point(histogram, rule="youden")
    with_point = report_figures.roc(histogram, point)
    without = report_figures.roc(histogram)
    assert colour_count(with_point, report_figures.CENTRALISED_COLOUR) > 20
    assert colour_count(without, report_figures.CENTRALISED_COLOUR) == 0
    assert report_figures.precision_recall(histogram, point).startswith(PNG)
    assert report_figures.calibration(histogram).startswith(PNG)


def test_confusion_matrix_figure_refuses_a_matrix_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"shape \(2, 2\) for 3 classes"):
        report_figures.confusion_matrix([[1, 2], [3, 4]], ["normal", "benign", "malignant"], title="t")


def test_building_a_report_never_touches_pyplot(tmp_path):
    sample = write_sample_run(tmp_path / "run", with_gallery=False, with_partitions=False)
    code = ("import sys; from server.report import build_report; "
            f"build_report({str(sample.path)!r}); "
            "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-3000:]


def test_federated_explanations_are_tabulated_per_method_and_hospital(tmp_path):
    sample = write_sample_run(tmp_path / "run", hostile=True)
    parts = sections(build_report(sample.path).read_text(encoding="utf-8"))
    text = text_of(parts["explanations-at-the-hospitals"])
    assert "cell_scores 0.625 0.312 0.043" in text and "grad_cam 0.375 0.250 0.043" in text
    assert "partition-1 5" in text and "(8 images in all)" in text
    assert HOSTILE not in parts["explanations-at-the-hospitals"]  # escaped, never raw markup
    document = json.loads((sample.path / "metrics.json").read_text())
    del document["explanations"]
    (sample.path / "metrics.json").write_text(json.dumps(document))
    parts = sections(build_report(sample.path).read_text(encoding="utf-8"))
    assert "No federated explanations in this run" in text_of(parts["explanations-at-the-hospitals"])
