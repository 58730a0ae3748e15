"""Running a real Flower deployment on loopback for tests: processes, hospital folders, SuperLink, SuperNodes.

Shared by the deployment tests (``test_deployment``, ``test_superlink_restart``). Every process gets its own
FLWR_HOME and a marker variable in its environment; :func:`running_federation` stops what it started (SIGTERM to
the process group, SIGKILL after a timeout), then finds by that marker anything left behind (Flower starts
SuperExec and app processes detached) and stops it too, and checks that nothing is left. Waits poll for a
condition and are all bounded.
"""

from __future__ import annotations

import contextlib
import csv
import io
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
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from flwr.cli.build import build_fab_from_disk

from client.readers.mias import read_mias_records
from server import certs

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MARKER_VAR = "MAMMOFL_DEPLOYMENT_TEST"
CONNECTION = "mammofl-test"
REGISTER_SCRIPT = REPO / "deploy" / "register-nodes.sh"
HOSPITAL_CLI = [sys.executable, "-c", "from client.cli import app; app()"]  # `mammofl-hospital` of this checkout
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


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
            stop_group(proc.popen)
            pytest.fail(f"{name} did not finish within {timeout:.0f} s:\n{proc.tail()}")
        return rc, proc.output()

    def marked(self, home: Path | None = None) -> list[int]:
        """PIDs of live processes whose environment carries this run's marker (and FLWR_HOME `home`, if given)."""
        needles = {f"{MARKER_VAR}={self.marker}".encode()}
        if home is not None:
            needles.add(f"FLWR_HOME={home}".encode())
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if needles <= set((entry / "environ").read_bytes().split(b"\0")):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def stop_all(self) -> list[int]:
        """Stop everything started (newest first), then whatever they left; returns PIDs that survived SIGKILL."""
        for proc in reversed(self.started):
            stop_group(proc.popen)
        leftovers = self.marked()
        for pid in leftovers:
            send_signal(pid, signal.SIGTERM)
        wait_until(lambda: not self.marked(), STOP_TIMEOUT)
        for pid in self.marked():
            log.warning("process %d did not stop on SIGTERM; killing it", pid)
            send_signal(pid, signal.SIGKILL)
        wait_until(lambda: not self.marked(), STOP_TIMEOUT)
        return self.marked()


def stop_group(popen: subprocess.Popen) -> None:
    """SIGTERM to a running process's group (its own session), SIGKILL after a timeout. Children left after it
    exited are found by `Processes.marked` instead: its group id may be reused once it is gone."""
    if popen.poll() is not None:
        return
    killpg(popen.pid, signal.SIGTERM)
    try:
        popen.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        killpg(popen.pid, signal.SIGKILL)
        popen.wait(timeout=STOP_TIMEOUT)


def killpg(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def send_signal(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def wait_until(condition: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    """Poll `condition` until it returns something truthy (returned) or `timeout` passes (returns None)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() >= deadline:
            return None
        time.sleep(interval)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tls_ready(port: int, ca_cert: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca_cert))
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as raw:
            with context.wrap_socket(raw, server_hostname="localhost"):
                return True
    except (OSError, ssl.SSLError):
        return False


# ---------------------------------------------------------------- hospital folders
def make_hospital_folders(mias_dir: Path, root: Path, names: list[str], *,
                          patients_per_class: int = 2) -> dict[str, Path]:
    """One folder per hospital: a few mini-MIAS images (copied) and a manifest with labels and lesion circles.

    Patients are split between hospitals (none shared): per hospital `patients_per_class` patients with a malignant
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
            chosen = patients[index * patients_per_class:(index + 1) * patients_per_class]
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
    """A SuperLink (TLS, node auth, SQLite `--database`, subprocess isolation) and the CLI connection to it."""

    root: Path
    procs: Processes
    certs: certs.CertPaths
    port: int
    cli_home: Path
    superlink: Started | None = None

    @property
    def database(self) -> Path:
        return self.root / "superlink-state.db"

    def start_superlink(self) -> Started:
        """Start `flower-superlink` on this federation's port, certificates and database; wait until it serves."""
        link = self.procs.start(
            "superlink",
            [
                str(BIN / "flower-superlink"),
                "--ssl-ca-certfile", str(self.certs.ca_cert),
                "--ssl-certfile", str(self.certs.server_cert),
                "--ssl-keyfile", str(self.certs.server_key),
                "--enable-supernode-auth",
                "--database", str(self.database),
                "--disable-runtime-dependency-installation",
                "--isolation", "subprocess",
                "--host", "127.0.0.1",
                "--port", str(self.port),
            ],
            home=self.home("superlink"),
            cwd=self.root,
        )
        ready = wait_until(lambda: link.popen.poll() is not None or tls_ready(self.port, self.certs.ca_cert),
                           START_TIMEOUT)
        assert ready and link.popen.poll() is None, f"SuperLink did not start:\n{link.tail()}"
        self.superlink = link
        return link

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink's process group and every process it started (SuperExec, the ServerApp, which
        Flower detaches): the coordinator machine losing power."""
        assert self.superlink is not None
        home = self.home("superlink")
        killpg(self.superlink.popen.pid, signal.SIGKILL)
        for pid in self.procs.marked(home):
            send_signal(pid, signal.SIGKILL)
        assert self.superlink.popen.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL
        assert wait_until(lambda: not self.procs.marked(home), STOP_TIMEOUT), (
            f"SuperLink processes survived SIGKILL: {self.procs.marked(home)}")

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

    def start_supernode(self, name: str, private_key: Path, node_config: str | None, *,
                        max_retries: int | None = 3) -> Started:
        """Start a registered SuperNode; `max_retries` None: Flower's default, reconnect for ever."""
        args = [
            str(BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--port", str(free_port()),
        ]
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if node_config is not None:
            args += ["--node-config", node_config]
        return self.procs.start(name, args, home=self.home(name), cwd=self.root)

    def start_node(self, name: str, private_key: Path, node_config: str, *, approved: str) -> Started:
        """`mammofl-hospital node`: the hospital's SuperNode (process isolation, TLS, its key) and its warm
        launcher, which runs the hospital's own ClientApp for the app hash `approved` only."""
        args = [*HOSPITAL_CLI, "node", "--superlink", f"127.0.0.1:{self.port}",
                "--root-certificates", str(self.certs.ca_cert), "--auth-supernode-private-key", str(private_key),
                "--runtime-port", str(free_port()), "--max-retries", "3", "--approved-app", approved,
                "--node-config", node_config]
        return self.procs.start(name, args, home=self.home(name), cwd=self.root, env={"PYTHONPATH": str(REPO)})

    def power_off_on_message(self, node: Started, *, during: Started, timeout: float, nth: int = 1) -> float:
        """Wait (bounded, and only while `during` runs) until `node`'s SuperNode has received its `nth` message,
        then SIGKILL the node's process group (launcher and SuperNode). Returns the time of the kill."""
        home = self.home(node.name)

        def nth_received() -> bool:
            return during.popen.poll() is not None or node.output().count("Receiving:") >= nth

        received = wait_until(nth_received, timeout, interval=0.05)
        assert received and during.popen.poll() is None, (
            f"{node.name} did not receive {nth} messages within {timeout:.0f} s while {during.name} ran:\n"
            f"{node.tail()}\n--- {during.name}:\n{during.tail()}")
        killpg(node.popen.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert node.popen.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL
        assert wait_until(lambda: not self.procs.marked(home), STOP_TIMEOUT), (
            f"{node.name} processes survived SIGKILL: {self.procs.marked(home)}")
        return killed_at

    def home(self, name: str) -> Path:
        """FLWR_HOME of a started process: what its children inherit, so it tells whose they are."""
        return self.root / "homes" / name


@contextlib.contextmanager
def running_federation(tmp_path: Path) -> Iterator[Federation]:
    """A started SuperLink with TLS, node auth and an SQLite database; the CLI connection written to FLWR_HOME.
    On exit every process started through it is stopped (and the test fails if one survives)."""
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
        port = free_port()
        cli_home = tmp_path / "homes" / "cli"
        cli_home.mkdir(parents=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{paths.ca_cert}"\n'
        )
        federation = Federation(root=tmp_path, procs=procs, certs=paths, port=port, cli_home=cli_home)
        federation.start_superlink()
        yield federation
    finally:
        survivors = procs.stop_all()
        for proc in procs.started:
            log.info("%s exit code %s", proc.name, proc.popen.returncode)
        assert not survivors, f"processes left running: {survivors}"


def snapshot_app(app_dir: Path, dest: Path) -> Path:
    """The files of `app_dir`'s FAB (what `flwr run app_dir` submits), unpacked in `dest`: a release to approve
    and run that edits to the working tree during a test cannot change."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))) as archive:
        archive.extractall(dest)
    shutil.rmtree(dest / ".info")
    return dest


def node_config_text(data_dir: Path, state_dir: Path, max_epsilon: float, **policy: str) -> str:
    """`flower-supernode --node-config` text; `policy`: more node-policy keys (python names, string values)."""
    extra = "".join(f' {key.replace("_", "-")}="{value}"' for key, value in policy.items())
    return (
        f'data-dir="{data_dir}" manifest="{data_dir / "manifest.csv"}" '
        f'state-dir="{state_dir}" max-epsilon={max_epsilon}{extra}'
    )


def run_config_text(values: dict[str, Any]) -> str:
    """`flwr run --run-config` text: space-separated key=value with TOML values."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())

