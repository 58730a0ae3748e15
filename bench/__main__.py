"""`make bench`: every benchmark of the project, one after the other.

The DP-cost benchmark (``bench.grad_sample_modes``) runs on synthetic inputs. The model-quality, data-path,
localisation and screening benchmarks need mini-MIAS: they run when ``MINI_MIAS_DIR`` names the folder (the
Makefile sets it to ``../shared/data/mini-mias`` when that exists) and are skipped with a message otherwise. Model
quality runs its whole default grid (see README, "Model quality", for how long that takes) and writes its JSON and
plot to ``cache/bench/model-quality``; localisation (README, "Localisation": about 15 minutes on one CPU thread)
shares its caches and rewrites ``bench/results/localisation.json``; the data path uses temporary caches; screening
throughput (``bench.screening``) runs on the same mini-MIAS folder; deployment start-up (``bench.startup``: a
loopback SuperLink and one hospital node, before and after the warm launcher) rewrites
``bench/results/startup.json``.
"""

import os
import sys
from pathlib import Path

from bench import data_path, grad_sample_modes, localisation, model_quality, screening, startup

if __name__ == "__main__":
    grad_sample_modes.main([])
    data = os.environ.get("MINI_MIAS_DIR", "")
    if data and (Path(data) / "Info.txt").is_file():
        print()
        model_quality.main(["--data-dir", data, "--out", "cache/bench/model-quality"])
        print()
        data_path.main(["--data-dir", data])
        print()
        localisation.main(["--data-dir", data, "--out", "bench/results"])
        print()
        dicom = screening.SHARED_DATA / "dicom"
        screening.main(["--mias-dir", data, *(["--dicom"] if dicom.is_dir() else [])])
        print()
        startup.main(["--data-dir", data])
    else:
        print("\n# model quality, data path, localisation, screening, start-up: skipped, MINI_MIAS_DIR does not name a "
              "mini-MIAS folder",
              file=sys.stderr)
