"""mini-MIAS reader: the facts of the real database (../shared/data/mini-mias) and Info.txt edge cases."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.readers.mias import MiasError, find_mias_image, parse_info, read_mias_records
from client.readers.raster import read_raster
from common.records import LesionCircle

MULTI_ROW_IMAGES = {"mdb005": 2, "mdb132": 2, "mdb144": 2, "mdb223": 2, "mdb239": 2, "mdb249": 2, "mdb226": 3}
OFFICIAL_PGM_HEADER = b"P5\n1024 1024\n255\n"


@pytest.fixture(scope="module")
def rows(mias_dir):
    return parse_info((mias_dir / "Info.txt").read_text())


@pytest.fixture(scope="module")
def records(mias_dir):
    return {record.path.stem: record for record in read_mias_records(mias_dir)}


def test_table_rows_and_records(rows, records):
    assert len(rows) == 330
    assert len(records) == 322
    assert sorted(records) == [f"mdb{n:03d}" for n in range(1, 323)]
    assert all(record.path.suffix == ".png" for record in records.values())


def test_labels_patients_and_background(records):
    assert Counter(r.label for r in records.values()) == {"normal": 207, "benign": 63, "malignant": 52}
    assert Counter(r.background_tissue for r in records.values()) == {"D": 112, "F": 106, "G": 104}
    by_patient = {}
    for record in records.values():
        by_patient.setdefault(record.patient_id, []).append(record)
    assert len(by_patient) == 161
    # every patient is one left/right pair of consecutive films
    assert all(sorted(r.laterality for r in pair) == ["L", "R"] for pair in by_patient.values())
    assert records["mdb001"].patient_id == records["mdb002"].patient_id == "001"
    assert records["mdb321"].patient_id == records["mdb322"].patient_id == "161"


def test_laterality_and_breast_side_follow_parity(records):
    assert (records["mdb001"].laterality, records["mdb001"].breast_side) == ("R", "right")
    assert (records["mdb002"].laterality, records["mdb002"].breast_side) == ("L", "left")
    assert Counter(r.breast_side for r in records.values()) == {"left": 161, "right": 161}


def test_multi_row_images(rows, records):
    counts = Counter(row.refnum for row in rows)
    assert {refnum: n for refnum, n in counts.items() if n > 1} == MULTI_ROW_IMAGES
    assert len(records["mdb226"].lesions) == 3
    assert records["mdb226"].abnormalities == ("CALC",)
    # mdb144: a benign and a malignant mass -> malignant, both circles kept (rows 233 994 29 and 313 540 27)
    assert records["mdb144"].label == "malignant"
    assert records["mdb144"].lesions == (LesionCircle(233, 29, 29), LesionCircle(313, 483, 27))


def test_rows_without_circles(rows, records):
    without = {row.refnum: row for row in rows if row.abnormality != "NORM" and row.radius is None}
    assert sorted(without) == ["mdb059", "mdb216", "mdb233", "mdb245"]
    assert without["mdb059"].note is None and without["mdb059"].severity == "B"
    assert {without[r].note for r in ("mdb216", "mdb233", "mdb245")} == {"*NOTE 3*"}
    assert records["mdb059"].label == "benign" and records["mdb059"].lesions == ()
    for refnum in ("mdb216", "mdb233", "mdb245"):
        assert records[refnum].label == "malignant"
        assert records[refnum].lesions == ()
        assert records[refnum].abnormalities == ("CALC",)
    assert sum(len(r.lesions) for r in records.values()) == 330 - 207 - 4


def test_coordinates_converted_to_top_left(records):
    # Info.txt: "mdb001 G CIRC B 535 425 197", origin bottom-left -> row 1023 - 425
    assert records["mdb001"].lesions == (LesionCircle(x=535, y=598, r=197),)
    # "mdb315 D CIRC B 516 447 93" and "mdb312 F MISC B 240 263 20"
    assert records["mdb315"].lesions == (LesionCircle(x=516, y=576, r=93),)
    assert records["mdb312"].lesions == (LesionCircle(x=240, y=760, r=20),)
    assert records["mdb002"].lesions == (LesionCircle(x=522, y=743, r=69),)  # "mdb002 G CIRC B 522 280 69"
    assert records["mdb003"].lesions == () and records["mdb003"].abnormalities == ()  # NORM


def _contrast(pixels: np.ndarray, x: float, row: float, r: float) -> float:
    """Mean inside the circle minus mean of the ring r..2r around it."""
    top, left = max(int(row - 2 * r), 0), max(int(x - 2 * r), 0)
    window = pixels[top : int(row + 2 * r) + 1, left : int(x + 2 * r) + 1]
    yy, xx = np.ogrid[top : top + window.shape[0], left : left + window.shape[1]]
    d2 = (xx - x) ** 2 + (yy - row) ** 2
    return float(window[d2 <= r * r].mean() - window[(d2 > r * r) & (d2 <= 4 * r * r)].mean())


def test_mass_circles_sit_on_brighter_tissue(rows, mias_dir):
    """Every mass (CIRC, SPIC, MISC: 58 circles) is denser than the ring around it at the converted position;
    at the unconverted row (y used as a top-left row) that fails for about a third of them."""
    masses = [row for row in rows if row.abnormality in ("CIRC", "SPIC", "MISC") and row.radius is not None]
    assert len(masses) == 58
    converted = unconverted = 0
    for row in masses:
        pixels = read_raster(mias_dir / f"{row.refnum}.png").pixels
        converted += _contrast(pixels, row.x, 1023 - row.y, row.radius) > 0
        unconverted += _contrast(pixels, row.x, row.y, row.radius) > 0
    assert converted == 58
    assert unconverted < 45


def test_breast_side_matches_pixels(records):
    """The half holding the breast is brighter; parity is right everywhere, the pixel test fails only on
    mdb151/mdb152 whose breast fills the frame."""
    disagree = []
    for refnum, record in records.items():
        with Image.open(record.path) as image:
            pixels = np.asarray(image, dtype=np.int64)  # integer sums: faster than decoding to float here
        brighter = "right" if pixels[:, 512:].sum() > pixels[:, :512].sum() else "left"
        if brighter != record.breast_side:
            disagree.append(refnum)
    assert disagree == ["mdb151", "mdb152"]


def test_official_pgm_files_are_read(mias_dir, tmp_path):
    """A PGM rebuilt from the PNG copy has the official checksum, and the reader prefers it to a PNG."""
    sums = {}
    for line in (mias_dir / "SHA256SUMS.pgm").read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        sums[name.strip().lstrip("*")] = digest
    lines = (mias_dir / "Info.txt").read_text().splitlines()
    info = "\n".join(line for line in lines if line[:6] in ("mdb001", "mdb002"))
    (tmp_path / "Info.txt").write_text(info + "\n")
    png_pixels = read_raster(mias_dir / "mdb001.png").pixels
    data = OFFICIAL_PGM_HEADER + np.round(png_pixels * 255).astype(np.uint8).tobytes()
    assert hashlib.sha256(data).hexdigest() == sums["mdb001.pgm"]
    (tmp_path / "mdb001.pgm").write_bytes(data)
    (tmp_path / "mdb001.png").write_bytes((mias_dir / "mdb001.png").read_bytes())
    (tmp_path / "mdb002.png").write_bytes((mias_dir / "mdb002.png").read_bytes())
    records = read_mias_records(tmp_path)
    assert [r.path.name for r in records] == ["mdb001.pgm", "mdb002.png"]
    decoded = read_raster(records[0].path)
    assert (decoded.source_format, decoded.bits_stored) == ("pgm", 8)
    np.testing.assert_array_equal(decoded.pixels, png_pixels)
    assert find_mias_image(tmp_path, "mdb003") is None


SYNTHETIC_INFO = (
    "MAMMOGRAPHIC IMAGE ANALYSIS SOCIETY\r\n"
    "mdb rows follow; prose lines such as this one start with 'mdb ' too\r\n"
    "1st column: MIAS database reference number.\r\n"
    "mdb001 G CIRC B 535 425 197\r\n"
    "mdb002 G CIRC B 522 280 69\r\n"
    "mdb003 D NORM \r\n"
    "mdb004 D CALC M *NOTE 3* \r\n"
    "mdb004 D CALC B 10 20 5   \r\n"
    " \tmdb005 F NORM \r\n"  # an indented row is a row
)


def test_parse_trailing_spaces_crlf_notes_and_indented_rows():
    text = SYNTHETIC_INFO.replace("mdb rows follow; prose lines such as this one start with 'mdb ' too\r\n", "")
    rows = parse_info(text)
    assert [(r.line, r.refnum, r.abnormality, r.severity, r.x, r.y, r.radius, r.note) for r in rows] == [
        (3, "mdb001", "CIRC", "B", 535, 425, 197, None),
        (4, "mdb002", "CIRC", "B", 522, 280, 69, None),
        (5, "mdb003", "NORM", None, None, None, None, None),
        (6, "mdb004", "CALC", "M", None, None, None, "*NOTE 3*"),
        (7, "mdb004", "CALC", "B", 10, 20, 5, None),
        (8, "mdb005", "NORM", None, None, None, None, None),
    ]


def test_malformed_rows_are_all_named_with_line_and_field():
    text = "\n".join(
        [
            "header line",
            "mdb001 X CIRC B 535 425 197",  # 2: BG
            "mdb002 G BLOB B 1 2 3",  # 3: CLASS
            "mdb003 G CIRC Q 1 2 3",  # 4: SEVERITY
            "mdb004 G CIRC B 535 425",  # 5: RADIUS missing
            "mdb005 G CIRC B 5a5 425 10",  # 6: X not a number
            "mdb006 G CIRC B 5 1024 10",  # 7: Y out of range
            "mdb007 G NORM B",  # 8: NORM with severity
            "mdbx08 G NORM",  # 9: REFNUM
            "mdb009 G",  # 10: too few fields
            "mdb010 F CALC B 1 2 3",
            "mdb010 D CALC B 4 5 6",  # 12: BG differs for the same image
            "mdb011 F CIRC",  # 13: SEVERITY missing
        ]
    )
    with pytest.raises(MiasError) as caught:
        parse_info(text)
    problems = caught.value.problems
    expected_starts = [
        "line 2, field BG",
        "line 3, field CLASS",
        "line 4, field SEVERITY",
        "line 5, field RADIUS",
        "line 6, field X",
        "line 7, field Y",
        "line 8, field SEVERITY",
        "line 9, field REFNUM",
        "line 10: 2 field(s)",
        "line 13, field SEVERITY",
        "line 12, field BG",
    ]
    assert len(problems) == len(expected_starts)
    for problem, start in zip(problems, expected_starts):
        assert problem.startswith(start), (problem, start)


def test_missing_images_are_named_with_their_line(tmp_path):
    (tmp_path / "Info.txt").write_text("intro\nmdb001 G CIRC B 535 425 197\nmdb002 F NORM \nmdb003 F NORM\n")
    (tmp_path / "mdb002.pgm").write_bytes(b"P5\n2 2\n255\n\x00\x01\x02\x03")
    with pytest.raises(MiasError) as caught:
        read_mias_records(tmp_path)
    assert caught.value.problems == (
        "line 2, field REFNUM: image mdb001.pgm or mdb001.png not found",
        "line 4, field REFNUM: image mdb003.pgm or mdb003.png not found",
    )
    assert [r.path.name for r in read_mias_records(tmp_path, require_images=False)] == ["mdb002.pgm"]


def test_no_table_rows_is_an_error():
    with pytest.raises(MiasError, match="no table rows"):
        parse_info("just a README\nwith no mdb rows\n")


def test_prose_line_starting_with_mdb_is_reported(tmp_path):
    """Only lines starting with `mdb` are rows, so such a line must be a valid row."""
    with pytest.raises(MiasError, match=r"line 2, field REFNUM"):
        parse_info(SYNTHETIC_INFO)


def test_folder_given_as_text(mias_dir):
    records = read_mias_records(str(mias_dir))
    assert len(records) == 322 and isinstance(records[0].path, Path)
