"""The mini-MIAS database (official `mdbNNN.pgm` files or the lossless `mdbNNN.png` copy + `Info.txt`) -> records.

`Info.txt` is the distribution's README; only lines starting with `mdb` are table rows (leading spaces and tabs are
ignored, so an indented row still counts; a line that mentions `mdbNNN` elsewhere is reported, never dropped):
`REFNUM BG CLASS [SEVERITY [X Y RADIUS]]` (BG: F fatty, G fatty-glandular, D dense-glandular; CLASS: CALC, CIRC,
SPIC, MISC, ARCH, ASYM or NORM; SEVERITY: B or M). `*NOTE 3*` may stand in place of X Y RADIUS (calcifications
spread over the breast: no circle). An image may have several rows (one per abnormality).

Facts applied (Info.txt notes 1-3, checked on the full database):
- label per image: malignant if any row is M, else benign if any row is B, else normal (mdb144 has B and M rows);
- films come in pairs: patient = (n + 1) // 2 (161 patients, id written as 3 digits), even n = left breast
  (laterality L, breast on the image's left), odd n = right breast (L/R on the film: breast on the image's right);
- the coordinate origin is the bottom-left corner of the 1024 x 1024 image: a circle at (X, Y) is at column X,
  row 1023 - Y in the top-left, 0-based pixel coordinates of `LesionCircle`;
- `ImageRecord.abnormalities` lists each image's abnormality classes once, in row order (empty for NORM).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from common.records import ImageRecord, LesionCircle

INFO_FILE = "Info.txt"
IMAGE_SIZE = 1024  # Info.txt note 2: every image is 1024 x 1024
BACKGROUNDS = ("F", "G", "D")
ABNORMALITY_CLASSES = ("CALC", "CIRC", "SPIC", "MISC", "ARCH", "ASYM", "NORM")
SEVERITIES = ("B", "M")
IMAGE_SUFFIXES = (".pgm", ".png")  # the official format first
_REFNUM = re.compile(r"mdb(\d{3})")
_ROW_START = re.compile(r"mdb", re.IGNORECASE)
_REFNUM_ANYWHERE = re.compile(r"mdb\d+", re.IGNORECASE)
_NOTE = re.compile(r"\*NOTE\s*\d+\*")
IMAGE_NAME = re.compile(r"mdb\d{3}\.(?:pgm|png)")


class MiasError(ValueError):
    """Info.txt rows that cannot be parsed, or images it lists that are missing; lists every problem."""

    def __init__(self, problems: list[str]):
        self.problems = tuple(problems)
        super().__init__(f"{len(problems)} problem(s) in the mini-MIAS folder:\n  " + "\n  ".join(problems))


@dataclass(frozen=True)
class MiasRow:
    """One table row of Info.txt, as written (coordinates with the bottom-left origin)."""

    line: int  # 1-based line number in Info.txt
    refnum: str  # "mdb001"
    background: str  # F / G / D
    abnormality: str  # CALC, CIRC, ..., NORM
    severity: str | None = None  # B / M; None for NORM
    x: int | None = None
    y: int | None = None
    radius: int | None = None
    note: str | None = None  # e.g. "*NOTE 3*" where the coordinates were omitted

    @property
    def number(self) -> int:
        return int(self.refnum[3:])


def parse_info(text: str) -> list[MiasRow]:
    """Parse the table rows of an Info.txt; raise `MiasError` naming the line and field of every bad row."""
    rows: list[MiasRow] = []
    problems: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if _ROW_START.match(line.strip()):
            row, row_problems = _parse_row(number, line)
            problems.extend(row_problems)
            if row is not None:
                rows.append(row)
        elif found := _REFNUM_ANYWHERE.search(line):
            problems.append(f"line {number}: mentions {found.group()[:12]!r} but does not start with it "
                            f"(a table row is REFNUM BG CLASS [SEVERITY [X Y RADIUS]])")
    problems.extend(_cross_row_problems(rows))
    if not rows and not problems:
        problems.append("no table rows (lines starting with 'mdb') found")
    if problems:
        raise MiasError(problems)
    return rows


def _parse_row(number: int, line: str) -> tuple[MiasRow | None, list[str]]:
    where = f"line {number}"
    tokens = line.split()
    if len(tokens) < 3:
        return None, [f"{where}: {len(tokens)} field(s), expected at least REFNUM BG CLASS"]
    refnum, background, abnormality, rest = tokens[0], tokens[1], tokens[2], tokens[3:]
    problems = []
    if not _REFNUM.fullmatch(refnum) or refnum == "mdb000":
        problems.append(f"{where}, field REFNUM: {_cut(refnum)!r} is not mdb followed by a 3-digit number from 001")
    if background not in BACKGROUNDS:
        problems.append(f"{where}, field BG: {_cut(background)!r} is not one of {', '.join(BACKGROUNDS)}")
    if abnormality not in ABNORMALITY_CLASSES:
        problems.append(f"{where}, field CLASS: {_cut(abnormality)!r} is not one of {', '.join(ABNORMALITY_CLASSES)}")
    severity = rest[0] if rest else None
    if abnormality == "NORM":
        if rest:
            got = " ".join(rest)
            problems.append(f"{where}, field SEVERITY: a NORM row has no severity or coordinates, got {_cut(got)!r}")
        return (None if problems else MiasRow(number, refnum, background, abnormality)), problems
    if severity is None:
        problems.append(f"{where}, field SEVERITY: missing for class {abnormality}")
    elif severity not in SEVERITIES:
        problems.append(f"{where}, field SEVERITY: {_cut(severity)!r} is not B or M")
    x = y = radius = note = None
    coordinates = rest[1:]
    if _NOTE.fullmatch(" ".join(coordinates)):
        note = " ".join(coordinates)
    elif len(coordinates) == 3:
        limits = {"X": (0, IMAGE_SIZE - 1), "Y": (0, IMAGE_SIZE - 1), "RADIUS": (1, IMAGE_SIZE)}
        values = []
        for field, token in zip(("X", "Y", "RADIUS"), coordinates):
            low, high = limits[field]
            value = int(token) if token.isascii() and token.isdigit() and len(token) <= 9 else None
            if value is None:
                problems.append(f"{where}, field {field}: {_cut(token)!r} is not a whole number")
            elif not low <= value <= high:
                problems.append(f"{where}, field {field}: {value} outside {low}..{high}")
            values.append(value)
        x, y, radius = values
    elif coordinates:
        field = "Y" if len(coordinates) == 1 else "RADIUS"  # the first missing field, or the one overrun
        problems.append(
            f"{where}, field {field}: expected X Y RADIUS, '*NOTE n*' or nothing after the severity, "
            f"got {_cut(' '.join(coordinates))!r}"
        )
    if problems:
        return None, problems
    return MiasRow(number, refnum, background, abnormality, severity, x, y, radius, note), []


def _cut(text: str) -> str:
    """A token as a problem shows it: at most 20 characters."""
    return text if len(text) <= 20 else f"{text[:20]}..."


def _cross_row_problems(rows: list[MiasRow]) -> list[str]:
    problems = []
    by_image: dict[str, list[MiasRow]] = defaultdict(list)
    for row in rows:
        by_image[row.refnum].append(row)
    for refnum, image_rows in by_image.items():
        first = image_rows[0]
        for row in image_rows[1:]:
            if row.background != first.background:
                problems.append(
                    f"line {row.line}, field BG: {row.background} differs from {first.background} "
                    f"on line {first.line} for the same image {refnum}"
                )
            if "NORM" in (row.abnormality, first.abnormality):
                problems.append(
                    f"line {row.line}, field CLASS: {refnum} has a NORM row and another row (line {first.line})"
                )
    return problems


def find_mias_image(folder: Path, refnum: str) -> Path | None:
    """The image file of `refnum` in `folder` (official .pgm preferred over the .png copy), or None."""
    for suffix in IMAGE_SUFFIXES:
        candidate = Path(folder) / f"{refnum}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def is_mias_folder(folder: Path) -> bool:
    """True when `folder` holds an Info.txt and at least one mdbNNN.pgm / mdbNNN.png file."""
    folder = Path(folder)
    if not (folder / INFO_FILE).is_file():
        return False
    return any(IMAGE_NAME.fullmatch(p.name) for p in folder.iterdir() if p.is_file())


def read_mias_records(folder: Path, *, require_images: bool = True) -> list[ImageRecord]:
    """One `ImageRecord` per image listed in `folder/Info.txt`, sorted by refnum.

    With `require_images` (default) a listed image missing from the folder is an error (all of them are named,
    with the Info.txt line); without it such images are left out, for a caller that reports them itself.
    """
    folder = Path(folder)
    try:
        text = (folder / INFO_FILE).read_bytes().decode("latin-1")
    except OSError as exc:
        raise MiasError([f"{INFO_FILE}: cannot read ({exc.strerror or type(exc).__name__})"]) from exc
    rows = parse_info(text)
    by_image: dict[str, list[MiasRow]] = defaultdict(list)
    for row in rows:
        by_image[row.refnum].append(row)
    records, problems = [], []
    for refnum in sorted(by_image):
        image_rows = by_image[refnum]
        path = find_mias_image(folder, refnum)
        if path is None:
            if require_images:
                problems.append(
                    f"line {image_rows[0].line}, field REFNUM: image {refnum}.pgm or {refnum}.png not found"
                )
            continue
        records.append(_record(path, image_rows))
    if problems:
        raise MiasError(problems)
    return records


def _record(path: Path, rows: list[MiasRow]) -> ImageRecord:
    number = rows[0].number
    severities = {row.severity for row in rows}
    label = "malignant" if "M" in severities else "benign" if "B" in severities else "normal"
    lesions = tuple(
        LesionCircle(x=float(row.x), y=float(IMAGE_SIZE - 1 - row.y), r=float(row.radius))
        for row in rows
        if row.radius is not None
    )
    classes = tuple(dict.fromkeys(row.abnormality for row in rows if row.abnormality != "NORM"))
    odd = number % 2 == 1
    return ImageRecord(
        path=path,
        label=label,
        patient_id=f"{(number + 1) // 2:03d}",
        laterality="R" if odd else "L",
        breast_side="right" if odd else "left",
        lesions=lesions,
        background_tissue=rows[0].background,
        abnormalities=classes,
    )
