"""The hospital's data path: first run vs cached, per 100 images, and feature-extraction throughput.

A node prepares its images once and keeps them on its own disk (``client.preprocess_cache``: decoded, segmented,
cropped, flipped, resized; ``client.feature_cache``: the frozen EfficientNet-Lite0 features the model trains on).
This runs the node's own functions on the first ``--images`` mini-MIAS images, in one process, into empty caches
under a temporary folder:

1. preprocessing, first run (read + preprocess + store) and again from the cache;
2. frozen features, first run (the backbone on every image) and again from the cache;

and prints seconds per 100 images for each, the cached speed-up, and feature-extraction images per second. The
model config is the demo preset's (512 px, block-14 features).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from client.feature_cache import FeatureCache
from client.hospital_data import labelled_image, preprocess_records
from client.preprocess_cache import PreprocessCache
from client.readers.mias import read_mias_records
from common.device import default_device
from simulations.presets import resolve

SHARED_MIAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"


def measure(data_dir: Path, images: int, cache_root: Path) -> dict:
    """Seconds for each stage, first run and cached (see the module doc)."""
    run = resolve("demo").run
    records = read_mias_records(data_dir)[:images]
    preprocess_cache = PreprocessCache(cache_root / "preprocessed")
    config = run.preprocess_config()
    model_config = run.model_config()
    out: dict = {"images": len(records), "device": default_device().type}
    for phase in ("first", "cached"):
        start = time.perf_counter()
        prepared, skipped = preprocess_records(records, cache=preprocess_cache, config=config)
        out[f"preprocess_{phase}_s"] = time.perf_counter() - start
        if skipped:
            raise RuntimeError(f"{skipped} images could not be decoded")
    pixels = [labelled_image(p).image for p in prepared]
    feature_cache = FeatureCache(cache_root / "features")
    for phase in ("first", "cached"):
        start = time.perf_counter()
        inputs = feature_cache.inputs(pixels, model_config, device=default_device())
        out[f"features_{phase}_s"] = time.perf_counter() - start
    out["feature_shape"] = list(inputs.shape[1:])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MINI_MIAS_DIR") or SHARED_MIAS))
    parser.add_argument("--images", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mammofl-data-path-") as tmp:
        result = measure(args.data_dir, args.images, Path(tmp))
    per100 = 100 / result["images"]
    print(f"# data path: {result['images']} mini-MIAS images (1024 x 1024), demo preset (512 px, block-14 "
          f"features), torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, device {result['device']}")
    print(f"{'stage':<34} {'first run':>12} {'cached':>10} {'speed-up':>9}")
    for stage, label in (("preprocess", "read + preprocess (s / 100 images)"),
                         ("features", "frozen features (s / 100 images)")):
        first, cached = result[f"{stage}_first_s"] * per100, result[f"{stage}_cached_s"] * per100
        print(f"{label:<34} {first:12.2f} {cached:10.3f} {first / cached:8.0f}x")
    print(f"feature extraction: {result['images'] / result['features_first_s']:.1f} images/s "
          f"(features {result['feature_shape']} per image)")


if __name__ == "__main__":
    main()
