"""`mammofl-hospital check-data`: the real command in a subprocess, on the shared data and on broken files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from client.dataset_scan import scan_folder
from client.readers.images import NOT_AN_IMAGE, sniff_format
from conftest import REPO_ROOT

CLI = Path(sys.executable).parent / "mammofl-hospital"
INTERNAL_ERROR = "internal reader error"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CLI), "check-data", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO_ROOT,
        env={**os.environ, "COLUMNS": "200"},
    )


def run_json(*args: str | Path) -> dict:
    result = run_cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)  # stdout holds the JSON document and nothing else


def test_mini_mias(mias_dir):
    report = run_json(mias_dir)
    assert report["dataset"] == "mini-mias"
    assert (report["n_files"], report["n_ok"], report["skipped"]) == (322, 322, [])
    assert report["class_counts"] == {"normal": 207, "benign": 63, "malignant": 52, "unlabelled": 0}
    assert report["n_patients"] == 161
    assert report["lateralities"] == {"L": 161, "R": 161}
    assert report["bit_depths"] == {"8": 322}
    assert report["background_tissue"] == {"D": 112, "F": 106, "G": 104}
    assert report["metadata_files"] == ["Info.txt", "Licence.txt", "SHA256SUMS.pgm"]
    assert report["missing_files"] == []
    assert (report["n_images_with_lesions"], report["n_lesion_circles"]) == (111, 119)


def test_mini_mias_readable_summary(mias_dir):
    result = run_cli(mias_dir)
    assert result.returncode == 0, result.stderr
    assert "images ok: 322 of 322 files, skipped: 0" in result.stdout
    assert "normal: 207, benign: 63, malignant: 52" in result.stdout
    assert "patients: 161" in result.stdout


def test_dicom_folder(dicom_dir):
    report = run_json(dicom_dir)
    on_disk = sorted(path.name for path in dicom_dir.iterdir())
    assert len(on_disk) == 17
    skipped = {item["file"]: item["reason"] for item in report["skipped"]}
    ok = set(report["ok_files"])
    assert report["n_files"] == 17 == report["n_ok"] + len(report["skipped"])
    assert sorted(ok | set(skipped)) == on_disk and not ok & set(skipped)
    assert {"MG1_J2KI", "1-281.dcm", "1-282.dcm"} <= ok <= {"MG1_J2KI", "1-281.dcm", "1-282.dcm", "MG1_JPLY"}
    if "MG1_JPLY" in skipped:
        assert "JPEG" in skipped["MG1_JPLY"] or "decode" in skipped["MG1_JPLY"], skipped["MG1_JPLY"]
    assert not [reason for reason in skipped.values() if INTERNAL_ERROR in reason]
    for name in ("RG1_J2KI.dcm", "RG2_JPLY", "RG3_J2KR.dcm", "RG3_JPLL", "RG3_RLE"):
        assert skipped[name].startswith("not a breast image"), (name, skipped[name])
    assert skipped["INVENTORY.md"] == skipped["SHA256SUMS"] == NOT_AN_IMAGE
    assert report["class_counts"]["unlabelled"] == report["n_ok"]
    assert report["formats"] == {"dicom": report["n_ok"]}
    assert report["n_patients"] is None  # no manifest: patients unknown


def test_broken_files_get_reasons(tmp_path, dicom_dir, mias_dir):
    png = (mias_dir / "mdb001.png").read_bytes()
    (tmp_path / "good.png").write_bytes(png)
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "truncated.png").write_bytes(png[: len(png) // 2])
    corrupt = bytearray(png)
    corrupt[5000] ^= 0xFF
    (tmp_path / "corrupt.png").write_bytes(bytes(corrupt))
    (tmp_path / "truncated.pgm").write_bytes(b"P5\n1024 1024\n255\n" + bytes(1000))
    (tmp_path / "bad_header.pgm").write_bytes(b"P5\n1024 abc\n255\n" + bytes(1000))
    (tmp_path / "truncated.dcm").write_bytes((dicom_dir / "1-282.dcm").read_bytes()[:5000])
    bare = (dicom_dir / "JPEGBaseline_1s_1f_u_08_08.dcm").read_bytes()[132:]  # data set without preamble
    assert sniff_format(bare[:132]) == "dicom"
    (tmp_path / "bare_dataset").write_bytes(bare)
    (tmp_path / "notes.txt").write_text("scanner 3, room 12\n")
    (tmp_path / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))
    (tmp_path / "plain.pgm").write_bytes(b"P2\n2 2\n255\n0 1 2 3\n")
    nested = tmp_path / "deep" / "er"
    nested.mkdir(parents=True)
    (nested / "sixteen.pgm").write_bytes(b"P5\n4 3\n65535\n" + np.arange(12, dtype=">u2").tobytes())
    report = run_json(tmp_path)
    skipped = {item["file"]: item["reason"] for item in report["skipped"]}
    assert report["ok_files"] == ["deep/er/sixteen.pgm", "good.png"]
    assert report["bit_depths"] == {"16": 1, "8": 1}
    assert skipped == {
        "bad_header.pgm": "corrupt PGM header: height is not a positive integer",
        "bare_dataset": skipped["bare_dataset"],
        "corrupt.png": "corrupt PNG file: CRC mismatch in IDAT chunk at byte 33",
        "empty.png": "empty file",
        "notes.txt": NOT_AN_IMAGE,
        "photo.jpg": "unsupported image format JPEG (expected DICOM, PNG or PGM)",
        "plain.pgm": "unsupported Netpbm format: plain (ASCII) PGM (P2); expected binary PGM (P5)",
        "truncated.dcm": skipped["truncated.dcm"],
        "truncated.pgm": "truncated PGM file: 1000 of 1048576 pixel bytes present",
        "truncated.png": "truncated PNG file: IDAT chunk at byte 33 cut short",
    }
    assert "truncated" in skipped["truncated.dcm"].lower(), skipped["truncated.dcm"]
    assert skipped["bare_dataset"] != NOT_AN_IMAGE and INTERNAL_ERROR not in skipped["bare_dataset"]
    assert report["n_files"] == 12 == report["n_ok"] + len(skipped)


def _hospital_folder(root: Path) -> Path:
    pixels = (np.arange(40 * 30) % 256).astype(np.uint8).reshape(40, 30)
    for name in ("a.png", "b.png", "unlisted.png", "masks/b_mask.png"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
    return root


def test_manifest_folder(tmp_path):
    folder = _hospital_folder(tmp_path)
    (folder / "manifest.csv").write_text(
        "file,label,patient_id,laterality,view,lesion_x,lesion_y,lesion_r,roi_mask\n"
        "a.png,normal,P1,L,CC,,,,\n"
        "b.png,malignant,P1,R,MLO,10,12,4,masks/b_mask.png\n"
        "b.png,malignant,P1,R,MLO,20,30,2,masks/b_mask.png\n"
        "gone.png,benign,P2,L,MLO,,,,\n"
    )
    report = run_json(folder, "--manifest", folder / "manifest.csv")
    assert report["dataset"] == "folder"
    assert report["ok_files"] == ["a.png", "b.png"]
    assert report["skipped"] == [{"file": "unlisted.png", "reason": "image not listed in the manifest manifest.csv"}]
    assert report["missing_files"] == [{"file": "gone.png", "reason": "listed in the manifest, file not found"}]
    assert report["metadata_files"] == ["manifest.csv", "masks/b_mask.png"]
    assert report["n_files"] == 3
    assert report["class_counts"] == {"normal": 1, "benign": 0, "malignant": 1, "unlabelled": 0}
    assert report["n_patients"] == 1
    assert (report["views"], report["lateralities"]) == ({"CC": 1, "MLO": 1}, {"L": 1, "R": 1})
    assert (report["n_images_with_lesions"], report["n_lesion_circles"]) == (1, 2)


def test_annotations_checked_against_the_image(tmp_path):
    folder = _hospital_folder(tmp_path)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(folder / "masks" / "b_mask.png")
    (folder / "m.csv").write_text(
        "file,label,patient_id,lesion_x,lesion_y,lesion_r,roi_mask\n"
        "a.png,benign,P1,30,5,2,\n"  # x = 30 is outside a 30-column image
        "b.png,benign,P1,,,,masks/b_mask.png\n"
        "unlisted.png,benign,P2,29,39,1,\n"
    )
    report = scan_folder(folder, folder / "m.csv").to_dict()
    assert report["skipped"] == [
        {"file": "a.png", "reason": "lesion circle centre (30, 5) outside the 40x30 image"},
        {"file": "b.png", "reason": "roi_mask is 10x10, the image 40x30"},
    ]
    assert report["ok_files"] == ["unlisted.png"]


def test_mini_mias_folder_problems(tmp_path, mias_dir):
    """Duplicates, a truncated listed image, a listed image that is missing and a stray file, all reported."""
    (tmp_path / "Info.txt").write_text(
        "MIAS\nmdb001 G CIRC B 535 425 197\nmdb002 G CIRC B 522 280 69\nmdb003 D NORM \n"
    )
    (tmp_path / "Licence.txt").write_text("research only\n")
    png = (mias_dir / "mdb001.png").read_bytes()
    pgm = b"P5\n1024 1024\n255\n" + np.asarray(Image.open(mias_dir / "mdb001.png")).tobytes()
    (tmp_path / "mdb001.pgm").write_bytes(pgm)
    (tmp_path / "mdb001.png").write_bytes(png)
    (tmp_path / "mdb002.pgm").write_bytes(pgm[:-10])
    (tmp_path / "mdb004.png").write_bytes(png)
    (tmp_path / "readme.md").write_text("# notes\n")
    report = scan_folder(tmp_path)
    summary = report.to_dict()
    assert summary["dataset"] == "mini-mias"
    assert summary["ok_files"] == ["mdb001.pgm"]
    assert summary["skipped"] == [
        {"file": "mdb001.png", "reason": "another copy of mdb001 is used (mdb001.pgm)"},
        {"file": "mdb002.pgm", "reason": "truncated PGM file: 1048566 of 1048576 pixel bytes present"},
        {"file": "mdb004.png", "reason": "image not listed in Info.txt"},
        {"file": "readme.md", "reason": NOT_AN_IMAGE},
    ]
    assert summary["missing_files"] == [
        {"file": "mdb003", "reason": "listed in Info.txt, no mdb003.pgm or mdb003.png found"}
    ]
    assert summary["metadata_files"] == ["Info.txt", "Licence.txt"]
    assert summary["n_files"] == 5 == report.n_ok + len(report.skipped)
    assert report.records[0].lesions[0].y == 598


def test_missing_folder_exits_2(tmp_path):
    result = run_cli(tmp_path / "nowhere", "--json")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "no such folder" in result.stderr


def test_bad_manifest_exits_2_listing_rows(tmp_path):
    folder = _hospital_folder(tmp_path)
    (folder / "m.csv").write_text("file,label,patient_id\na.png,maybe,P1\ngone.png,benign,P2\n")
    result = run_cli(folder, "--manifest", folder / "m.csv")
    assert result.returncode == 2
    assert "row 2, label='maybe': unknown label" in result.stderr
    assert "row 3, file='gone.png': missing file" not in result.stderr  # the scan reports missing files itself
    assert run_cli(folder, "--manifest", folder / "absent.csv").returncode == 2


def test_bad_info_exits_2(tmp_path, mias_dir):
    (tmp_path / "Info.txt").write_text("mdb001 G CIRC B 535 425\n")
    (tmp_path / "mdb001.png").write_bytes((mias_dir / "mdb001.png").read_bytes())
    result = run_cli(tmp_path)
    assert result.returncode == 2
    assert "line 1, field RADIUS" in result.stderr
