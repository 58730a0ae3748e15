"""PreprocessCache: runs once per file content and config, survives corrupt entries, writes atomically."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.preprocess_cache import PreprocessCache
from client.readers.raster import read_raster
from common.preprocessing import PreprocessConfig, preprocess
from common.records import ImageRecord, LesionCircle

CONFIG = PreprocessConfig(size=64)


class CountingDecoder:
    """The real raster reader, counting how often it is asked to decode."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path: Path):
        self.calls += 1
        return read_raster(path)


def _write_breast_png(path: Path, *, side: str = "right", bright: int = 150) -> Path:
    rows, cols = np.mgrid[0:120, 0:90]
    from_wall = (89 - cols) if side == "right" else cols
    image = np.where((from_wall / 50.0) ** 2 + ((rows - 60) / 45.0) ** 2 <= 1, bright, 5).astype(np.uint8)
    image[50:60, 60:70] = 255  # a lesion-like bright patch
    image[5:15, 5:15] = 250 if side == "right" else 0  # a film label, clear of the breast
    Image.fromarray(image).save(path)
    return path


def _record(path: Path, **extra) -> ImageRecord:
    return ImageRecord(path=path, label="benign", patient_id="p1", **extra)


def _entries(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_second_call_reads_the_cache_and_does_not_decode(tmp_path):
    png = _write_breast_png(tmp_path / "a.png")
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    first = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    second = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    assert decode.calls == 1
    fresh = preprocess(read_raster(png).pixels, breast_side=None, config=CONFIG)
    for result in (first, second):
        assert np.array_equal(result.image, fresh.image) and result.image.dtype == np.float32
        assert np.array_equal(result.breast_mask, fresh.breast_mask)
        assert result.geometry == fresh.geometry and result.breast_side == "right"
    # a fresh cache object on the same folder (another process, a restart) hits too
    reopened = PreprocessCache(tmp_path / "cache").get_or_compute(_record(png), CONFIG, decode=decode)
    assert reopened.geometry == fresh.geometry
    assert decode.calls == 1
    entries = _entries(tmp_path / "cache")
    assert len(entries) == 1 and entries[0].suffix == ".npz", "one entry, no temporary files left behind"


def test_key_is_file_content_not_name(tmp_path):
    png = _write_breast_png(tmp_path / "a.png")
    moved = tmp_path / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    shutil.copyfile(png, moved)
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    cache.get_or_compute(_record(png), CONFIG, decode=decode)
    cache.get_or_compute(ImageRecord(path=moved, label=None, patient_id="other"), CONFIG, decode=decode)
    assert decode.calls == 1
    _write_breast_png(png, bright=160)  # same name, other pixels
    changed = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    assert decode.calls == 2
    assert changed.image.max() == pytest.approx(1.0) and len(_entries(tmp_path / "cache")) == 2


def test_config_and_side_hint_are_part_of_the_key(tmp_path):
    png = _write_breast_png(tmp_path / "a.png")
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    default = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    other = cache.get_or_compute(_record(png), PreprocessConfig(size=32), decode=decode)
    assert decode.calls == 2 and other.image.shape == (32, 32) and default.image.shape == (64, 64)
    told_left = cache.get_or_compute(_record(png, breast_side="left"), CONFIG, decode=decode)
    assert decode.calls == 3 and told_left.breast_side == "left" and not told_left.geometry.flipped
    assert default.geometry.flipped
    assert cache.key(_record(png), CONFIG) != cache.key(_record(png), PreprocessConfig(size=32))


def test_lesions_are_not_part_of_the_key_and_map_with_the_stored_geometry(tmp_path):
    png = _write_breast_png(tmp_path / "a.png")
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    lesion = LesionCircle(x=64.5, y=54.5, r=5.0)
    plain = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    annotated = cache.get_or_compute(_record(png, lesions=(lesion,), abnormalities=("CIRC",)), CONFIG, decode=decode)
    assert decode.calls == 1
    mapped = annotated.geometry.map_circle(lesion)
    assert mapped == plain.geometry.map_circle(lesion)
    assert annotated.image[int(round(mapped.y)), int(round(mapped.x))] > 0.9  # lands on the bright patch


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_shape"])
def test_corrupt_entry_is_recomputed(tmp_path, damage):
    png = _write_breast_png(tmp_path / "a.png")
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    good = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    entry = cache.path_for(cache.key(_record(png), CONFIG))
    data = entry.read_bytes()
    if damage == "garbage":
        entry.write_bytes(b"not a numpy archive at all")
    elif damage == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        entry.write_bytes(b"")
    else:  # a well-formed archive with the right metadata but arrays of another shape
        with np.load(entry) as stored:
            meta = stored["meta"]
        np.savez(entry.with_suffix(""), image=np.zeros((3, 3), np.float32), mask=np.zeros((3, 3), bool), meta=meta)
    again = cache.get_or_compute(_record(png), CONFIG, decode=decode)
    assert decode.calls == 2
    assert np.array_equal(again.image, good.image) and again.geometry == good.geometry
    cache.get_or_compute(_record(png), CONFIG, decode=decode)
    assert decode.calls == 2, "the rewritten entry is good again"


def test_real_mini_mias_image_cached_once(mias_dir, tmp_path):
    cache, decode = PreprocessCache(tmp_path / "cache"), CountingDecoder()
    record = ImageRecord(path=mias_dir / "mdb028.png", label="malignant", patient_id="014", breast_side="left",
                         lesions=(LesionCircle(x=338, y=1023 - 314, r=56),))
    config = PreprocessConfig()
    first = cache.get_or_compute(record, config, decode=decode)
    second = cache.get_or_compute(record, config, decode=decode)
    assert decode.calls == 1
    assert np.array_equal(first.image, second.image) and first.image.shape == (512, 512)
    centre = second.geometry.map_circle(record.lesions[0])
    assert second.breast_mask[int(round(centre.y)), int(round(centre.x))]
