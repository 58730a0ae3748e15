"""A hospital folder's CSV manifest -> `ImageRecord`s, or one `ManifestError` listing every bad row.

Columns (header row required, names case-insensitive, any order):
`file,label,patient_id[,laterality,view][,lesion_x,lesion_y,lesion_r][,roi_mask]`.
- `file`, `roi_mask`: paths relative to the manifest's folder that stay inside the data folder (`root`, by
  default the manifest's folder): absolute paths and paths leading out of it (`../`, links) are refused.
- `label`: normal / benign / malignant. `patient_id`: any non-empty text (used for patient-level splits).
- `laterality`: L / R (LEFT / RIGHT accepted); `view`: a mammography view code such as CC or MLO; both optional.
- `lesion_x, lesion_y, lesion_r`: one lesion circle in pixels of the stored image, origin top-left (x = column,
  y = row, 0-based), radius > 0; the three are given together or not at all.
- Several lesions on one image: repeat the image's row once per lesion, each row with its own circle and the same
  label, patient, laterality, view and roi_mask. A file listed twice otherwise is a duplicate. A `roi_mask` image
  may hold any number of lesions. Circles or masks on an image labelled normal are refused.
Row numbers in errors are line numbers of the file as a spreadsheet shows them (header = row 1).
Hostile cells are problems of their row, never exceptions: a NUL byte, a cell over `MAX_CELL_CHARS` characters, a
field over the csv module's limit, a path the file system cannot look up. Values shown in problems are shortened.
"""

from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path

from common.records import CLASS_NAMES, ImageRecord, LesionCircle

REQUIRED_COLUMNS = ("file", "label", "patient_id")
OPTIONAL_COLUMNS = ("laterality", "view", "lesion_x", "lesion_y", "lesion_r", "roi_mask")
LESION_COLUMNS = ("lesion_x", "lesion_y", "lesion_r")
LATERALITIES = {"L": "L", "R": "R", "LEFT": "L", "RIGHT": "R"}
# DICOM CID 4014 "View for Mammography" short codes (PS3.16), as used in ViewPosition and by hospitals.
VIEWS = frozenset({"CC", "MLO", "ML", "LM", "LMO", "FB", "SIO", "XCCL", "XCCM", "XCC", "AT", "CV", "RL", "RM", "ID"})
_SAME_ON_EVERY_ROW = ("label", "patient_id", "laterality", "view", "roi_mask")
MAX_CELL_CHARS = 1024  # longer than any path a file system accepts (PATH_MAX 4096 bytes, names 255)
_SHOWN_CHARS = 60
_MAX_PROBLEMS = 1000  # a manifest with more bad rows is reported up to here


@dataclass(frozen=True)
class ManifestProblem:
    """One reason a manifest row (or the header, row 1) cannot be used."""

    row: int
    field: str
    value: str
    reason: str

    def __post_init__(self) -> None:
        if len(self.value) > _SHOWN_CHARS:  # a problem keeps a shortened value, never a whole hostile cell
            object.__setattr__(self, "value", f"{self.value[:_SHOWN_CHARS]}... ({len(self.value):,} characters)")

    def __str__(self) -> str:
        return f"row {self.row}, {self.field}={self.value!r}: {self.reason}"


class ManifestError(ValueError):
    """Every problem found in a manifest, in row order."""

    def __init__(self, path: Path, problems: list[ManifestProblem]):
        self.path = Path(path)
        self.problems = tuple(problems)
        lines = "\n  ".join(str(problem) for problem in problems)
        super().__init__(f"{self.path.name}: {len(problems)} problem(s):\n  {lines}")


@dataclass(frozen=True)
class _Row:
    number: int
    file: Path
    file_cell: str  # as written in the manifest
    values: dict[str, str]  # normalised label, patient_id, laterality, view, roi_mask
    lesion: LesionCircle | None


def read_manifest(path: Path, *, check_files: bool = True, root: Path | None = None) -> list[ImageRecord]:
    """One record per image listed in the manifest at `path`, in order of first appearance.

    With `check_files` (default) a listed `file` or `roi_mask` that does not exist is a problem; without it the
    caller checks (the folder scan reports missing files next to files the manifest does not list). Every listed
    path must lie inside `root` (default: the manifest's folder).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(path, [ManifestProblem(0, "manifest", path.name, f"cannot read ({exc})")]) from exc
    problems: list[ManifestProblem] = []
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = [name.strip().lower() for name in next(reader, [])]
    except csv.Error as exc:
        raise ManifestError(path, [ManifestProblem(1, "header", "", f"not CSV ({exc})")]) from None
    problems.extend(_header_problems(header))
    if problems:
        raise ManifestError(path, problems)
    places = _Places(path.parent, Path(root) if root is not None else path.parent, check_files)
    rows: list[_Row] = []
    for number, fields in _numbered_rows(reader, problems):
        if not any(field.strip() for field in fields):
            continue
        row = _parse_row(number, header, fields, places, problems)
        if row is not None:
            rows.append(row)
    if not rows and not problems:
        problems.append(ManifestProblem(1, "manifest", path.name, "no image rows"))
    records = _merge_rows(rows, problems)
    if problems:
        raise ManifestError(path, sorted(problems, key=lambda problem: problem.row))
    return records


def _numbered_rows(reader, problems: list[ManifestProblem]):
    """(line number, fields) of every row after the header; a row the csv module refuses is a problem."""
    while len(problems) < _MAX_PROBLEMS:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            problems.append(ManifestProblem(reader.line_num, "row", "", f"not CSV ({exc})"))
            continue
        yield reader.line_num, fields


@dataclass(frozen=True)
class _Places:
    """Where a row's paths are looked up: relative to `base` (the manifest's folder), never outside `root`."""

    base: Path
    root: Path
    check_files: bool


def _header_problems(header: list[str]) -> list[ManifestProblem]:
    problems = []
    for name in REQUIRED_COLUMNS:
        if name not in header:
            problems.append(ManifestProblem(1, name, "", "required column missing"))
    for name in header:
        if name not in REQUIRED_COLUMNS + OPTIONAL_COLUMNS:
            problems.append(ManifestProblem(1, name, name, "unknown column"))
        elif header.count(name) > 1:
            problems.append(ManifestProblem(1, name, name, "column appears more than once"))
    present = [name for name in LESION_COLUMNS if name in header]
    if present and len(present) < 3:
        problems.append(
            ManifestProblem(1, ",".join(present), "", "lesion columns come as a triple: lesion_x,lesion_y,lesion_r")
        )
    return list(dict.fromkeys(problems))


def _parse_row(
    number: int, header: list[str], fields: list[str], places: _Places, problems: list[ManifestProblem]
) -> _Row | None:
    found: list[ManifestProblem] = []

    def bad(field: str, value: str, reason: str) -> None:
        found.append(ManifestProblem(number, field, value, reason))

    if len(fields) != len(header):
        bad("row", ",".join(fields), f"{len(fields)} fields, the header has {len(header)}")
        problems.extend(found)
        return None
    cells = {name: value.strip() for name, value in zip(header, fields)}
    for name, value in cells.items():
        if "\x00" in value:
            bad(name, value.replace("\x00", "\\0"), "contains a NUL byte")
        elif len(value) > MAX_CELL_CHARS:
            bad(name, value, f"{len(value):,} characters (at most {MAX_CELL_CHARS:,})")
    if found:
        problems.extend(found)
        return None
    values: dict[str, str] = {}

    file_path = _path_cell(cells["file"], places, "file", bad, required=True)
    label = cells["label"].lower()
    if label not in CLASS_NAMES:
        bad("label", cells["label"], f"unknown label (expected {', '.join(CLASS_NAMES)})")
    values["label"] = label
    if not cells["patient_id"]:
        bad("patient_id", "", "missing patient id")
    values["patient_id"] = cells["patient_id"]
    laterality = cells.get("laterality", "")
    if laterality and laterality.upper() not in LATERALITIES:
        bad("laterality", laterality, "bad laterality (expected L or R)")
    values["laterality"] = LATERALITIES.get(laterality.upper(), "")
    view = cells.get("view", "").upper()
    if view and view not in VIEWS:
        bad("view", cells["view"], f"unknown view (expected one of {', '.join(sorted(VIEWS))})")
    values["view"] = view
    mask = _path_cell(cells.get("roi_mask", ""), places, "roi_mask", bad, required=False)
    values["roi_mask"] = str(mask) if mask else ""
    lesion = _lesion(cells, bad)
    if label == "normal" and (lesion is not None or mask is not None):
        bad("label", cells["label"], "a lesion circle or roi_mask on an image labelled normal")
    problems.extend(found)
    if found or file_path is None:
        return None
    return _Row(number, file_path, cells["file"], values, lesion)


def _path_cell(value: str, places: _Places, field: str, bad, *, required: bool) -> Path | None:
    if not value:
        if required:
            bad(field, "", "missing file name")
        return None
    if os.path.isabs(value):
        bad(field, value, "absolute path (paths are relative to the manifest's folder)")
        return None
    path = places.base / value
    try:
        inside = Path(os.path.realpath(path)).is_relative_to(os.path.realpath(places.root))
        exists = inside and (not places.check_files or path.is_file())
    except (OSError, ValueError) as exc:
        bad(field, value, f"path cannot be looked up ({getattr(exc, 'strerror', None) or exc})")
        return None
    if not inside:
        bad(field, value, "path leads outside the data folder")
        return None
    if not exists:
        bad(field, value, "missing file (not found relative to the manifest)")
    return path


def _lesion(cells: dict[str, str], bad) -> LesionCircle | None:
    given = {name: cells.get(name, "") for name in LESION_COLUMNS}
    if not any(given.values()):
        return None
    if not all(given.values()):
        empty = ",".join(name for name, value in given.items() if not value)
        bad(empty, "", "partial lesion triple: lesion_x, lesion_y and lesion_r go together")
        return None
    numbers = {}
    for name, value in given.items():
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            bad(name, value, "bad number")
        elif name == "lesion_r" and number < 0:
            bad(name, value, "negative radius")
        elif name == "lesion_r" and number == 0:
            bad(name, value, "radius must be greater than 0")
        elif number < 0:
            bad(name, value, "negative coordinate (origin is the top-left pixel)")
        else:
            numbers[name] = number
    if len(numbers) < 3:
        return None
    return LesionCircle(x=numbers["lesion_x"], y=numbers["lesion_y"], r=numbers["lesion_r"])


def _merge_rows(rows: list[_Row], problems: list[ManifestProblem]) -> list[ImageRecord]:
    """Rows naming the same file are one image with several lesion circles (see the module docstring)."""
    groups: dict[Path, list[_Row]] = {}
    for row in rows:
        groups.setdefault(row.file.resolve(), []).append(row)
    records = []
    for group in groups.values():
        first = group[0]
        ok = True
        for index, row in enumerate(group[1:], start=1):
            if first.lesion is None or row.lesion is None:
                problems.append(
                    ManifestProblem(
                        row.number, "file", row.file_cell, f"duplicate file (first on row {first.number}); "
                        "a file may repeat only to add lesion circles, one per row"
                    )
                )
                ok = False
                continue
            for name in _SAME_ON_EVERY_ROW:
                if row.values[name] != first.values[name]:
                    problems.append(
                        ManifestProblem(
                            row.number, name, row.values[name],
                            f"differs from row {first.number} ({first.values[name]!r}) for the same file",
                        )
                    )
                    ok = False
            if row.lesion in [other.lesion for other in group[:index]]:
                problems.append(
                    ManifestProblem(row.number, "lesion_x,lesion_y,lesion_r", row.file_cell, "duplicate lesion circle")
                )
                ok = False
        if ok:
            records.append(_record(group))
    return records


def _record(group: list[_Row]) -> ImageRecord:
    values = group[0].values
    return ImageRecord(
        path=group[0].file,
        label=values["label"],
        patient_id=values["patient_id"],
        laterality=values["laterality"] or None,
        view=values["view"] or None,
        lesions=tuple(row.lesion for row in group if row.lesion is not None),
        roi_mask=Path(values["roi_mask"]) if values["roi_mask"] else None,
    )
