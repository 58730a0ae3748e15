"""`make bench`: every benchmark of the project, one after the other.

The model-quality benchmark needs mini-MIAS: it runs when ``MINI_MIAS_DIR`` names the folder (the Makefile sets
it to ``../shared/data/mini-mias`` when that exists) and is skipped with a message otherwise. It runs its whole
default grid (see README, "Model quality", for how long that takes) and writes its JSON and plot to
``cache/bench/model-quality``. Screening throughput (``bench.screening``) runs on the same mini-MIAS folder.
"""

import os
import sys
from pathlib import Path

from bench import grad_sample_modes, model_quality, screening

if __name__ == "__main__":
    grad_sample_modes.main([])
    data = os.environ.get("MINI_MIAS_DIR", "")
    if data and (Path(data) / "Info.txt").is_file():
        print()
        model_quality.main(["--data-dir", data, "--out", "cache/bench/model-quality"])
        print()
        screening.main(["--mias-dir", data])
    else:
        print("\n# model quality: skipped, MINI_MIAS_DIR does not name a mini-MIAS folder", file=sys.stderr)
