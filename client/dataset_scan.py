"""Scan a hospital data folder: which images can be used, which cannot and why, and what the usable ones hold.

Two kinds of folder:
- mini-MIAS (an `Info.txt` next to `mdbNNN.pgm` / `mdbNNN.png` files, no manifest given): records come from the
  mini-MIAS reader and every listed image is decoded to check it (1024 x 1024 expected: the lesion coordinates
  assume it). `Info.txt`, `Licence.txt` and `SHA256SUMS*` are the data set's metadata, listed apart.
- any other folder: every file below it (recursively, sorted) is decoded with `read_image`; with a manifest, the
  labels, patients and lesions come from it, files on disk that it does not list are skipped with that reason and
  rows whose file is missing are listed apart (`missing_files`). The manifest and its ROI masks are metadata.

Nothing is dropped silently: every counted file is either usable (`n_ok`) or skipped with a reason, so
`n_files == n_ok + len(skipped)`; a reader that fails in an unforeseen way (even a decoder panic) gives a reason
too. Images whose header declares more than `max_image_bytes` are skipped before decoding. Manifest paths must
stay inside the scanned folder. A report holds no pixel data.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from client.readers.base import MAX_IMAGE_BYTES, DecodedImage, UnreadableImage, is_decoder_panic
from client.readers.images import read_image
from client.readers.manifest import read_manifest
from client.readers.mias import IMAGE_NAME, IMAGE_SIZE, INFO_FILE, is_mias_folder, parse_info, read_mias_records
from client.readers.raster import read_raster
from common.records import CLASS_NAMES, ImageRecord

logger = logging.getLogger(__name__)

MIAS_METADATA = ("Info.txt", "Licence.txt")  # plus SHA256SUMS*
UNLABELLED = "unlabelled"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class SkippedFile:
    """A file that cannot be used, path relative to the scanned folder."""

    file: str
    reason: str


@dataclass(frozen=True)
class ScannedImage:
    """A usable image: its record and what decoding told (no pixels)."""

    record: ImageRecord
    bits_stored: int
    source_format: str
    shape: tuple[int, int]


@dataclass(frozen=True)
class ScanReport:
    """The outcome of `scan_folder`. `n_patients` is None where the folder carries no patient information."""

    folder: Path
    dataset: str  # "mini-mias" or "folder"
    n_files: int
    images: tuple[ScannedImage, ...]
    skipped: tuple[SkippedFile, ...]
    missing_files: tuple[SkippedFile, ...] = ()  # listed by Info.txt / the manifest, absent on disk
    metadata_files: tuple[str, ...] = ()
    manifest: Path | None = None

    @property
    def n_ok(self) -> int:
        return len(self.images)

    @property
    def records(self) -> list[ImageRecord]:
        return [image.record for image in self.images]

    @property
    def n_patients(self) -> int | None:
        if self.dataset != "mini-mias" and self.manifest is None:
            return None
        return len({image.record.patient_id for image in self.images})

    @property
    def class_counts(self) -> dict[str, int]:
        counts = Counter(image.record.label or UNLABELLED for image in self.images)
        return {name: counts.get(name, 0) for name in (*CLASS_NAMES, UNLABELLED)}

    def to_dict(self) -> dict:
        """Counts and file-level outcomes, JSON-ready; no pixel data."""
        records = self.records
        return {
            "dataset": self.dataset,
            "folder": str(self.folder),
            "manifest": str(self.manifest) if self.manifest else None,
            "n_files": self.n_files,
            "n_ok": self.n_ok,
            "n_skipped": len(self.skipped),
            "ok_files": [_relative(image.record.path, self.folder) for image in self.images],
            "skipped": [{"file": s.file, "reason": s.reason} for s in self.skipped],
            "skipped_by_reason": dict(Counter(s.reason for s in self.skipped).most_common()),
            "missing_files": [{"file": s.file, "reason": s.reason} for s in self.missing_files],
            "metadata_files": list(self.metadata_files),
            "class_counts": self.class_counts,
            "n_patients": self.n_patients,
            "views": _sorted_counts(r.view or UNKNOWN for r in records),
            "lateralities": _sorted_counts(r.laterality or UNKNOWN for r in records),
            "bit_depths": _sorted_counts(str(image.bits_stored) for image in self.images),
            "formats": _sorted_counts(image.source_format for image in self.images),
            "background_tissue": _sorted_counts(r.background_tissue for r in records if r.background_tissue),
            "n_images_with_lesions": sum(1 for r in records if r.lesions or r.roi_mask),
            "n_lesion_circles": sum(len(r.lesions) for r in records),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def scan_folder(folder: Path, manifest: Path | None = None, *, max_image_bytes: int = MAX_IMAGE_BYTES) -> ScanReport:
    """Scan `folder` (see the module docstring). Raises FileNotFoundError for a missing folder or manifest,
    `ManifestError` for a bad manifest and `MiasError` for a bad mini-MIAS Info.txt."""
    folder = _existing(folder, manifest)
    readers = _Readers.capped(max_image_bytes)
    if manifest is None and is_mias_folder(folder):
        return _scan_mias(folder, readers)
    return _scan_generic(folder, None if manifest is None else Path(manifest), readers)


@dataclass(frozen=True)
class _Readers:
    """The readers a scan uses, with its cap on declared image size."""

    image: Callable[[Path], DecodedImage]
    raster: Callable[[Path], DecodedImage]

    @classmethod
    def capped(cls, max_image_bytes: int) -> _Readers:
        return cls(functools.partial(read_image, max_image_bytes=max_image_bytes),
                   functools.partial(read_raster, max_image_bytes=max_image_bytes))


def _existing(folder: Path, manifest: Path | None) -> Path:
    """`folder` as a Path; FileNotFoundError naming the folder or manifest that does not exist."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    if manifest is not None and not Path(manifest).is_file():
        raise FileNotFoundError(f"{manifest}: no such manifest file")
    return folder


@dataclass(frozen=True)
class FolderEntry:
    """One file below a scanned folder, decoded once: a usable image (`record` and `decoded` set), a file that
    cannot be used (`reason` set) or a metadata file of the data set (`metadata`)."""

    path: Path
    name: str  # relative to the folder
    record: ImageRecord | None = None
    decoded: DecodedImage | None = None
    reason: str | None = None
    metadata: bool = False


def folder_entries(folder: Path, manifest: Path | None = None, *,
                   max_image_bytes: int = MAX_IMAGE_BYTES) -> Iterator[FolderEntry]:
    """Every file below `folder` in scan order (:func:`files_below`, then manifest rows outside the folder),
    decoded one at a time, with the same rules as `scan_folder` (which is built on it). Raises as `scan_folder`."""
    folder = _existing(folder, manifest)
    readers = _Readers.capped(max_image_bytes)
    if manifest is None and is_mias_folder(folder):
        return _mias_entries(folder, read_mias_records(folder, require_images=False), readers)
    manifest = None if manifest is None else Path(manifest)
    return _generic_entries(folder, manifest, _manifest_records(manifest, folder), readers)


def _scan_mias(folder: Path, readers: _Readers) -> ScanReport:
    records = read_mias_records(folder, require_images=False)
    used = {record.path.stem for record in records}
    listed = sorted({row.refnum for row in parse_info((folder / INFO_FILE).read_bytes().decode("latin-1"))})
    missing = tuple(
        SkippedFile(refnum, f"listed in {INFO_FILE}, no {refnum}.pgm or {refnum}.png found")
        for refnum in listed
        if refnum not in used
    )
    images, skipped, metadata = _collect(_mias_entries(folder, records, readers))
    return ScanReport(
        folder=folder,
        dataset="mini-mias",
        n_files=len(images) + len(skipped),
        images=tuple(images),
        skipped=tuple(skipped),
        missing_files=missing,
        metadata_files=tuple(metadata),
    )


def _mias_entries(folder: Path, mias_records: list[ImageRecord], readers: _Readers) -> Iterator[FolderEntry]:
    records = {record.path.resolve(): record for record in mias_records}
    used = {record.path.stem: record.path.name for record in records.values()}
    for path in files_below(folder):
        name = _relative(path, folder)
        if path.parent == folder and (path.name in MIAS_METADATA or path.name.startswith("SHA256SUMS")):
            yield FolderEntry(path, name, metadata=True)
            continue
        record = records.get(path.resolve())
        if record is None:
            yield FolderEntry(path, name, reason=_mias_extra_reason(path, folder, used, readers))
            continue
        decoded = decode_file(readers.raster, path)
        if isinstance(decoded, str):
            yield FolderEntry(path, name, reason=decoded)
        elif decoded.pixels.shape != (IMAGE_SIZE, IMAGE_SIZE):
            height, width = decoded.pixels.shape
            yield FolderEntry(path, name,
                              reason=f"mini-MIAS image is {height}x{width}, expected {IMAGE_SIZE}x{IMAGE_SIZE}")
        else:
            yield FolderEntry(path, name, record=record, decoded=decoded)


def _mias_extra_reason(path: Path, folder: Path, used: dict[str, str], readers: _Readers) -> str:
    if path.parent == folder and IMAGE_NAME.fullmatch(path.name) and path.stem in used:
        return f"another copy of {path.stem} is used ({used[path.stem]})"
    decoded = decode_file(readers.image, path)
    return decoded if isinstance(decoded, str) else f"image not listed in {INFO_FILE}"


def _scan_generic(folder: Path, manifest: Path | None, readers: _Readers) -> ScanReport:
    listed = _manifest_records(manifest, folder)
    images, skipped, metadata = _collect(_generic_entries(folder, manifest, listed, readers))
    missing = [
        SkippedFile(_relative(record.path, folder), "listed in the manifest, file not found")
        for record in listed.values()
        if not record.path.is_file()
    ]
    missing += [
        SkippedFile(_relative(mask, folder), "roi_mask listed in the manifest, file not found")
        for mask in sorted({r.roi_mask for r in listed.values() if r.roi_mask is not None})
        if not mask.is_file()
    ]
    return ScanReport(
        folder=folder,
        dataset="folder",
        n_files=len(images) + len(skipped),
        images=tuple(images),
        skipped=tuple(skipped),
        missing_files=tuple(missing),
        metadata_files=tuple(metadata),
        manifest=manifest,
    )


def _manifest_records(manifest: Path | None, folder: Path) -> dict[Path, ImageRecord]:
    if manifest is None:
        return {}
    records = read_manifest(manifest, check_files=False, root=folder)
    return {record.path.resolve(): record for record in records}


def _generic_entries(folder: Path, manifest: Path | None, listed: dict[Path, ImageRecord],
                     readers: _Readers) -> Iterator[FolderEntry]:
    masks = {record.roi_mask.resolve() for record in listed.values() if record.roi_mask is not None}
    metadata_paths = masks | ({manifest.resolve()} if manifest is not None else set())
    on_disk = files_below(folder)
    seen = {path.resolve() for path in on_disk}
    outside = [record.path for key, record in listed.items() if key not in seen and record.path.is_file()]
    for path in on_disk + outside:
        name = _relative(path, folder)
        if path.resolve() in metadata_paths:
            yield FolderEntry(path, name, metadata=True)
            continue
        decoded = decode_file(readers.image, path)
        if isinstance(decoded, str):
            yield FolderEntry(path, name, reason=decoded)
            continue
        if manifest is None:
            record = ImageRecord(path=path, label=None, patient_id="")
        elif path.resolve() in listed:
            record = listed[path.resolve()]
        else:
            yield FolderEntry(path, name, reason=f"image not listed in the manifest {manifest.name}")
            continue
        record = replace(
            record,
            laterality=record.laterality or decoded.laterality,
            view=record.view or decoded.view,
            breast_side=record.breast_side or decoded.breast_side,
        )
        problem = _annotation_problem(record, decoded, readers)
        if problem:
            yield FolderEntry(path, name, reason=problem)
        else:
            yield FolderEntry(path, name, record=record, decoded=decoded)


def _collect(entries: Iterator[FolderEntry]) -> tuple[list[ScannedImage], list[SkippedFile], list[str]]:
    """(usable images, skipped files, metadata files) of `entries`; pixels are dropped as each is counted."""
    images, skipped, metadata = [], [], []
    for entry in entries:
        if entry.metadata:
            metadata.append(entry.name)
        elif entry.reason is not None:
            skipped.append(SkippedFile(entry.name, entry.reason))
        else:
            images.append(_scanned(entry.record, entry.decoded))
    return images, skipped, metadata


def _annotation_problem(record: ImageRecord, decoded: DecodedImage, readers: _Readers) -> str | None:
    """Lesion circles must have their centre inside the image; an ROI mask must match the image's size."""
    height, width = decoded.pixels.shape[:2]
    for circle in record.lesions:
        if not (0 <= circle.x < width and 0 <= circle.y < height):
            return f"lesion circle centre ({circle.x:g}, {circle.y:g}) outside the {height}x{width} image"
    if record.roi_mask is not None and record.roi_mask.is_file():
        mask = decode_file(readers.image, record.roi_mask)
        if isinstance(mask, str):
            return f"roi_mask unreadable: {mask}"
        if mask.pixels.shape[:2] != (height, width):
            mask_height, mask_width = mask.pixels.shape[:2]
            return f"roi_mask is {mask_height}x{mask_width}, the image {height}x{width}"
    return None


def decode_file(reader: Callable[[Path], DecodedImage], path: Path) -> DecodedImage | str:
    """The decoded image, or the reason it cannot be used. A reader bug is reported, not raised: a data check
    must go through a whole folder."""
    if not path.is_file():
        return "not a regular file (broken link, pipe or device)"
    try:
        return reader(path)
    except UnreadableImage as exc:
        return exc.reason
    except Exception as exc:  # noqa: BLE001 - reported per file, see docstring
        logger.warning("reader raised %s instead of UnreadableImage", type(exc).__name__)
        return f"internal reader error ({type(exc).__name__}: {str(exc)[:200]})"
    except BaseException as exc:
        if not is_decoder_panic(exc):
            raise  # KeyboardInterrupt, SystemExit
        logger.warning("a decoder panicked instead of raising UnreadableImage")
        return f"internal reader error (decoder panic: {str(exc)[:200]})"


def _scanned(record: ImageRecord, decoded: DecodedImage) -> ScannedImage:
    height, width = decoded.pixels.shape[:2]
    return ScannedImage(record, decoded.bits_stored, decoded.source_format, (height, width))


def files_below(folder: Path) -> list[Path]:
    """Every entry below `folder` that is not a folder (regular files, but also broken links or pipes, which the
    scan reports), sorted by relative path; symbolic links to folders are not followed."""
    found = []
    for root, _dirs, files in os.walk(folder):
        found.extend(Path(root) / name for name in files)
    return sorted(found, key=lambda path: _relative(path, folder))


def _relative(path: Path, folder: Path) -> str:
    """`path` relative to `folder` (both made absolute, links not resolved), or as given when outside it."""
    try:
        return Path(os.path.abspath(path)).relative_to(os.path.abspath(folder)).as_posix()
    except ValueError:
        return str(path)


def _sorted_counts(values) -> dict[str, int]:
    return dict(sorted(Counter(values).items()))
