"""Screening throughput: images per second with and without heatmap overlays (``python -m bench.screening``).

The model is the demo preset's (frozen EfficientNet-Lite0 block-14 features on 512-px images + cell head, head
weights untrained: speed does not depend on them), saved as a bundle with an operating point and screened with
``client.screening.screen`` exactly as ``mammofl-hospital screen`` does. Inputs: the first ``--images`` mini-MIAS
images (1024 x 1024 PNG), and optionally the four real DICOM mammograms (about 4700 x 2600 to 4700 x 3100).
Prints one line per input set and mode; ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from client.screening import screen
from common.bundle import BundleMeta, save_bundle
from common.inference import Predictor
from common.models import build_model
from common.operating_point import OperatingPoint
from common.signing import Signer, TrustedKeys, config_hash, generate_key
from common.weights import exchanged_weights
from simulations.presets import resolve

SHARED_DATA = Path(os.environ.get("MAMMOFL_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DICOM_MAMMOGRAMS = ("MG1_J2KI", "MG1_JPLY", "1-281.dcm", "1-282.dcm")
BENCH_KEY = generate_key()  # signs the benchmark's untrained bundle; screening verifies it as a hospital would


def demo_bundle(path: Path) -> Path:
    run = resolve("demo").run
    torch.manual_seed(0)
    point = OperatingPoint(threshold=0.3, rule="sensitivity", target=0.9, sensitivity=None, specificity=None,
                           source="benchmark")
    meta = BundleMeta(run.model_config(), run.preprocess_config(), info={"operating_point": point.to_json()})
    signer = Signer(key=BENCH_KEY, config_hash=config_hash(run.to_flower()))
    return save_bundle(path, exchanged_weights(build_model(run.model_config())), meta,
                       sign=signer.for_file(kind="bundle", round=0, epsilon={}))


def measure(predictor: Predictor, files: list[Path], out: Path, *, heatmaps: bool, batch_size: int) -> dict:
    started = time.perf_counter()
    summary = screen(predictor, files, out, heatmaps=heatmaps, batch_size=batch_size, overwrite=True)
    seconds = time.perf_counter() - started
    return {"images": summary.n_scored, "heatmaps": heatmaps, "seconds": round(seconds, 2),
            "images_per_second": round(summary.n_scored / seconds, 3)}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m bench.screening", description=__doc__.splitlines()[0])
    parser.add_argument("--mias-dir", type=Path, default=SHARED_DATA / "mini-mias", help="mini-MIAS folder")
    parser.add_argument("--dicom-dir", type=Path, default=SHARED_DATA / "dicom", help="folder of the DICOM files")
    parser.add_argument("--images", type=int, default=16, help="mini-MIAS images screened per mode")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dicom", action="store_true", help="also screen the four DICOM mammograms")
    parser.add_argument("--json", action="store_true", help="print JSON instead of lines")
    args = parser.parse_args(argv)
    sets = {"mini-MIAS 1024x1024 PNG": sorted(args.mias_dir.glob("mdb*.png"))[: args.images]}
    if args.dicom:
        sets["DICOM mammograms ~4700x2800"] = [args.dicom_dir / name for name in DICOM_MAMMOGRAMS]
    results = []
    with tempfile.TemporaryDirectory(prefix="mammofl-bench-screen-") as tmp:
        predictor = Predictor.from_bundle(demo_bundle(Path(tmp) / "demo.mammofl"),
                                          trusted=TrustedKeys([BENCH_KEY.public_key()], source="benchmark key"))
        for name, files in sets.items():
            if not files or not all(f.is_file() for f in files):
                print(f"# screening {name}: skipped, files not found")
                continue
            for heatmaps in (False, True):
                result = {"input": name, "torch_threads": torch.get_num_threads(),
                          **measure(predictor, files, Path(tmp) / "out", heatmaps=heatmaps,
                                    batch_size=args.batch_size)}
                results.append(result)
                if not args.json:
                    print(f"screening {name}: {result['images']} images, heatmaps "
                          f"{'on ' if heatmaps else 'off'}: {result['images_per_second']:.2f} images/s "
                          f"({result['seconds']:.1f} s, {result['torch_threads']} torch threads)")
    if args.json:
        print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
