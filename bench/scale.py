"""How many hospitals fit on one machine? Rounds per hour and peak memory of a federated simulation, by size.

Each (hospitals, dp-mode) row is one fresh ``mammofl-sim``-equivalent federated run (``simulations.run``: Flower's
Simulation Engine on Ray, the project's ServerApp and ClientApp) in its own process (``--one``), from an empty state
folder (ledgers, caches) or, with ``--cache-dir``, with every node's cache folder linked to one warm cache (the
cost of filling caches is ``bench.data_path``'s; it does not grow with the number of hospitals, which only share
the same 322 images). The parent process watches it:

- **round times** from the run directory's ``metrics.json`` (``simulations.progress.RoundWatcher``, polled every
  0.5 s): round 1 includes Ray's start-up, the actors' imports, every hospital's first data loading (and, with
  cold caches, preprocessing and frozen-feature extraction); the steady round is the mean of rounds 2.. (rounds
  per hour = 3600 / steady round). With distributed noise every round runs the whole SecAgg+ protocol (fresh
  keys and shares), so its cost is in every round;
- **peak memory**: the largest sum, over the run's whole process tree (the driver, Ray's raylet, GCS, agents and
  the ClientApp actors), of each process's proportional set size (PSS: shared pages split between the processes
  that map them, so torch's libraries loaded by every actor count once), sampled every second with psutil.

Settings: the ``demo`` preset (``effnet_head``, 512 px, one DP-SGD step of batch 20 per round, all of mini-MIAS,
a fifth of the patients held out) with ``explain-methods`` empty (the one-off explanation round after the last
round is not a per-round cost) and ``num-server-rounds`` from ``--rounds``. ``dp-mode`` distributed is the demo's
(SecAgg+ over every hospital, FedSGD); local is each hospital noising its own update (FedAvg, no secure sum).
Partitions are the simulation's own (``common.partitioning``, iid by patient, every hospital at least one
patient). 100 hospitals share the 129 patients outside the test set: 71 get one patient, 29 get two. At the demo's
val-fraction 0.2 none of them keeps a validation split (whole patients), so federated evaluation would get no
usable reply; where that happens the run uses val-fraction 0.5 (the 29 two-patient sites validate on one patient
and train on the other) and ``min-evaluate-replies`` = the hospitals with a validation split; the others have
nothing to evaluate on (with the node policy's noised evaluation they reply noised zero counts).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SHARED_MIAS = Path(__file__).resolve().parents[2] / "shared" / "data" / "mini-mias"
HOSPITALS = (3, 10, 30, 100)
DP_MODES = ("local", "distributed")
#: val-fraction where the demo's 0.2 leaves some hospital without a validation split (100 hospitals).
SMALL_SITE_VAL_FRACTION = 0.5


# ---------------------------------------------------------------- one run (child process)
def run_one(*, hospitals: int, dp_mode: str, rounds: int, data_dir: Path, out: Path,
            sets: tuple[str, ...] = (), cache_dir: Path | None = None) -> None:
    """One federated run of the demo preset with `hospitals` hospitals (raises SimulationError if it fails);
    with `cache_dir`, every hospital's and the coordinator's cache folder is a link to it (warm caches)."""
    from simulations.hospitals import virtual_hospitals
    from simulations.presets import resolve
    from simulations.run import SimulationRequest, run_federated

    overrides = [f"num-hospitals={hospitals}", f"num-server-rounds={rounds}", f"dp-mode={dp_mode}",
                 "explain-methods=", *sets]
    config = resolve("demo", overrides)
    with_validation = virtual_hospitals(data_dir, config).with_validation()
    if with_validation < hospitals:  # sites of 1-2 patients: see the module doc
        config = resolve("demo", [*overrides, f"val-fraction={SMALL_SITE_VAL_FRACTION}"])
        with_validation = virtual_hospitals(data_dir, config).with_validation()
        config = resolve("demo", [*overrides, f"val-fraction={SMALL_SITE_VAL_FRACTION}",
                                  f"min-evaluate-replies={with_validation}"])
    request = SimulationRequest(config=config, mode="federated", data_dir=data_dir, run_dir=out / "run",
                                state_dir=out / "state")
    request.check()
    if cache_dir is not None:
        for name in ["coordinator", *(f"hospital-{k}" for k in range(hospitals))]:
            (out / "state" / name).mkdir(parents=True, exist_ok=True)
            (out / "state" / name / "cache").symlink_to(cache_dir.resolve(), target_is_directory=True)
    run_federated(request)


# ---------------------------------------------------------------- SecAgg+ secret sharing alone
def secagg_sharing(hospitals: int, *, repeats: int = 1) -> dict:
    """Seconds of Flower's own Shamir code (``flwr.common.secure_aggregation.crypto.shamir``, PyCryptodome's
    GF(2^128) arithmetic in Python) that one secure round costs with `hospitals` participants, as the project
    configures SecAgg+ (``num_shares`` = all participants, threshold = all of them with ``secagg-dropouts`` 0):
    each hospital splits two 32-byte secrets (its key and its mask seed) into one share per participant; the
    coordinator rebuilds one secret per hospital (the mask seeds, nobody having dropped out)."""
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares

    secret = bytes(range(32))
    started = time.perf_counter()
    for _ in range(repeats):
        shares = create_shares(secret, hospitals, hospitals)
    create = (time.perf_counter() - started) / repeats
    started = time.perf_counter()
    for _ in range(repeats):
        combine_shares(shares[:hospitals])
    combine = (time.perf_counter() - started) / repeats
    return {"hospitals": hospitals, "node_split_s": 2 * create, "coordinator_combine_s": hospitals * combine,
            "round_cpu_s": hospitals * 2 * create + hospitals * combine}


# ---------------------------------------------------------------- watching a run (parent process)
def tree_memory(pid: int) -> int:
    """Bytes of PSS (RSS where PSS cannot be read) summed over process `pid` and all its descendants."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()
            total += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        except psutil.AccessDenied:
            total += proc.memory_info().rss
    return total


def measure(*, hospitals: int, dp_mode: str, rounds: int, data_dir: Path, workdir: Path, timeout: float,
            sets: tuple[str, ...] = (), cache_dir: Path | None = None) -> dict:
    """Run one size in a child process; its round times, peak memory and outcome (with the error's last lines)."""
    from simulations.progress import RoundWatcher

    out = workdir / f"{hospitals}-{dp_mode}"
    command = [sys.executable, "-m", "bench.scale", "--one", str(hospitals), dp_mode, "--rounds", str(rounds),
               "--data-dir", str(data_dir), "--workdir", str(out), *(a for s in sets for a in ("--set", s)),
               *(["--cache-dir", str(cache_dir)] if cache_dir is not None else [])]
    seen: dict[int, float] = {}
    started = time.monotonic()

    def on_update(document: dict) -> None:
        for entry in document.get("rounds") or []:
            seen.setdefault(int(entry["round"]), time.monotonic() - started)

    log_path = workdir / f"{hospitals}-{dp_mode}.log"
    peak, samples = 0, []
    with open(log_path, "w") as log, RoundWatcher(out / "run", on_update):
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        stop = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not stop.is_set():
                value = tree_memory(child.pid)
                peak = max(peak, value)
                samples.append(value)
                stop.wait(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            code = child.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(child.pid)
            code = None
        stop.set()
        sampler.join()
    seconds = time.monotonic() - started
    marks = [seen[r] for r in sorted(seen)]
    steady = [b - a for a, b in zip(marks, marks[1:])]
    row = {"hospitals": hospitals, "dp_mode": dp_mode, "rounds_asked": rounds, "rounds_done": len(marks),
           "seconds": round(seconds, 1), "first_round_s": round(marks[0], 1) if marks else None,
           "steady_round_s": round(sum(steady) / len(steady), 2) if steady else None,
           "peak_memory_mb": round(peak / 2**20), "exit": "timeout" if code is None else code}
    row["rounds_per_hour"] = round(3600 / row["steady_round_s"]) if row["steady_round_s"] else None
    if code != 0:
        row["error"] = log_path.read_text()[-2000:]
    return row


def _kill_tree(pid: int) -> None:
    """Kill a run and every process it started (Ray's actors leave its process group)."""
    import psutil

    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in reversed(procs):
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass


def machine() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import psutil

        memory = f", {psutil.virtual_memory().total / 2**30:.0f} GiB RAM"
    except ImportError:
        memory = ""
    return f"{cores} cores{memory}, {platform.processor() or platform.machine()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MINI_MIAS_DIR") or SHARED_MIAS))
    parser.add_argument("--hospitals", type=int, nargs="+", default=list(HOSPITALS))
    parser.add_argument("--dp-modes", nargs="+", default=list(DP_MODES), choices=DP_MODES)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per run (the first is the cold one)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds before a run is stopped")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="further run-config overrides of every run")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--cache-dir", type=Path,
                        help="one preprocessing/feature cache (client.preprocess_cache, client.feature_cache "
                             "layout) linked as every node's cache: round 1 then measures warm caches")
    parser.add_argument("--one", nargs=2, metavar=("HOSPITALS", "DP_MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--sharing-only", action="store_true",
                        help="only time SecAgg+'s secret sharing per round (seconds, no simulation)")
    args = parser.parse_args(argv)
    if args.sharing_only:
        print_sharing(args.hospitals)
        return
    if args.one:
        run_one(hospitals=int(args.one[0]), dp_mode=args.one[1], rounds=args.rounds, data_dir=args.data_dir,
                out=args.workdir, sets=tuple(args.sets), cache_dir=args.cache_dir)
        return
    with tempfile.TemporaryDirectory(prefix="mammofl-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        print(f"# scale: demo preset, {args.rounds} rounds per run, {machine()}")
        print(f"{'hospitals':>9} {'dp-mode':<12} {'round 1 (s)':>11} {'steady (s)':>10} {'rounds/h':>9} "
              f"{'peak MB':>8}  outcome")
        rows = []
        for dp_mode in args.dp_modes:
            for n in args.hospitals:
                row = measure(hospitals=n, dp_mode=dp_mode, rounds=args.rounds, data_dir=args.data_dir,
                              workdir=workdir, timeout=args.timeout, sets=tuple(args.sets),
                              cache_dir=args.cache_dir)
                rows.append(row)
                outcome = "ok" if row["exit"] == 0 else f"FAILED ({row['exit']}) after {row['rounds_done']} rounds"
                print(f"{n:>9} {dp_mode:<12} {_num(row['first_round_s']):>11} {_num(row['steady_round_s']):>10} "
                      f"{_num(row['rounds_per_hour']):>9} {row['peak_memory_mb']:>8}  {outcome}", flush=True)
                if row["exit"] != 0:
                    print("    " + row["error"].strip().splitlines()[-1][:200], flush=True)
        print()
        sharing = print_sharing(args.hospitals)
        if args.json:
            args.json.write_text(json.dumps({"machine": machine(), "rounds": args.rounds, "rows": rows,
                                             "secagg_sharing": sharing}, indent=2) + "\n")


def print_sharing(hospitals: list[int]) -> list[dict]:
    """Print and return :func:`secagg_sharing` for each size."""
    print("# SecAgg+ secret sharing per secure round (Flower's Shamir code, one thread): CPU seconds")
    print(f"{'hospitals':>9} {'per hospital':>12} {'coordinator':>12} {'round total':>12}")
    rows = []
    for n in hospitals:
        row = secagg_sharing(n, repeats=3 if n <= 30 else 1)
        rows.append(row)
        print(f"{n:>9} {row['node_split_s']:>12.3f} {row['coordinator_combine_s']:>12.2f} "
              f"{row['round_cpu_s']:>12.2f}", flush=True)
    return rows


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
