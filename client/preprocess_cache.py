"""Per-hospital on-disk cache of preprocessed images, so preprocessing runs once per file and config.

Key: sha256 of the image file's bytes + the preprocessing config's fingerprint (+ the record's ``breast_side``
hint, which changes the output). A renamed or moved file hits the cache; an edited file or another config misses.
Lesion circles and ROI masks are not part of the key: they are mapped with the stored geometry when used.

Layout: ``root/ab/abcdef....npz`` holding ``image``, ``mask`` and the geometry as JSON. Entries are written to a
temporary file in the same folder and moved into place with ``os.replace``: readers never see half an entry. An
unreadable or inconsistent entry is recomputed and overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from client.readers.base import DecodedImage
from common.preprocessing import Geometry, PreprocessConfig, Preprocessed, preprocess
from common.records import ImageRecord

logger = logging.getLogger(__name__)

_FORMAT = 1  # layout of one entry; part of the key
_CHUNK = 1 << 20


class PreprocessCache:
    """Preprocessed images of one hospital, stored under ``root`` (created if missing)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def key(self, record: ImageRecord, config: PreprocessConfig) -> str:
        """The cache key of ``record`` under ``config`` (reads the file's bytes once)."""
        digest = hashlib.sha256()
        with open(record.path, "rb") as handle:
            while chunk := handle.read(_CHUNK):
                digest.update(chunk)
        parts = (f"format={_FORMAT}", f"file={digest.hexdigest()}", f"config={config.fingerprint()}",
                 f"side={record.breast_side}")
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.npz"

    def get_or_compute(
        self,
        record: ImageRecord,
        config: PreprocessConfig,
        *,
        decode: Callable[[Path], DecodedImage],
    ) -> Preprocessed:
        """The preprocessed image of ``record``: from the cache, else decoded, preprocessed and stored."""
        key = self.key(record, config)
        entry = self.path_for(key)
        if entry.exists():
            cached = _load(entry, config)
            if cached is not None:
                return cached
            logger.warning("cache entry %s is unreadable or inconsistent: recomputing it", entry.name)
        decoded = decode(record.path)
        result = preprocess(decoded.pixels, breast_side=record.breast_side or decoded.breast_side, config=config)
        _store(entry, result, config)
        return result


def _store(entry: Path, result: Preprocessed, config: PreprocessConfig) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    meta = json.dumps({"geometry": result.geometry.to_dict(), "breast_side": result.breast_side,
                       "config": config.fingerprint()})
    handle = tempfile.NamedTemporaryFile(dir=entry.parent, prefix=f".{entry.stem[:16]}.", suffix=".tmp", delete=False)
    try:
        with handle:
            np.savez_compressed(handle, image=result.image, mask=result.breast_mask, meta=np.array(meta))
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(handle.name, entry)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def _load(entry: Path, config: PreprocessConfig) -> Preprocessed | None:
    """The stored result, or None where the entry cannot be trusted (truncated, corrupt, other config)."""
    try:
        with np.load(entry, allow_pickle=False) as data:
            image, mask, meta = data["image"], data["mask"], json.loads(str(data["meta"]))
        geometry = Geometry.from_dict(meta["geometry"])
        side = meta["breast_side"]
        if meta["config"] != config.fingerprint() or side not in ("left", "right"):
            return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile):
        return None
    shape = (config.size, config.size)
    if image.dtype != np.float32 or image.shape != shape or mask.dtype != np.bool_ or mask.shape != shape:
        return None
    if geometry.size != config.size or not np.isfinite(image).all():
        return None
    return Preprocessed(image=image, breast_mask=mask, geometry=geometry, breast_side=side)
