"""Screening with a real bundle: rows for every file, probabilities equal to the one inference path, heatmaps,
atomic output, refused bundles and the command line."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from client.cli import app
from client.dataset_scan import scan_folder
from client.readers.images import read_image
from client.screening import (
    COLUMNS,
    METADATA_REASON,
    SCORED,
    SKIPPED,
    OutputExists,
    ScreenRow,
    read_predictions,
    screen,
    write_predictions,
)
from common.bundle import BundleError, BundleMeta, save_bundle
from common.inference import Predictor
from common.models import ModelConfig, build_model
from common.operating_point import OperatingPoint
from common.overlay import CIRCLE_COLOUR
from common.preprocessing import PreprocessConfig
from common.records import CLASS_NAMES
from common.weights import exchanged_weights
from signed_files import TRUSTED, bundle_signature, resign
from simulations.presets import resolve

POINT = OperatingPoint(threshold=0.3, rule="sensitivity", target=0.9, sensitivity=0.9, specificity=0.4,
                       source="test validation")
MAMMOGRAMS = {"1-281.dcm": ("L", "MLO"), "1-282.dcm": ("R", "CC"), "MG1_J2KI": ("L", "MLO"),
              "MG1_JPLY": ("L", "MLO")}
MIAS_FILES = ("mdb003.png", "mdb004.png", "mdb005.png")  # normal right, normal left, right with two lesion circles


def make_bundle(path: Path, config: ModelConfig, preprocess: PreprocessConfig, *, point: OperatingPoint | None,
                seed: int = 0) -> Path:
    torch.manual_seed(seed)
    info = {"operating_point": point.to_json()} if point is not None else {}
    return save_bundle(path, exchanged_weights(build_model(config)), BundleMeta(config, preprocess, info=info),
                       sign=bundle_signature())


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory) -> Path:
    """A small model (64-px images): the model costs nothing, so the tests measure the screening around it."""
    return make_bundle(tmp_path_factory.mktemp("bundle") / "cnn.mammofl", ModelConfig(kind="cnn", image_size=64),
                       PreprocessConfig(size=64), point=POINT)


@pytest.fixture(scope="module")
def demo_bundle(tmp_path_factory) -> Path:
    """The demo preset's model (frozen EfficientNet-Lite0 features + cell head), untrained head."""
    run = resolve("demo").run
    return make_bundle(tmp_path_factory.mktemp("bundle") / "demo.mammofl", run.model_config(),
                       run.preprocess_config(), point=POINT)


@pytest.fixture()
def mias_subset(tmp_path, mias_dir) -> Path:
    folder = tmp_path / "mias"
    folder.mkdir()
    for name in ("Info.txt", "Licence.txt", *MIAS_FILES):
        shutil.copy(mias_dir / name, folder / name)
    return folder


def png(path: Path) -> np.ndarray:
    image = Image.open(io.BytesIO(path.read_bytes()))
    assert image.format == "PNG"
    return np.asarray(image)


def test_mini_mias_subset_matches_the_inference_path(tmp_path, mias_subset, cnn_bundle):
    predictor = Predictor.from_bundle(cnn_bundle, trusted=TRUSTED)
    done = []
    summary = screen(predictor, [mias_subset], tmp_path / "out", batch_size=2, progress=done.append)
    rows = read_predictions(tmp_path / "out" / "predictions.csv")
    prefix = mias_subset.as_posix()
    assert [row.file for row in rows] == [f"{prefix}/{name}" for name in ("Info.txt", "Licence.txt", *MIAS_FILES)]
    assert [(row.status, row.reason) for row in rows[:2]] == [(SKIPPED, METADATA_REASON)] * 2
    scored = rows[2:]
    assert [(r.status, r.laterality, r.view, r.breast_side) for r in scored] == [
        (SCORED, "R", "", "right"), (SCORED, "L", "", "left"), (SCORED, "R", "", "right")]
    for row in scored:  # the CSV holds what Predictor gives for the file read by the same reader
        pixels = read_image(Path(row.file)).pixels
        reference = predictor.predict_pixels(pixels, breast_side=row.breast_side)
        np.testing.assert_allclose(row.probabilities, reference.probabilities, rtol=0, atol=5e-7)
        assert row.decision == reference.decision_name == CLASS_NAMES[int(predictor.decide(reference.probabilities)[0])]
        assert row.decision_rule == "p_malignant>=0.3"
    assert sum(done) == 5 and done == [1, 1, 2, 1]  # two metadata rows, then batches of 2 and 1
    assert (summary.n_files, summary.n_scored, summary.n_skipped) == (5, 3, 2)
    assert summary.decisions == {name: sum(r.decision == name for r in scored) for name in CLASS_NAMES}
    # one overlay per scored image, lesion circles only on mdb005 (the only one with circles)
    assert sorted(p.name for p in (tmp_path / "out" / "heatmaps").iterdir()) == [
        "0003_mdb003.png.png", "0004_mdb004.png.png", "0005_mdb005.png.png"]
    for row in scored:
        image = png(tmp_path / "out" / row.heatmap)
        assert image.shape[0] == 28 + 768  # title band + the 1024-px image shown at 768 px
        has_circle = (image == CIRCLE_COLOUR).all(axis=2).sum() > 100
        assert has_circle == row.file.endswith("mdb005.png")
    report = (tmp_path / "out" / "report.html").read_text()
    assert report.count('<img src="data:image/png;base64,') == 3 and "p_malignant&gt;=0.3" in report
    assert "heatmaps/0005_mdb005.png.png" in report  # the full-size overlay is named beside its row
    assert [p.name for p in tmp_path.iterdir()] == [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]


def test_argmax_without_operating_point_and_no_heatmaps(tmp_path, mias_dir):
    bundle = make_bundle(tmp_path / "argmax.mammofl", ModelConfig(kind="cnn", image_size=64),
                         PreprocessConfig(size=64), point=None, seed=3)
    predictor = Predictor.from_bundle(bundle, trusted=TRUSTED)
    files = [mias_dir / "mdb006.png", mias_dir / "mdb008.png", mias_dir / "mdb006.png"]  # one file given twice
    summary = screen(predictor, files, tmp_path / "out", heatmaps=False)
    rows = read_predictions(tmp_path / "out" / "predictions.csv")
    assert [row.file for row in rows] == [files[0].as_posix(), files[1].as_posix()]
    for row in rows:
        assert row.decision_rule == "argmax" and row.heatmap == ""
        assert row.decision == CLASS_NAMES[int(np.argmax(row.probabilities))]
        side = predictor.preprocess(read_image(Path(row.file)).pixels).breast_side
        assert (row.laterality, row.breast_side) == ("", side)  # a lone PNG: no header, side from the pixels
    assert not (tmp_path / "out" / "heatmaps").exists() and summary.decision_rule == "argmax"


def test_csv_schema_round_trip(tmp_path):
    rows = [ScreenRow(file="a/b.dcm", status=SCORED, laterality="L", view="CC", breast_side="left",
                      probabilities=(0.25, 0.5, 0.25), decision="benign", decision_rule="p_malignant>=0.30",
                      heatmap="heatmaps/0001_b.dcm.png"),
            ScreenRow(file="a/notes, v2.txt", status=SKIPPED, reason='not an image file ("quoted")')]
    write_predictions(tmp_path / "p.csv", rows)
    text = (tmp_path / "p.csv").read_text()
    assert text.splitlines()[0] == ",".join(COLUMNS)
    assert text.splitlines()[1] == "a/b.dcm,scored,,L,CC,left,0.250000,0.500000,0.250000,benign,p_malignant>=0.30," \
                                   "heatmaps/0001_b.dcm.png"
    assert read_predictions(tmp_path / "p.csv") == rows
    (tmp_path / "bad.csv").write_text("file,status\nx,scored\n")
    with pytest.raises(ValueError, match="predictions.csv columns"):
        read_predictions(tmp_path / "bad.csv")


def test_output_is_refused_replaced_and_inputs_checked(tmp_path, mias_dir, cnn_bundle):
    predictor = Predictor.from_bundle(cnn_bundle, trusted=TRUSTED)
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    with pytest.raises(OutputExists, match="exists and is not empty"):
        screen(predictor, [mias_dir / "mdb001.png"], out)
    with pytest.raises(FileNotFoundError, match=r"no such file or folder: .*gone\.png, .*gone_dir"):
        screen(predictor, [tmp_path / "gone.png", mias_dir / "mdb001.png", tmp_path / "gone_dir"], out,
               overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    screen(predictor, [mias_dir / "mdb001.png"], out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["heatmaps", "predictions.csv", "report.html"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging folder left behind


def public_key(folder: Path) -> Path:
    """The tests' public key as a hospital receives it (trusted.pub)."""
    path = folder / "trusted.pub"
    path.write_bytes(TRUSTED.to_pem())
    return path


def _tampered(tmp_path: Path, bundle: Path, **changes) -> Path:
    payload = torch.load(bundle, weights_only=True)
    meta = json.loads(payload["meta"])
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            meta[section][field] = value
        else:
            meta[section] = value
    payload["meta"] = json.dumps(meta)
    path = tmp_path / f"tampered-{len(list(tmp_path.iterdir()))}.mammofl"
    torch.save(payload, path)
    return resign(path)  # signed as it now is: what is refused here is the content, not the signature


def test_cli_refuses_bundles_it_cannot_use(tmp_path, mias_dir, cnn_bundle):
    image = str(mias_dir / "mdb001.png")
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    cases = {
        resign(foreign): "format None, expected 'mammofl-bundle/1'",
        _tampered(tmp_path, cnn_bundle, preprocess_fingerprint="0" * 64): "made with another preprocessing",
        _tampered(tmp_path, cnn_bundle, preprocess_config__gamma=2.0): "fields this version does not know",
    }
    runner = CliRunner()
    for bundle, message in cases.items():
        with pytest.raises(BundleError):
            Predictor.from_bundle(bundle, trusted=TRUSTED)
        result = runner.invoke(app, ["screen", "--model", str(bundle), "--public-key", str(public_key(tmp_path)),
                                     image, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, result.output
        assert "cannot use the model" in result.stderr and message in " ".join(result.stderr.split())
        assert not (tmp_path / "o").exists()


def test_cli_json_exit_codes_and_table(tmp_path, mias_dir, dicom_dir, cnn_bundle):
    runner = CliRunner()
    args = ["screen", "--model", str(cnn_bundle), "--public-key", str(public_key(tmp_path)),
            str(mias_dir / "mdb002.png"), str(dicom_dir / "CT1_J2KI"),
            "--out", str(tmp_path / "o"), "--batch-size", "1"]
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert (summary["n_files"], summary["n_scored"], summary["n_skipped"]) == (2, 1, 1)
    assert summary["skipped"] == [{"file": (dicom_dir / "CT1_J2KI").as_posix(),
                                   "reason": "not a breast image (Modality CT, BodyPartExamined missing)"}]
    assert summary["decision_rule"] == "p_malignant>=0.3" and summary["operating_point"] == POINT.to_json()
    assert summary["predictions"] == str(tmp_path / "o" / "predictions.csv")
    again = runner.invoke(app, [*args, "--json"])
    assert again.exit_code == 2 and "not empty" in again.stderr and again.stdout == ""
    table = runner.invoke(app, [*args, "--overwrite"], env={"COLUMNS": "200"})
    assert table.exit_code == 0, table.stderr
    assert "scored: 1 of 2 files, skipped: 1" in table.stdout and "files not scored" in table.stdout
    missing = runner.invoke(app, ["screen", "--model", str(cnn_bundle), "--public-key", str(public_key(tmp_path)),
                                  str(tmp_path / "nope.dcm"), "--out", str(tmp_path / "o2")])
    assert missing.exit_code == 2 and f"no such file or folder: {tmp_path / 'nope.dcm'}" in missing.stderr
    no_model = runner.invoke(app, ["screen", "--model", str(tmp_path / "none.mammofl"), "--public-key",
                                   str(public_key(tmp_path)), str(mias_dir / "mdb002.png"), "--out",
                                   str(tmp_path / "o2")])
    assert no_model.exit_code == 2 and "no such model bundle" in no_model.stderr


@pytest.mark.slow
def test_dicom_folder_with_the_demo_model(tmp_path, dicom_dir, demo_bundle):
    """The 4 mammograms scored with their header's laterality and view, every other file with the reason
    check-data gives; 17 rows in all (15 DICOM files + INVENTORY.md + SHA256SUMS)."""
    runner = CliRunner()
    result = runner.invoke(app, ["screen", "--model", str(demo_bundle), "--public-key", str(public_key(tmp_path)),
                                 str(dicom_dir), "--out", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    rows = {Path(row.file).name: row for row in read_predictions(tmp_path / "o" / "predictions.csv")}
    assert len(rows) == 17 == summary["n_files"] and summary["n_scored"] == 4
    scored = {name: (row.laterality, row.view) for name, row in rows.items() if row.status == SCORED}
    assert scored == MAMMOGRAMS
    expected_reasons = {item.file: item.reason for item in scan_folder(dicom_dir).skipped}
    assert {name: row.reason for name, row in rows.items() if row.status == SKIPPED} == expected_reasons
    predictor = Predictor.from_bundle(demo_bundle, trusted=TRUSTED)
    decoded = read_image(dicom_dir / "1-282.dcm")
    reference = predictor.predict_pixels(decoded.pixels, breast_side=decoded.breast_side)
    np.testing.assert_allclose(rows["1-282.dcm"].probabilities, reference.probabilities, rtol=0, atol=5e-7)
    for name in MAMMOGRAMS:
        assert png(tmp_path / "o" / rows[name].heatmap).shape[0] == 28 + 768


@pytest.mark.slow
def test_whole_mini_mias(tmp_path, mias_dir, cnn_bundle):
    summary = screen(Predictor.from_bundle(cnn_bundle, trusted=TRUSTED), [mias_dir], tmp_path / "o", batch_size=16)
    rows = read_predictions(tmp_path / "o" / "predictions.csv")
    assert (summary.n_files, summary.n_scored) == (325, 322)
    assert [Path(r.file).name for r in rows if r.status == SKIPPED] == ["Info.txt", "Licence.txt", "SHA256SUMS.pgm"]
    scored = [r for r in rows if r.status == SCORED]
    assert sum(r.laterality == "L" for r in scored) == sum(r.laterality == "R" for r in scored) == 161
    assert all(r.breast_side == ("right" if int(Path(r.file).stem[3:]) % 2 else "left") for r in scored)
    assert len(list((tmp_path / "o" / "heatmaps").iterdir())) == 322
