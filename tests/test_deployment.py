"""The real deployment on loopback: SuperLink + SuperNodes as separate processes, TLS and node authentication on.

Certificates and node keys come from `server.certs`; `flower-superlink` runs with TLS, `--enable-supernode-auth`,
an SQLite `--database` and `--isolation subprocess`; two registered `flower-supernode` processes each serve one
hospital folder (a few mini-MIAS images with a CSV manifest, as a hospital would provide); `flwr run --stream`
runs one federated round of the real apps and the run directory the ServerApp wrote is checked. A third SuperNode
whose key was never registered must be refused.

Every process gets its own FLWR_HOME and a marker variable in its environment; teardown stops the processes it
started (SIGTERM to the process group, SIGKILL after a timeout) and then finds, by that marker, anything they left
behind (Flower starts SuperExec and app processes detached) and stops it too, then checks that nothing is left.
Waits poll for a condition and are all bounded.

Cost: about 2 minutes on 2 shared cores, mostly Flower's: each message starts a fresh `flwr-clientapp` process
that imports torch and Opacus, and SuperNodes and the ServerApp poll for messages every 3 s. The log line
"deployment test timings" (INFO) gives the phases.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from client.readers.mias import read_mias_records
from server import certs
from simulations.presets import PRESETS

pytestmark = pytest.mark.slow

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARKER_VAR = "MAMMOFL_DEPLOYMENT_TEST"
CONNECTION = "mammofl-test"
REGISTER_SCRIPT = REPO / "deploy" / "register-nodes.sh"

# The federation: the `smoke` preset's run config (one round, small CNN on 64-px images, DP on) without its
# simulation-only keys; both hospitals must reply.
NUM_HOSPITALS = 2
PATIENTS_PER_CLASS = 2  # per hospital: 2 patients with a malignant image, 2 with benign, 2 normal-only
MAX_EPSILON = {"hospital-a": 50.0, "hospital-b": 60.0}  # node config max-epsilon (budgets not reached)

START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0
STOP_TIMEOUT = 15.0


def deployment_run_config(run_dir: Path) -> dict[str, Any]:
    """The run config passed with `flwr run --run-config`."""
    smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
    return {**smoke, "min-nodes": NUM_HOSPITALS, "min-train-replies": NUM_HOSPITALS,
            "min-evaluate-replies": NUM_HOSPITALS, "run-dir": str(run_dir)}


# ---------------------------------------------------------------- processes
@dataclass
class Started:
    name: str
    popen: subprocess.Popen
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


@dataclass
class Processes:
    """Starts processes in their own session with a marker in the environment; `stop_all` ends every one."""

    log_dir: Path
    base_env: dict[str, str]
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[Started] = field(default_factory=list)

    def env(self, home: Path) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        return {**self.base_env, "FLWR_HOME": str(home), MARKER_VAR: self.marker}

    def start(self, name: str, args: list[str], *, home: Path, cwd: Path, env: dict[str, str] | None = None) -> Started:
        log_path = self.log_dir / f"{len(self.started):02d}-{name}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                args, cwd=cwd, env={**self.env(home), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        proc = Started(name, popen, log_path)
        self.started.append(proc)
        return proc

    def run(self, name: str, args: list[str], *, home: Path, cwd: Path, timeout: float,
            env: dict[str, str] | None = None) -> tuple[int, str]:
        """Run a command to completion (bounded); its process is tracked like the others."""
        proc = self.start(name, args, home=home, cwd=cwd, env=env)
        try:
            rc = proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_group(proc.popen)
            pytest.fail(f"{name} did not finish within {timeout:.0f} s:\n{proc.tail()}")
        return rc, proc.output()

    def marked(self) -> list[int]:
        """PIDs of live processes whose environment carries this run's marker."""
        needle = f"{MARKER_VAR}={self.marker}".encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop_all(self) -> list[int]:
        """Stop everything started (newest first), then whatever they left; returns PIDs that survived SIGKILL."""
        for proc in reversed(self.started):
            _stop_group(proc.popen)
        leftovers = self.marked()
        for pid in leftovers:
            _signal(pid, signal.SIGTERM)
        _wait_until(lambda: not self.marked(), STOP_TIMEOUT)
        for pid in self.marked():
            log.warning("process %d did not stop on SIGTERM; killing it", pid)
            _signal(pid, signal.SIGKILL)
        _wait_until(lambda: not self.marked(), STOP_TIMEOUT)
        return self.marked()


def _stop_group(popen: subprocess.Popen) -> None:
    """SIGTERM to a running process's group (its own session), SIGKILL after a timeout. Children left after it
    exited are found by `Processes.marked` instead: its group id may be reused once it is gone."""
    if popen.poll() is not None:
        return
    _killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        _killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=STOP_TIMEOUT)


def _killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tls_ready(port: int, ca_cert: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True
    except (OSError, ssl.SSLError):
        return False


# ---------------------------------------------------------------- hospital folders
def make_hospital_folders(mias_dir: Path, root: Path, names: list[str]) -> dict[str, Path]:
    """One folder per hospital: a few mini-MIAS images (copied) and a manifest with labels and lesion circles.

    Patients are split between hospitals (none shared): per hospital `PATIENTS_PER_CLASS` patients with a malignant
    image, as many with a benign one, as many with normal images only.
    """
    records = read_mias_records(mias_dir)
    by_patient: dict[str, list] = {}
    for record in records:
        by_patient.setdefault(record.patient_id, []).append(record)

    def worst(patient: str) -> str:
        labels = {r.label for r in by_patient[patient]}
        return "malignant" if "malignant" in labels else "benign" if "benign" in labels else "normal"

    groups = {label: [p for p in sorted(by_patient) if worst(p) == label]
              for label in ("malignant", "benign", "normal")}
    folders = {}
    for index, name in enumerate(names):
        folder = root / name
        folder.mkdir(parents=True)
        rows = []
        for patients in groups.values():
            chosen = patients[index * PATIENTS_PER_CLASS:(index + 1) * PATIENTS_PER_CLASS]
            for patient in chosen:
                for record in by_patient[patient]:
                    shutil.copyfile(record.path, folder / record.path.name)
                    base = [record.path.name, record.label, f"{name}-{patient}", record.laterality]
                    if record.lesions:
                        rows += [[*base, round(c.x), round(c.y), round(c.r)] for c in record.lesions]
                    else:
                        rows.append([*base, "", "", ""])
        with open(folder / "manifest.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "label", "patient_id", "laterality", "lesion_x", "lesion_y", "lesion_r"])
            writer.writerows(rows)
        os.chmod(folder, 0o555)  # a hospital's images are read-only to the node
        folders[name] = folder
    return folders


# ---------------------------------------------------------------- the federation
@dataclass
class Federation:
    root: Path
    procs: Processes
    certs: certs.CertPaths
    port: int
    cli_home: Path

    def flwr(self, name: str, *args: str, timeout: float = 60.0) -> tuple[int, str]:
        return self.procs.run(name, [str(BIN / "flwr"), *args], home=self.cli_home, cwd=self.root, timeout=timeout)

    def register_all(self, keys_dir: Path) -> tuple[int, str]:
        """Register every `*.pub` in `keys_dir` with deploy/register-nodes.sh (`flwr supernode register`)."""
        env = {"SUPERLINK_ADDRESS": f"127.0.0.1:{self.port}", "CA_CERT": str(self.certs.ca_cert),
               "KEYS_DIR": str(keys_dir)}
        return self.procs.run("register-nodes", ["sh", str(REGISTER_SCRIPT)], home=self.root / "homes" / "register",
                              cwd=self.root, timeout=120.0, env=env)

    def nodes(self) -> dict[int, str]:
        rc, out = self.flwr("supernode-list", "supernode", "list", CONNECTION, "--format", "json")
        assert rc == 0, out
        return {int(node["node-id"]): node["status"] for node in json.loads(out)["nodes"]}

    def start_supernode(self, name: str, private_key: Path, node_config: str | None) -> Started:
        args = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--port", str(_free_port()),
            "--max-retries", "3",
        ]
        if node_config is not None:
            args += ["--node-config", node_config]
        return self.procs.start(name, args, home=self.root / "homes" / name, cwd=self.root)


@pytest.fixture
def federation(tmp_path) -> Iterator[Federation]:
    """A SuperLink with TLS, node auth and an SQLite database; the CLI connection written to FLWR_HOME."""
    base_env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "COLUMNS": "200",
    }
    procs = Processes(log_dir=tmp_path / "logs", base_env=base_env)
    procs.log_dir.mkdir()
    try:
        paths = certs.write_certificates(tmp_path / "certs")
        port = _free_port()
        link = procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(paths.ca_cert),
                "--ssl-certfile", str(paths.server_cert),
                "--ssl-keyfile", str(paths.server_key),
                "--enable-supernode-auth",
                "--database", str(tmp_path / "superlink-state.db"),
                "--disable-runtime-dependency-installation",
                "--isolation", "subprocess",
                "--host", "127.0.0.1",
                "--port", str(port),
            ],
            home=tmp_path / "homes" / "superlink",
            cwd=tmp_path,
        )
        ready = _wait_until(lambda: link.popen.poll() is not None or _tls_ready(port, paths.ca_cert), START_TIMEOUT)
        assert ready and link.popen.poll() is None, f"SuperLink did not start:\n{link.tail()}"
        cli_home = tmp_path / "homes" / "cli"
        cli_home.mkdir(parents=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{paths.ca_cert}"\n'
        )
        yield Federation(root=tmp_path, procs=procs, certs=paths, port=port, cli_home=cli_home)
    finally:
        survivors = procs.stop_all()
        for proc in procs.started:
            log.info("%s exit code %s", proc.name, proc.popen.returncode)
        assert not survivors, f"processes left running: {survivors}"


def _node_config(data_dir: Path, state_dir: Path, max_epsilon: float) -> str:
    return (
        f'data-dir="{data_dir}" manifest="{data_dir / "manifest.csv"}" '
        f'state-dir="{state_dir}" max-epsilon={max_epsilon}'
    )


def _run_config(values: dict[str, Any]) -> str:
    """`flwr run --run-config` text: space-separated key=value with TOML values."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def test_federated_round_over_tls_with_node_auth(federation, mias_dir, tmp_path):
    fed = federation
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.monotonic() - clock
        clock = time.monotonic()

    names = list(MAX_EPSILON)
    folders = make_hospital_folders(mias_dir, tmp_path / "hospitals", names)
    keys = certs.write_node_key_pairs(tmp_path / "node-keys", names)
    (rogue_key,) = certs.write_node_key_pairs(tmp_path / "unregistered-keys", ["unregistered"])
    rc, out = fed.register_all(tmp_path / "node-keys")
    assert rc == 0, out
    assert out.splitlines() == ["registered: hospital-a.pub", "registered: hospital-b.pub"]
    registered = fed.nodes()
    assert list(registered.values()) == ["registered"] * NUM_HOSPITALS
    node_ids = set(registered)
    lap("register")

    for name, paths in zip(names, keys, strict=True):
        fed.start_supernode(name, paths.private, _node_config(folders[name], tmp_path / "state" / name,
                                                              MAX_EPSILON[name]))
    # A node whose key the SuperLink does not know is turned away at activation.
    rogue = fed.start_supernode("unregistered", rogue_key.private, None)
    try:
        rogue_rc = rogue.popen.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused within {START_TIMEOUT:.0f} s:\n{rogue.tail()}")
    rogue_log = rogue.output()
    assert rogue_rc == 1, rogue_log
    assert "Exit Code: 305" in rogue_log
    assert "[code: 2004] Failed to activate SuperNode" in rogue_log
    online = _wait_until(lambda: set(fed.nodes().values()) == {"online"}, START_TIMEOUT, interval=1.0)
    assert online, f"SuperNodes not online: {fed.nodes()}"
    assert set(fed.nodes()) == node_ids  # the refused node never joined
    lap("nodes online, unregistered node refused")

    run_dir = tmp_path / "run"
    config = deployment_run_config(run_dir)
    rc, out = fed.flwr("flwr-run", "run", str(REPO), CONNECTION, "--stream", "--run-config", _run_config(config),
                       timeout=RUN_TIMEOUT)
    assert rc == 0, out[-6000:]
    lap("flwr run")

    rc, listing = fed.flwr("flwr-ls", "ls", CONNECTION, "--format", "json")
    assert rc == 0, listing
    runs = json.loads(listing)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [1]
    round_1 = metrics["rounds"][0]
    assert round_1["replies"]["train"]["valid"] == NUM_HOSPITALS
    assert round_1["epsilon_max"] > 0
    privacy = metrics["privacy"]
    assert sorted(privacy) == sorted(f"node-{node_id}" for node_id in node_ids)
    assert max(entry["epsilon"] for entry in privacy.values()) == pytest.approx(round_1["epsilon_max"])
    for entry in privacy.values():
        assert entry["noise_multiplier"] == config["noise-multiplier"]
        assert entry["steps"] > 0
        assert entry["accountant"] == "rdp"
    assert metrics["config"]["num-server-rounds"] == 1
    assert metrics["config"]["model"] == config["model"]
    assert (run_dir / "model.mammofl").is_file()
    epsilons = sorted(entry["epsilon"] for entry in privacy.values())
    ledger_epsilons = []
    for name in names:  # each hospital recorded the round in the ledger on its own disk (node config state-dir)
        ledger = json.loads((tmp_path / "state" / name / "privacy-ledger.json").read_text())
        assert [(e["run_id"], e["server_round"]) for e in ledger["entries"]] == [(runs[0]["run-id"], 1)]
        ledger_epsilons.append(ledger["entries"][0]["epsilon"])
    assert sorted(ledger_epsilons) == pytest.approx(epsilons)

    # Registering again (e.g. `docker compose up` after a restart) is harmless.
    rc, out = fed.register_all(tmp_path / "node-keys")
    assert rc == 0, out
    assert out.splitlines() == ["already registered: hospital-a.pub", "already registered: hospital-b.pub"]
    assert set(fed.nodes()) == node_ids
    lap("checks")
    log.info("deployment test timings (s): %s", {k: round(v, 1) for k, v in timings.items()})
