"""Hospital folder manifest: a good manifest over synthetic PNG/PGM files, and one error listing every bad row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.readers.manifest import ManifestError, read_manifest
from client.readers.raster import read_raster
from common.records import ImageRecord, LesionCircle


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_pgm(path: Path, array: np.ndarray, maxval: int, comment: bytes = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = array.shape
    dtype = np.uint8 if maxval < 256 else ">u2"
    header = b"P5\n" + comment + f"{width} {height}\n{maxval}\n".encode()
    path.write_bytes(header + array.astype(dtype).tobytes())
    return path


@pytest.fixture
def hospital(tmp_path) -> Path:
    """A small hospital folder: 8-bit PNG, 16-bit PNG, 12-bit PGM (maxval 4095) in a subfolder, a mask."""
    ramp = np.arange(64 * 48, dtype=np.uint32).reshape(64, 48)
    write_png(tmp_path / "a.png", (ramp % 256).astype(np.uint8))
    write_png(tmp_path / "c.png", (ramp * 20).astype(np.uint16))
    write_pgm(tmp_path / "sub" / "b.pgm", ramp % 4096, 4095, comment=b"# scanner export\n")
    write_png(tmp_path / "masks" / "c_mask.png", np.zeros((64, 48), np.uint8))
    return tmp_path


GOOD = (
    "File,Label,Patient_ID,Laterality,View,lesion_x,lesion_y,lesion_r,roi_mask\n"
    "a.png,normal,P1,L,CC,,,,\n"
    "sub/b.pgm,malignant,P1,right,mlo,10,20,3,\n"
    "\n"
    "sub/b.pgm,malignant,P1,right,mlo,30.5,40,2.5,\n"
    "c.png,Benign,P2,,,,,,masks/c_mask.png\n"
)


def test_good_manifest(hospital):
    manifest = hospital / "manifest.csv"
    manifest.write_text(GOOD, encoding="utf-8-sig")  # spreadsheets write a BOM
    records = read_manifest(manifest)
    assert records == [
        ImageRecord(path=hospital / "a.png", label="normal", patient_id="P1", laterality="L", view="CC"),
        ImageRecord(
            path=hospital / "sub" / "b.pgm",
            label="malignant",
            patient_id="P1",
            laterality="R",
            view="MLO",
            lesions=(LesionCircle(10, 20, 3), LesionCircle(30.5, 40, 2.5)),
        ),
        ImageRecord(
            path=hospital / "c.png", label="benign", patient_id="P2", roi_mask=hospital / "masks" / "c_mask.png"
        ),
    ]


def test_minimal_columns(hospital):
    manifest = hospital / "m.csv"
    manifest.write_text("file,label,patient_id\na.png,benign,7\n")
    assert read_manifest(manifest) == [ImageRecord(path=hospital / "a.png", label="benign", patient_id="7")]


def test_raster_files_of_the_folder(hospital):
    """maxval is honoured (12-bit PGM with a header comment), 16-bit PNG keeps 16 bits."""
    pgm = read_raster(hospital / "sub" / "b.pgm")
    assert (pgm.source_format, pgm.bits_stored, pgm.pixels.shape, pgm.pixels.dtype) == ("pgm", 12, (64, 48), np.float32)
    assert pgm.pixels[0, 1] == np.float32(1 / 4095)
    assert pgm.pixels.max() == np.float32(3071 / 4095)  # 64*48-1 = 3071 < 4096
    png16 = read_raster(hospital / "c.png")
    assert (png16.source_format, png16.bits_stored) == ("png", 16)
    assert png16.pixels[63, 47] == np.float32(3071 * 20 / 65535)
    png8 = read_raster(hospital / "a.png")
    assert (png8.bits_stored, png8.pixels[0, 5]) == (8, np.float32(5 / 255))


BAD_ROWS = [
    ("file,label,patient_id,laterality,view,lesion_x,lesion_y,lesion_r", None),
    ("a.png,cancer,P1,L,CC,,,", ("label", "cancer", "unknown label")),  # row 2
    ("nothere.png,normal,P1,L,CC,,,", ("file", "nothere.png", "missing file")),  # row 3
    ("a.png,benign,P2,L,CC,1x,2,3", ("lesion_x", "1x", "bad number")),  # row 4
    ("c.png,benign,P2,L,CC,1,2,", ("lesion_r", "", "partial lesion triple")),  # row 5
    ("sub/b.pgm,benign,P3,L,CC,,,", None),  # row 6: fine on its own
    ("sub/b.pgm,benign,P3,L,CC,,,", ("file", "sub/b.pgm", "duplicate file")),  # row 7
    ("a.png,benign,P3,L,CC,1,2,-3", ("lesion_r", "-3", "negative radius")),  # row 8
    ("a.png,benign,P3,X,CC,,,", ("laterality", "X", "bad laterality")),  # row 9
    ("a.png,benign,,L,CC,,,", ("patient_id", "", "missing patient id")),  # row 10
    ("a.png,benign,P4,L,TOP,,,", ("view", "TOP", "unknown view")),  # row 11
    ("a.png,normal,P4,L,CC,5,5,5", ("label", "normal", "a lesion circle or roi_mask on an image labelled normal")),
    ("a.png,benign,P4,L", ("row", "a.png,benign,P4,L", "4 fields, the header has 8")),  # row 13
    ("c.png,malignant,P5,L,CC,1,1,1", None),  # row 14
    ("c.png,benign,P5,L,CC,2,2,2", ("label", "benign", "differs from row 14")),  # row 15
    ("c.png,malignant,P5,L,CC,1,1,1", ("lesion_x,lesion_y,lesion_r", "c.png", "duplicate lesion circle")),  # 16
    ("a.png,benign,P6,L,CC,0,0,0", ("lesion_r", "0", "radius must be greater than 0")),  # row 17
    ("a.png,benign,P6,L,CC,nan,0,2", ("lesion_x", "nan", "bad number")),  # row 18
]


def test_every_bad_row_is_listed_in_one_error(hospital):
    manifest = hospital / "bad.csv"
    manifest.write_text("\n".join(line for line, _ in BAD_ROWS) + "\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    expected = [(row, *problem) for row, (_, problem) in enumerate(BAD_ROWS, start=1) if problem]
    found = [(p.row, p.field, p.value, p.reason) for p in caught.value.problems]
    assert [found_row[:3] for found_row in found] == [e[:3] for e in expected]
    for (_, _, _, reason), (*_, start) in zip(found, expected):
        assert reason.startswith(start), (reason, start)
    message = str(caught.value)
    assert message.startswith("bad.csv: 15 problem(s):")
    assert "row 3, file='nothere.png': missing file" in message


def test_header_problems(hospital):
    manifest = hospital / "m.csv"
    manifest.write_text("file,label,patient,lesion_x\na.png,normal,P1,3\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    assert [(p.row, p.field, p.reason) for p in caught.value.problems] == [
        (1, "patient_id", "required column missing"),
        (1, "patient", "unknown column"),
        (1, "lesion_x", "lesion columns come as a triple: lesion_x,lesion_y,lesion_r"),
    ]


def test_missing_files_left_to_the_caller(hospital):
    manifest = hospital / "m.csv"
    manifest.write_text("file,label,patient_id,roi_mask\ngone.png,benign,P1,gone_mask.png\n")
    with pytest.raises(ManifestError) as caught:
        read_manifest(manifest)
    assert [(p.row, p.field) for p in caught.value.problems] == [(2, "file"), (2, "roi_mask")]
    (record,) = read_manifest(manifest, check_files=False)
    assert (record.path, record.roi_mask) == (hospital / "gone.png", hospital / "gone_mask.png")


def test_empty_manifest(hospital):
    manifest = hospital / "m.csv"
    manifest.write_text("file,label,patient_id\n\n")
    with pytest.raises(ManifestError, match="no image rows"):
        read_manifest(manifest)
