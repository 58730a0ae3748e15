"""Screen images with a released model: probabilities, a decision and a heatmap per image, at the hospital.

Inputs are files and folders of DICOM, PNG or PGM images; a folder is walked and read exactly as
``mammofl-hospital check-data`` reads it (``client.dataset_scan.folder_entries``: a mini-MIAS folder gives each
image its breast side and laterality from the data set's convention and draws its lesion circles; any other
folder is read file by file, laterality, view and breast side from the DICOM header where it has them). Every
file found gets one row: scored, or skipped with the reason. The same file reached twice (a file and its folder)
is screened once.

Each readable image goes through ``common.inference.Predictor`` (the one inference path): the bundle's
preprocessing, the model, class probabilities, the decision at the bundle's operating point (arg-max when the
bundle has none) and the model's own map of P(malignant) per cell, kept inside the breast mask and drawn on the
original image (``Prediction.on_original``, ``common.overlay``).

Output folder (written into a temporary folder beside it, then renamed into place: a reader never sees half of
it; an existing non-empty folder is replaced only with ``overwrite``):

- ``predictions.csv``: one row per file, columns :data:`COLUMNS`:

  ======================  =================================================================================
  file                    the path as reached from the input given (folder argument + path below it)
  status                  ``scored`` or ``skipped``
  reason                  why a file was skipped (empty when scored)
  laterality, view        from the header or the data set (``L``/``R``, ``CC``/``MLO``/...), empty if unknown
  breast_side             where the breast lies in the stored image (``left``/``right``), as preprocessing used it
  p_normal .. p_malignant class probabilities, 6 decimals (empty when skipped)
  decision                ``normal``, ``benign`` or ``malignant`` (empty when skipped)
  decision_rule           ``p_malignant>=T`` at the bundle's operating point T, or ``argmax`` without one
  heatmap                 the overlay's path relative to the output folder (empty when skipped or not drawn)
  ======================  =================================================================================

- ``heatmaps/NNNN_<file name>.png``: the overlay of row NNNN (1-based);
- ``report.html``: the model and its operating point, counts, the table and the heatmaps (linked files).

File names stay in these files, at the hospital; nothing here sends anything anywhere.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from client.dataset_scan import FolderEntry, decode_file, files_below, folder_entries
from client.readers.images import read_image
from common.inference import Prediction, Predictor, cell_map_to_frame
from common.operating_point import threshold_text
from common.overlay import overlay_png
from common.preprocessing import Preprocessed
from common.records import CLASS_NAMES, ImageRecord

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = ("file", "status", "reason", "laterality", "view", "breast_side", "p_normal", "p_benign",
                            "p_malignant", "decision", "decision_rule", "heatmap")
SCORED, SKIPPED = "scored", "skipped"
ARGMAX = "argmax"
PREDICTIONS_CSV, REPORT_HTML, HEATMAPS = "predictions.csv", "report.html", "heatmaps"
HEATMAP_LABEL = "P(malignant) per cell"
METADATA_REASON = "metadata file of the data set, not an image"


@dataclass(frozen=True)
class ScreenRow:
    """One row of ``predictions.csv`` (see the module doc)."""

    file: str
    status: str
    reason: str = ""
    laterality: str = ""
    view: str = ""
    breast_side: str = ""
    probabilities: tuple[float, float, float] | None = None
    decision: str = ""
    decision_rule: str = ""
    heatmap: str = ""

    def to_csv(self) -> dict[str, str]:
        probs = self.probabilities or ("", "", "")
        cells = {name: getattr(self, name) for name in COLUMNS if hasattr(self, name)}
        cells.update({f"p_{name}": (f"{p:.6f}" if p != "" else "") for name, p in zip(CLASS_NAMES, probs)})
        return {name: cells[name] for name in COLUMNS}

    @classmethod
    def from_csv(cls, cells: dict[str, str]) -> ScreenRow:
        if tuple(cells) != COLUMNS:
            raise ValueError(f"predictions.csv columns {tuple(cells)}, expected {COLUMNS}")
        probs = [cells[f"p_{name}"] for name in CLASS_NAMES]
        return cls(**{name: cells[name] for name in COLUMNS if not name.startswith("p_")},
                   probabilities=tuple(float(p) for p in probs) if all(probs) else None)


@dataclass(frozen=True)
class ScreenSummary:
    """What a screening run did; ``skipped`` names files (it stays at the hospital, like the CSV)."""

    out: Path
    n_files: int
    n_scored: int
    decisions: dict[str, int]
    decision_rule: str
    operating_point: dict | None
    heatmaps: bool
    seconds: float
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def images_per_second(self) -> float | None:
        return self.n_scored / self.seconds if self.seconds > 0 and self.n_scored else None

    def to_dict(self) -> dict:
        return {
            "out": str(self.out),
            "predictions": str(self.out / PREDICTIONS_CSV),
            "report": str(self.out / REPORT_HTML),
            "n_files": self.n_files,
            "n_scored": self.n_scored,
            "n_skipped": self.n_skipped,
            "decisions": self.decisions,
            "decision_rule": self.decision_rule,
            "operating_point": self.operating_point,
            "heatmaps": self.heatmaps,
            "seconds": round(self.seconds, 3),
            "images_per_second": None if self.images_per_second is None else round(self.images_per_second, 3),
            "skipped": [{"file": name, "reason": reason} for name, reason in self.skipped],
            "skipped_by_reason": dict(Counter(reason for _, reason in self.skipped).most_common()),
        }


class OutputExists(FileExistsError):
    """The output folder exists and is not empty (pass overwrite to replace it)."""


def missing_inputs(inputs: Sequence[Path]) -> list[Path]:
    """The inputs that are neither a file nor a folder."""
    return [Path(p) for p in inputs if not (Path(p).is_file() or Path(p).is_dir())]


def count_files(inputs: Sequence[Path]) -> int:
    """How many rows screening `inputs` gives (before removing a file reached twice): a progress total."""
    return sum(len(files_below(p)) if Path(p).is_dir() else 1 for p in map(Path, inputs))


def input_entries(inputs: Sequence[Path]) -> Iterator[FolderEntry]:
    """Every file of `inputs`, decoded one at a time (see the module doc); `FolderEntry.name` is the path as
    reached from the input given. Raises FileNotFoundError naming every missing input before reading any."""
    missing = missing_inputs(inputs)
    if missing:
        raise FileNotFoundError("no such file or folder: " + ", ".join(str(p) for p in missing))
    return _entries([Path(p) for p in inputs])


def _entries(inputs: list[Path]) -> Iterator[FolderEntry]:
    seen: set[Path] = set()
    for given in inputs:
        entries = folder_entries(given) if given.is_dir() else [_file_entry(given)]
        for entry in entries:
            key = entry.path.resolve()
            if key in seen:
                continue
            seen.add(key)
            name = (given / entry.name).as_posix() if given.is_dir() else given.as_posix()
            yield FolderEntry(entry.path, name, entry.record, entry.decoded, entry.reason, entry.metadata)


def _file_entry(path: Path) -> FolderEntry:
    decoded = decode_file(read_image, path)
    if isinstance(decoded, str):
        return FolderEntry(path, path.name, reason=decoded)
    record = ImageRecord(path=path, label=None, patient_id="", laterality=decoded.laterality, view=decoded.view,
                         breast_side=decoded.breast_side)
    return FolderEntry(path, path.name, record=record, decoded=decoded)


def decision_rule(predictor: Predictor) -> str:
    """How decisions are made: ``p_malignant>=T`` at the bundle's operating point, ``argmax`` without one."""
    return ARGMAX if predictor.threshold is None else f"p_malignant>={threshold_text(predictor.threshold)}"


def screen(predictor: Predictor, inputs: Sequence[Path], out: Path, *, batch_size: int = 8, heatmaps: bool = True,
           overwrite: bool = False, progress: Callable[[int], None] | None = None,
           model_name: str = "") -> ScreenSummary:
    """Screen `inputs` into the folder `out` (see the module doc); `progress(n)` is called as n more files are
    done. Raises FileNotFoundError for missing inputs and OutputExists for a non-empty `out` without
    `overwrite`, both before any work."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    out = Path(out)
    entries = input_entries(inputs)
    check_output(out, overwrite)
    started = time.perf_counter()
    rule = decision_rule(predictor)
    with _staging(out, overwrite) as stage:
        if heatmaps:
            (stage / HEATMAPS).mkdir()
        rows: list[ScreenRow | None] = []
        batch: list[tuple[int, FolderEntry, Preprocessed]] = []
        for entry in entries:
            index = len(rows)
            rows.append(None)
            prepared = _prepare(predictor, entry)
            if isinstance(prepared, str):
                rows[index] = ScreenRow(file=entry.name, status=SKIPPED, reason=prepared)
                _advance(progress, 1)
                continue
            batch.append((index, entry, prepared))
            if len(batch) == batch_size:
                _flush(predictor, batch, rows, stage, heatmaps=heatmaps, rule=rule, progress=progress)
        _flush(predictor, batch, rows, stage, heatmaps=heatmaps, rule=rule, progress=progress)
        done = [row for row in rows if row is not None]
        write_predictions(stage / PREDICTIONS_CSV, done)
        summary = ScreenSummary(
            out=out, n_files=len(done), n_scored=sum(row.status == SCORED for row in done),
            decisions={name: sum(row.decision == name for row in done) for name in CLASS_NAMES},
            decision_rule=rule,
            operating_point=None if predictor.operating_point is None else predictor.operating_point.to_json(),
            heatmaps=heatmaps, seconds=time.perf_counter() - started,
            skipped=tuple((row.file, row.reason) for row in done if row.status == SKIPPED))
        (stage / REPORT_HTML).write_text(report_html(done, summary, predictor, model_name=model_name,
                                                     heatmap_dir=stage / HEATMAPS if heatmaps else None),
                                         encoding="utf-8")
    logger.info("screened %d files: %d scored, %d skipped", summary.n_files, summary.n_scored, summary.n_skipped)
    return summary


def _prepare(predictor: Predictor, entry: FolderEntry) -> Preprocessed | str:
    """The model's view of an entry, or why it has none."""
    if entry.metadata:
        return METADATA_REASON
    if entry.reason is not None:
        return entry.reason
    side = entry.record.breast_side or entry.decoded.breast_side
    try:
        return predictor.preprocess(entry.decoded.pixels, breast_side=side)
    except ValueError as error:
        return f"cannot preprocess: {error}"


def _flush(predictor: Predictor, batch: list[tuple[int, FolderEntry, Preprocessed]], rows: list[ScreenRow | None],
           stage: Path, *, heatmaps: bool, rule: str, progress: Callable[[int], None] | None) -> None:
    """Predict a batch, write its heatmaps, fill its rows; empties `batch`."""
    if not batch:
        return
    predictions = predictor.predict([prepared for _, _, prepared in batch], batch_size=len(batch))
    for (index, entry, _), prediction in zip(batch, predictions):
        heatmap = _write_heatmap(stage, index, entry, prediction) if heatmaps else ""
        record = entry.record
        rows[index] = ScreenRow(
            file=entry.name, status=SCORED, laterality=record.laterality or "", view=record.view or "",
            breast_side=prediction.preprocessed.breast_side,
            probabilities=tuple(float(p) for p in prediction.probabilities), decision=prediction.decision_name,
            decision_rule=rule, heatmap=heatmap)
    _advance(progress, len(batch))
    batch.clear()


def _write_heatmap(stage: Path, index: int, entry: FolderEntry, prediction: Prediction) -> str:
    """Draw one overlay; its path relative to the output folder."""
    frame = cell_map_to_frame(prediction.cell_map("malignant"), prediction.preprocessed.geometry.size)
    heatmap = prediction.on_original(frame * prediction.preprocessed.breast_mask)
    p_malignant = float(prediction.probabilities[CLASS_NAMES.index("malignant")])
    title = f"{entry.name}   P(malignant) {p_malignant:.3f}   decision: {prediction.decision_name}"
    png = overlay_png(entry.decoded.pixels, heatmap, circles=entry.record.lesions, title=title, label=HEATMAP_LABEL)
    relative = f"{HEATMAPS}/{index + 1:04d}_{_safe_name(Path(entry.name).name)}.png"
    (stage / relative).write_bytes(png)
    return relative


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _advance(progress: Callable[[int], None] | None, n: int) -> None:
    if progress is not None and n:
        progress(n)


def write_predictions(path: Path, rows: Sequence[ScreenRow]) -> None:
    """``predictions.csv`` (columns :data:`COLUMNS`, UTF-8, ``\\n`` line ends)."""
    with Path(path).open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(row.to_csv() for row in rows)


def read_predictions(path: Path) -> list[ScreenRow]:
    """The rows of a ``predictions.csv``; ValueError for other columns."""
    with Path(path).open(encoding="utf-8", newline="") as handle:
        return [ScreenRow.from_csv(cells) for cells in csv.DictReader(handle)]


def check_output(out: Path, overwrite: bool) -> None:
    """Raise OutputExists unless `out` is absent, an empty folder, or `overwrite` is given for a folder."""
    if out.exists() and not out.is_dir():
        raise OutputExists(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise OutputExists(f"{out}: folder exists and is not empty (use --overwrite to replace it)")


class _staging:
    """A temporary folder beside `out`, renamed to `out` on success (the old `out` removed), removed on error."""

    def __init__(self, out: Path, overwrite: bool):
        self.out, self.overwrite = out, overwrite

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.stage = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".tmp"))
        return self.stage

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None:
            shutil.rmtree(self.stage, ignore_errors=True)
            return
        try:
            check_output(self.out, self.overwrite)  # again: it may have been filled meanwhile
            old = None
            if self.out.exists():
                old = Path(tempfile.mkdtemp(dir=self.out.parent, prefix=f".{self.out.name}.", suffix=".old"))
                os.replace(self.out, old / "previous")
            os.replace(self.stage, self.out)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(self.stage, ignore_errors=True)
            raise


#: Overlays embedded in the screening report (highest P(malignant) first); every overlay is in ``heatmaps/``.
REPORT_THUMBNAILS = 24
_THUMBNAIL_SIDE = 360


def report_html(rows: Sequence[ScreenRow], summary: ScreenSummary, predictor: Predictor, *,
                model_name: str = "", heatmap_dir: Path | None = None) -> str:
    """The screening report (``common.html_page``: one self-contained file): model and operating point, counts,
    one table row per file, files not scored with their reasons, and the overlays of the ``REPORT_THUMBNAILS``
    images with the highest P(malignant), embedded small (`heatmap_dir`: where the overlays were written)."""
    from common import html_page as h

    point = predictor.operating_point
    model = predictor.meta.model_config
    facts: list[tuple[str, str]] = [("model", model_name or "(bundle)"),
                                    ("model kind", f"{model.kind}, {model.image_size} px"),
                                    ("decision rule", summary.decision_rule)]
    provenance = predictor.meta.provenance
    if provenance is not None:
        facts.append(("signature", f"verified: {provenance.kind} of round {provenance.round}, "
                                   f"{len(provenance.hospitals)} hospital(s), config {provenance.config_hash[:12]}, "
                                   f"signed {provenance.signed_at}"))
    if point is None:
        facts.append(("operating point", "none in the bundle: the most probable class is the decision"))
    else:
        facts.append(("operating point", f"malignant when P(malignant) >= {threshold_text(point.threshold)}; chosen by "
                                         f"{point.rule}" + (f" (target {point.target:g})" if point.target else "")
                      + f" on {point.source or 'validation data'}: sensitivity {_fmt(point.sensitivity)}, "
                        f"specificity {_fmt(point.specificity)}"))
    facts += [("files", str(summary.n_files)), ("scored", str(summary.n_scored)),
              ("skipped", str(summary.n_skipped)),
              ("decisions", ", ".join(f"{k}: {v}" for k, v in summary.decisions.items()))]
    page = h.Page("MammoFL screening report", subtitle=f"{summary.n_scored} of {summary.n_files} files scored")
    page.section("Model and decisions", h.definition_list(facts), h.notice(
        "Not a medical device. A research model trained on a small screen-film data set; every decision needs a "
        "radiologist's reading."))
    scored = [row for row in rows if row.status == SCORED]
    page.section("Predictions", h.table(
        ["file", "laterality", "view", "P(normal)", "P(benign)", "P(malignant)", "decision", "heatmap"],
        [[row.file, row.laterality, row.view, *row.probabilities, row.decision, row.heatmap or ""]
         for row in scored]))
    if summary.skipped:
        page.section("Files not scored", h.table(["file", "reason"], [list(pair) for pair in summary.skipped]))
    shown = sorted((row for row in scored if row.heatmap and heatmap_dir is not None),
                   key=lambda row: -row.probabilities[CLASS_NAMES.index("malignant")])[:REPORT_THUMBNAILS]
    if shown:
        page.section(f"Heatmaps ({HEATMAP_LABEL})", h.paragraph(
            f"The {len(shown)} images with the highest P(malignant), reduced; every overlay at full size is in "
            f"{HEATMAPS}/ beside this page."), h.gallery(
            h.figure(_thumbnail(heatmap_dir.parent / row.heatmap), alt=f"heatmap of {row.file}",
                     caption=f"{row.file}: {row.decision}") for row in shown))
    return page.render()


def _thumbnail(path: Path) -> bytes:
    """A PNG overlay reduced to at most `_THUMBNAIL_SIDE` pixels a side, as PNG bytes."""
    import io

    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((_THUMBNAIL_SIDE, _THUMBNAIL_SIDE))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()



def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
