"""`make bench`: every benchmark of the project, one after the other.

The DP-cost benchmark (``bench.grad_sample_modes``) runs on synthetic inputs, bytes per round (``bench.bytes``)
on the model kinds' real weights. The model-quality, data-path, localisation, membership, screening and scale
benchmarks need mini-MIAS: they run when ``MINI_MIAS_DIR`` names the folder (the Makefile sets it to
``../shared/data/mini-mias`` when that exists) and are skipped with a message otherwise. Model quality runs its
whole default grid (see README, "Model quality", for how long that takes) and writes its JSON and plot to
``cache/bench/model-quality``, then the int8-update check (README, "Performance") to ``cache/bench/update-encoding``;
localisation (README, "Localisation": about 15 minutes on one CPU thread) shares its caches and rewrites
``bench/results/localisation.json``; membership inference (``bench.membership``, README "Membership inference")
rewrites ``bench/results/membership.json``; the data path uses temporary caches; screening throughput
(``bench.screening``) runs on the same mini-MIAS folder; scale (``bench.scale``: federated simulations of 3 to 100
hospitals on the caches model quality filled; README, "Performance") follows, then deployment start-up
(``bench.startup``: a loopback SuperLink and one hospital node, before and after the warm launcher; rewrites
``bench/results/startup.json``). Hostile inputs (``bench.fuzz``:
100,000 mutated files and configs, about 6 minutes on one CPU thread) run last and rewrite ``bench/results/fuzz.json``.
"""

import os
import sys
from pathlib import Path

from bench import bytes as wire_bytes
from bench import (data_path, fuzz, grad_sample_modes, localisation, membership, model_quality, scale, screening,
                   startup)

if __name__ == "__main__":
    grad_sample_modes.main([])
    print()
    wire_bytes.main([])
    data = os.environ.get("MINI_MIAS_DIR", "")
    if data and (Path(data) / "Info.txt").is_file():
        print()
        model_quality.main(["--data-dir", data, "--out", "cache/bench/model-quality"])
        print()  # the AUC effect of int8 updates (README, "Performance"): 10 seeds, local noise, 3 hospitals, eps 3
        model_quality.main(["--data-dir", data, "--out", "cache/bench/update-encoding", "--seeds", *"0123456789",
                            "--epsilons", "3", "--hospitals", "3", "--isolated", "--only", "local",
                            "--update-encoding", "float32", "int8"])
        wire_bytes.main(["--quality", "cache/bench/update-encoding/model_quality.json"])
        print()
        data_path.main(["--data-dir", data])
        print()
        localisation.main(["--data-dir", data, "--out", "bench/results"])
        print()
        membership.main(["--data-dir", data, "--out", "bench/results"])
        print()
        dicom = screening.SHARED_DATA / "dicom"
        screening.main(["--mias-dir", data, *(["--dicom"] if dicom.is_dir() else [])])
        print()
        scale.main(["--data-dir", data, "--cache-dir", "cache/bench"])  # warm: model quality filled it
        print()
        startup.main(["--data-dir", data])
    else:
        print("\n# model quality, data path, localisation, membership, screening, scale, start-up: skipped, MINI_MIAS_DIR "
              "does not name a mini-MIAS folder",
              file=sys.stderr)
    print()
    fuzz.main(["--inputs", "100000"])
