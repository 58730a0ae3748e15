"""Partition plots and the virtual hospitals they show (real mini-MIAS, real matplotlib)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common.records import ImageRecord
from simulations.hospitals import virtual_hospitals
from simulations.partition_plot import plot_partitions
from simulations.presets import resolve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _records(spec: list[tuple[str, str, str]]) -> list[ImageRecord]:
    """(patient, label, tissue) -> two images per patient."""
    return [ImageRecord(path=Path(f"/nowhere/{p}-{side}.png"), label=label, patient_id=p,
                        background_tissue=tissue)
            for p, label, tissue in spec for side in "LR"]


def test_plot_is_a_png_of_the_expected_size_and_deterministic(tmp_path):
    parts = [_records([("1", "normal", "F"), ("2", "malignant", "D")]),
             _records([("3", "benign", "G")])]
    test = _records([("4", "malignant", "F")])
    first = plot_partitions(parts, tmp_path / "a.png", title="two hospitals", test=test)
    second = plot_partitions(parts, tmp_path / "sub" / "b.png", title="two hospitals", test=test)
    data = first.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert data == second.read_bytes()  # same split, same picture, byte for byte
    with Image.open(first) as image:
        assert image.size == (858, 462)  # max(7, 1.6 * 3 + 3) = 7.8 x 4.2 inches at 110 dpi
        pixels = np.asarray(image.convert("RGB"))
    malignant = np.all(pixels == (0xC8, 0x50, 0x4B), axis=-1).sum()
    dense = np.all(pixels == (0x5C, 0x4A, 0x3A), axis=-1).sum()
    assert malignant > 1000 and dense > 1000  # the bars themselves, not just the legend patches


def test_a_different_split_gives_a_different_picture(tmp_path):
    a = plot_partitions([_records([("1", "normal", "F")]), _records([("2", "benign", "G")])],
                        tmp_path / "a.png", title="t")
    b = plot_partitions([_records([("1", "normal", "F")]), _records([("2", "malignant", "G")])],
                        tmp_path / "b.png", title="t")
    assert a.read_bytes() != b.read_bytes()


def test_unknown_tissue_gets_its_own_bar_segment(tmp_path):
    parts = [[ImageRecord(path=Path("/nowhere/x.png"), label="normal", patient_id="1")]]
    out = plot_partitions(parts, tmp_path / "u.png", title="no tissue")
    with Image.open(out) as image:
        pixels = np.asarray(image.convert("RGB"))
    assert np.all(pixels == (0xCC, 0xCC, 0xCC), axis=-1).sum() > 1000


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "tissue"])
def test_virtual_hospitals_cover_mini_mias_by_patient(mias_dir, scheme):
    sim = resolve("demo", [f"sim-partition={scheme}"])
    split = virtual_hospitals(mias_dir, sim)
    assert len(split.partitions) == 3
    patients = [{r.patient_id for r in part} for part in split.partitions] + [{r.patient_id for r in split.test}]
    assert all(patients)
    assert sum(len(p) for p in patients) == len(set().union(*patients)) == 161  # nobody in two places
    everything = [r for part in split.partitions for r in part] + list(split.test)
    assert len(everything) == 322
    assert Counter(r.label for r in everything) == {"normal": 207, "benign": 63, "malignant": 52}
    summary = split.summary()
    assert [h["n_images"] for h in summary["hospitals"]] == [len(p) for p in split.partitions]
    assert summary["test"]["n_patients"] == len(patients[-1])
    if scheme == "tissue":  # site skew: each hospital is mostly one background tissue
        for hospital in summary["hospitals"]:
            assert max(hospital["tissue_counts"].values()) >= 0.9 * hospital["n_images"]


def test_partitions_command_writes_the_plot_and_reports_the_counts(mias_dir, tmp_path):
    out = tmp_path / "plot.png"
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "partitions", "--data-dir", str(mias_dir),
                           "--out", str(out), "--scheme", "tissue", "--hospitals", "4", "--json"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == PNG_MAGIC
    report = json.loads(done.stdout)
    expected = virtual_hospitals(mias_dir, resolve("demo", ["sim-partition=tissue", "num-hospitals=4"])).summary()
    assert report == expected
    assert len(report["hospitals"]) == 4


def test_partitions_command_refuses_a_folder_without_mini_mias(tmp_path):
    done = subprocess.run([sys.executable, "-m", "simulations.cli", "partitions", "--data-dir", str(tmp_path),
                           "--out", str(tmp_path / "p.png")], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"{tmp_path} is not a mini-MIAS folder (no Info.txt)" in done.stderr
    assert not (tmp_path / "p.png").exists()
