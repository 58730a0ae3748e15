"""Deployment start-up: per-message overhead at a hospital's SuperNode, before (a fresh `flwr-clientapp` per
message) and after (the warm launcher of `mammofl-hospital node`), on loopback.

One SuperLink (insecure, loopback) and one hospital node serve ``--rounds`` rounds of the `smoke` preset's model
(small CNN, 64 px, DP on, local noise, no explanations) on a few mini-MIAS images copied to a temporary hospital
folder, twice:

- before: ``flower-supernode --isolation subprocess``: Flower starts a `flwr-clientapp` process per message; each
  process's lifetime is observed from /proc (50 ms polling): that is the message's wall time at the node;
- after: ``mammofl-hospital node --insecure-test-only``: one warm process; its per-message timings
  (``launcher/timings.jsonl``: from the task's creation at the SuperNode to the reply handed back) are read.

Overhead per message = wall time minus the node's own compute (the app's handler time measured by the warm
launcher on the same messages, with data loaded). The wall time of the fresh process is split further, in fresh
processes of their own: interpreter start, imports (Flower's app runtime, the ClientApp, torch, Opacus), the FAB
install (``flwr.cli.install.install_from_fab``), data and model loading (the node's data from its warm on-disk
cache, the model built), and compute. The SuperNode's own polling of the SuperLink (every 3 s when idle) is the
same in both modes and outside these numbers. Writes ``bench/results/startup.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from statistics import median

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SHARED_MIAS = REPO.parent / "shared" / "data" / "mini-mias"
HOSPITAL_CLI = [sys.executable, "-c", "from client.cli import app; app()"]
OUT = REPO / "bench" / "results" / "startup.json"

_IMPORTS = ("import flwr.supernode.runtime.run_clientapp, opacus, torch, client.node, client.training; "
            "from client.app import app")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _hospital_folder(mias_dir: Path, folder: Path, patients: int) -> Path:
    """A hospital folder: the images of the first `patients` mini-MIAS patients (copied) and a manifest."""
    from client.readers.mias import read_mias_records

    records = read_mias_records(mias_dir)
    chosen = sorted({r.patient_id for r in records})[:patients]
    folder.mkdir(parents=True)
    with open(folder / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label", "patient_id", "laterality", "lesion_x", "lesion_y", "lesion_r"])
        for record in records:
            if record.patient_id not in chosen:
                continue
            if not (folder / record.path.name).exists():
                shutil.copyfile(record.path, folder / record.path.name)
            base = [record.path.name, record.label, record.patient_id, record.laterality]
            if record.lesions:
                writer.writerows([*base, round(c.x), round(c.y), round(c.r)] for c in record.lesions)
            else:
                writer.writerow([*base, "", "", ""])
    return folder


def _run_config(run_dir: Path, rounds: int) -> dict:
    from simulations.presets import PRESETS

    smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
    return {**smoke, "num-server-rounds": rounds, "min-nodes": 1, "min-train-replies": 1,
            "min-evaluate-replies": 1, "round-timeout": 300.0, "dp-mode": "local", "explain-methods": "",
            "run-dir": str(run_dir)}


class _Federation:
    """A loopback SuperLink and one node; every process in its own session, stopped with its group."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []
        self.env = {**os.environ, "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "PYTHONUNBUFFERED": "1",
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        self.port = _free_port()

    def start(self, name: str, args: list[str], home: Path) -> tuple[subprocess.Popen, Path]:
        home.mkdir(parents=True, exist_ok=True)
        log = self.root / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, cwd=self.root, env={**self.env, "FLWR_HOME": str(home)}, stdout=out,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs.append(proc)
        return proc, log

    def __enter__(self) -> _Federation:
        self.start("superlink", [str(BIN / "flower-superlink"), "--insecure", "--isolation", "subprocess",
                                 "--disable-runtime-dependency-installation", "--database",
                                 str(self.root / "link.db"), "--host", "127.0.0.1", "--port", str(self.port)],
                   self.root / "homes" / "superlink")
        self.cli_home = self.root / "homes" / "cli"
        self.cli_home.mkdir(parents=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{self.port}"\n'
            f'insecure = true\n')
        return self

    def __exit__(self, *_exc) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def flwr_run(self, config: dict) -> float:
        text = " ".join(f"{k}={json.dumps(v)}" for k, v in config.items())
        start = time.monotonic()
        result = subprocess.run([str(BIN / "flwr"), "run", str(REPO), "loop", "--stream", "--run-config", text],
                                cwd=self.root, env={**self.env, "FLWR_HOME": str(self.cli_home)},
                                capture_output=True, text=True, timeout=900)
        if result.returncode != 0 or json.loads((Path(config["run-dir"]) / "metrics.json").read_text())[
                "status"] != "completed":
            raise RuntimeError(f"the run failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return time.monotonic() - start


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{path.name}: no '{text}':\n{path.read_text(errors='replace')[-3000:]}")
        time.sleep(0.2)


def _clientapp_lifetimes(home: Path, stop: threading.Event, out: list[float]) -> None:
    """Lifetimes of `flwr-clientapp` processes whose FLWR_HOME is `home` (first to last sight, 50 ms polling)."""
    needle = f"FLWR_HOME={home}".encode()
    seen: dict[int, float] = {}
    while not stop.is_set():
        now = time.monotonic()
        alive = set()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                argv = (entry / "cmdline").read_bytes().split(b"\0")
                if not any(a.endswith(b"flwr-clientapp") for a in argv[:2]):
                    continue
                if needle not in (entry / "environ").read_bytes().split(b"\0"):
                    continue
            except OSError:
                continue
            alive.add(int(entry.name))
            seen.setdefault(int(entry.name), now)
        for pid in [p for p in seen if p not in alive]:
            out.append(now - seen.pop(pid))
        stop.wait(0.05)


def measure_before(root: Path, hospital: Path, rounds: int) -> dict:
    """A fresh `flwr-clientapp` per message (Flower's subprocess isolation)."""
    with _Federation(root) as fed:
        home = root / "homes" / "node"
        node, log = fed.start("supernode", [str(BIN / "flower-supernode"), "--insecure", "--superlink",
                                            f"127.0.0.1:{fed.port}", "--port", str(_free_port()),
                                            "--node-config", _node_config(hospital, root / "state")], home)
        _wait_for(log, "SuperNode ID:", node)
        stop, lifetimes = threading.Event(), []
        watcher = threading.Thread(target=_clientapp_lifetimes, args=(home, stop, lifetimes), daemon=True)
        watcher.start()
        seconds = fed.flwr_run(_run_config(root / "run", rounds))
        time.sleep(0.5)
        stop.set()
        watcher.join()
    return {"messages": len(lifetimes), "wall_per_message_s": lifetimes, "run_s": seconds}


def measure_after(root: Path, hospital: Path, rounds: int) -> dict:
    """One warm launcher (`mammofl-hospital node`)."""
    from client.app_approval import app_hash

    with _Federation(root) as fed:
        node, log = fed.start("node", [*HOSPITAL_CLI, "node", "--insecure-test-only", "--superlink",
                                       f"127.0.0.1:{fed.port}", "--runtime-port", str(_free_port()),
                                       "--approved-app", app_hash(REPO),
                                       "--node-config", _node_config(hospital, root / "state")],
                              root / "homes" / "node")
        _wait_for(log, "launcher serving", node)
        seconds = fed.flwr_run(_run_config(root / "run", rounds))
    served = [json.loads(line) for line in (root / "state" / "launcher" / "timings.jsonl").read_text().splitlines()]
    startup = json.loads((root / "state" / "launcher" / "startup.json").read_text())
    return {"messages": len(served), "served": served, "launcher_imports_s": startup["imports"], "run_s": seconds}


def _node_config(hospital: Path, state: Path) -> str:
    return (f'data-dir="{hospital}" manifest="{hospital / "manifest.csv"}" state-dir="{state}" '
            f'max-epsilon=1000.0 require-tls=false')


def _fresh_process_phases(hospital: Path, state: Path, repeats: int) -> dict:
    """What every fresh `flwr-clientapp` pays before the app's work, each phase timed in fresh processes."""
    from flwr.cli.build import build_fab_from_disk

    def python(code: str, env: dict | None = None) -> tuple[float, str]:
        start = time.monotonic()
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})},
                                check=True)
        return time.monotonic() - start, result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""

    fab = state / "app.fab"
    fab.write_bytes(build_fab_from_disk(REPO))
    phases: dict[str, list[float]] = {"process_start": [], "imports": [], "fab_install": [], "data_model_load": []}
    load = (f"import time, json; {_IMPORTS}; from client.node import hospital_data; "
            f"from common.models import build_model; from common.run_config import NodeConfig, RunConfig; "
            f"from simulations.presets import PRESETS; "
            f"o = {{k: v for k, v in PRESETS['smoke'].overrides.items() if not k.startswith('sim-')}}; "
            f"run = RunConfig.from_flower({{}}, o); "
            f"node = NodeConfig.from_flower({{'data-dir': '{hospital}', 'manifest': '{hospital / 'manifest.csv'}', "
            f"'state-dir': '{state}', 'max-epsilon': 1000.0}}, run=run); "
            f"t = time.perf_counter(); hospital_data(node, run); build_model(run.model_config()); "
            f"print(time.perf_counter() - t)")
    python(load)  # fills the node's on-disk caches, as the first message of a deployment does
    for _ in range(repeats):
        phases["process_start"].append(python("pass")[0])
        phases["imports"].append(float(python(f"import time; t = time.perf_counter(); {_IMPORTS}; "
                                              f"print(time.perf_counter() - t)")[1]))
        home = state / f"flwr-home-{len(phases['fab_install'])}"
        phases["fab_install"].append(float(python(
            f"import time; from flwr.cli.install import install_from_fab; t = time.perf_counter(); "
            f"install_from_fab(open('{fab}', 'rb').read(), skip_prompt=True); print(time.perf_counter() - t)",
            env={"FLWR_HOME": str(home)})[1]))
        phases["data_model_load"].append(float(python(load)[1]))
    return {name: median(values) for name, values in phases.items()}


def measure(mias_dir: Path, *, rounds: int, patients: int, repeats: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="mammofl-startup-") as tmp:
        root = Path(tmp)
        hospital = _hospital_folder(mias_dir, root / "hospital", patients)
        before = measure_before(root / "before", hospital, rounds)
        after = measure_after(root / "after", hospital, rounds)
        (root / "phases").mkdir()
        phases = _fresh_process_phases(hospital, root / "phases", repeats)
    # compute: the app's own work on messages with the data already loaded (all but the first train message)
    handles = [entry["handle"] for entry in after["served"]]
    warm_handles = handles[1:] if len(handles) > 1 else handles
    compute = median(warm_handles)
    before_wall = median(before["wall_per_message_s"])
    after_overhead = [entry["overhead"] for entry in after["served"]]
    return {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "config": {"preset": "smoke", "rounds": rounds, "patients": patients, "dp-mode": "local",
                   "messages_per_mode": len(handles)},
        "before": {
            "per_message_wall_s": round(before_wall, 3),
            "per_message_overhead_s": round(before_wall - compute, 3),
            "split_s": {**{k: round(v, 3) for k, v in phases.items()}, "compute": round(compute, 3)},
            "clientapp_processes": before["messages"], "run_s": round(before["run_s"], 1),
        },
        "after": {
            "per_message_wall_s": round(median(e["total"] for e in after["served"]), 3),
            "per_message_overhead_s": round(median(after_overhead), 3),
            "max_overhead_s": round(max(after_overhead), 3),
            "split_s": {"process_start": 0.0, "imports": 0.0, "fab_install": 0.0,
                        "data_model_load_first_message": round(handles[0] - compute, 3) if handles else None,
                        "queued": round(median(e["queued"] for e in after["served"]), 3),
                        "message_arrival": round(median(e["arrival"] for e in after["served"]), 3),
                        "pull_check_push": round(median(e["pull"] - e["arrival"] + e["check"] + e["push"]
                                                        for e in after["served"]), 3),
                        "compute": round(compute, 3)},
            "launcher_start_once_s": {"imports": after["launcher_imports_s"]},
            "messages": after["messages"], "run_s": round(after["run_s"], 1),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=SHARED_MIAS, help="mini-MIAS folder")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--patients", type=int, default=12, help="mini-MIAS patients in the hospital folder")
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per phase (median)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    result = measure(args.data_dir, rounds=args.rounds, patients=args.patients, repeats=args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    before, after = result["before"], result["after"]
    print(f"# deployment start-up per message ({result['config']['messages_per_mode']} messages, "
          f"{result['machine']['cpus']} CPUs)")
    print(f"before (fresh flwr-clientapp): wall {before['per_message_wall_s']:.2f} s, overhead "
          f"{before['per_message_overhead_s']:.2f} s; split {before['split_s']}")
    print(f"after (warm launcher):         wall {after['per_message_wall_s']:.2f} s, overhead "
          f"{after['per_message_overhead_s']:.2f} s (max {after['max_overhead_s']:.2f}); split {after['split_s']}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
