"""The real deployment on loopback: SuperLink + hospital nodes as separate processes, TLS and node authentication on.

Certificates and node keys come from `server.certs`; `flower-superlink` runs with TLS, `--enable-supernode-auth`,
an SQLite `--database` and `--isolation subprocess`; three registered hospital nodes (`mammofl-hospital node`: a
`flower-supernode --isolation process` plus the hospital's warm launcher, `client.launcher`) each serve one
hospital folder (a few mini-MIAS images with a CSV manifest, as a hospital would provide); `flwr run --stream`
runs one federated round of the real apps and the run directory the ServerApp wrote is checked. The app is a
snapshot of this checkout (the files of its FAB): each node approves exactly its hash. A node whose key was never
registered must be refused.

The round uses distributed noise over secure aggregation (Flower's SecAgg+: setup, key sharing, masked vectors,
unmasking; each a message to every node): each hospital adds its share sigma / sqrt(2) of the noise (threshold
T = 3 - 1 dropout) and only the sum reaches the coordinator. A killed node must not fail the federation: once the
third hospital's SuperNode has received its training message (its third SecAgg+ message, after its keys were
shared), that node (SuperNode and launcher, one process group) is killed with SIGKILL (a hospital machine losing
power). The SuperLink declares it offline when its heartbeats stop (at most 2 x 30 s after the last one, sent every
~24 s) and answers its message with a "node unavailable" error reply; the survivors' shares of the dead node's
secret key let the coordinator remove its masks, the run config asks for 2 nodes and 2 replies per step and gives
each step `ROUND_TIMEOUT`, more than that, so the round completes from the two survivors with the noise of their
two shares (sigma) in the sum, the failure counted, and the run ends `finished:completed`.

Start-up tax: each survivor's launcher logs every message's timings (`state-dir/launcher/timings.jsonl`); the test
asserts that every message spent less than `MAX_OVERHEAD` seconds at the node besides the app's own work and the
wait for the message to arrive from the SuperLink (`client.launcher.MessageTimings`).

Every process gets its own FLWR_HOME and a marker variable in its environment; teardown stops the processes it
started (SIGTERM to the process group, SIGKILL after a timeout) and then finds, by that marker, anything they left
behind (Flower starts SuperExec and app processes detached) and stops it too, then checks that nothing is left.
Waits poll for a condition and are all bounded.

Cost: a few minutes on 2 shared cores, mostly Flower's: the nodes import torch once each at start, SuperNodes and
the ServerApp poll for messages every 3 s, and the training stage lasts until the killed node's heartbeat expires
(36 to 60 s after the kill). The log line "deployment test timings" (INFO) gives the phases.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
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

from client.app_approval import app_hash
from client.hospital_node import LAUNCHER_DIR
from client.launcher import REFUSALS_FILE, TIMINGS_FILE
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
HOSPITAL_CLI = [sys.executable, "-c", "from client.cli import app; app()"]  # `mammofl-hospital` of this checkout
MAX_OVERHEAD = 5.0  # seconds per message at a node, besides the app's own work (issue 14's bar)

# The federation: the `smoke` preset's run config (one round, small CNN on 64-px images, DP on) without its
# simulation-only keys, distributed noise over SecAgg+; three hospitals, the last one killed during training; the
# two survivors must reply.
PATIENTS_PER_CLASS = 2  # per hospital: 2 patients with a malignant image, 2 with benign, 2 normal-only
MAX_EPSILON = {"hospital-a": 50.0, "hospital-b": 60.0, "hospital-c": 70.0}  # node config (budgets not reached)
NUM_HOSPITALS = len(MAX_EPSILON)
KILLED = "hospital-c"
SURVIVORS = NUM_HOSPITALS - 1
KILLED_AT_MESSAGE = 3  # SecAgg+ setup, key sharing, then the masked-vector stage: training
# Per train/evaluate step. The killed node's error reply comes at most ~63 s after the kill (heartbeat patience
# 2 x 30 s, plus the ServerApp's 3 s polling), the survivors' replies before it; the step ends when the last of
# them is in, so the timeout costs nothing unless something hangs. Shorter than that detection, the killed node
# would be counted "missing" at the timeout instead of "failed".
ROUND_TIMEOUT = 240.0

START_TIMEOUT = 60.0
RUN_TIMEOUT = 600.0
STOP_TIMEOUT = 15.0


def deployment_run_config(run_dir: Path) -> dict[str, Any]:
    """The run config passed with `flwr run --run-config`: the survivors alone are enough for every step."""
    smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
    return {**smoke, "min-nodes": SURVIVORS, "min-train-replies": SURVIVORS, "min-evaluate-replies": SURVIVORS,
            "round-timeout": ROUND_TIMEOUT, "run-dir": str(run_dir), "dp-mode": "distributed",
            "secagg-dropouts": 1}


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

    def start_node(self, name: str, private_key: Path, node_config: str, *, approved: str) -> Started:
        """`mammofl-hospital node`: the hospital's SuperNode (process isolation, TLS, its key) and its warm
        launcher, which runs the hospital's own ClientApp for the app hash `approved` only."""
        args = [
            *HOSPITAL_CLI, "node",
            "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs.ca_cert),
            "--auth-supernode-private-key", str(private_key),
            "--runtime-port", str(_free_port()),
            "--max-retries", "3",
            "--approved-app", approved,
            "--node-config", node_config,
        ]
        return self.procs.start(name, args, home=self.home(name), cwd=self.root, env={"PYTHONPATH": str(REPO)})

    def home(self, name: str) -> Path:
        """FLWR_HOME of a started process: what its children inherit, so it tells whose they are."""
        return self.root / "homes" / name

    def power_off(self, node: Started, *, during: Started, timeout: float, nth: int = 1) -> float:
        """Wait (bounded, and only while `during` runs) until `node`'s SuperNode has received its `nth` message,
        then SIGKILL the node's process group: the launcher and its SuperNode. Returns the time of the kill
        (time.monotonic)."""
        home = self.home(node.name)

        def nth_received() -> bool:
            return during.popen.poll() is not None or node.output().count("Receiving:") >= nth

        received = _wait_until(nth_received, timeout, interval=0.05)
        assert received and during.popen.poll() is None, (
            f"{node.name} did not receive {nth} messages within {timeout:.0f} s while {during.name} ran:\n"
            f"{node.tail()}\n--- {during.name}:\n{during.tail()}")
        _killpg(node.popen.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert node.popen.wait(timeout=STOP_TIMEOUT) == -signal.SIGKILL
        assert _wait_until(lambda: not self.procs.marked(home), STOP_TIMEOUT), (
            f"{node.name} processes survived SIGKILL: {self.procs.marked(home)}")
        return killed_at


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


def snapshot_app(app_dir: Path, dest: Path) -> Path:
    """The files of `app_dir`'s FAB (what `flwr run app_dir` submits), unpacked in `dest`: a release to approve
    and run that edits to the working tree during a test cannot change."""
    with zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app_dir))) as archive:
        archive.extractall(dest)
    shutil.rmtree(dest / ".info")
    return dest


def _node_config(data_dir: Path, state_dir: Path, max_epsilon: float) -> str:
    return (
        f'data-dir="{data_dir}" manifest="{data_dir / "manifest.csv"}" '
        f'state-dir="{state_dir}" max-epsilon={max_epsilon}'
    )


def _run_config(values: dict[str, Any]) -> str:
    """`flwr run --run-config` text: space-separated key=value with TOML values."""
    return " ".join(f"{key}={json.dumps(value)}" for key, value in values.items())


def test_federated_round_over_tls_with_node_auth_survives_a_killed_node(federation, mias_dir, tmp_path):
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
    assert out.splitlines() == [f"registered: {name}.pub" for name in names]
    registered = fed.nodes()
    assert list(registered.values()) == ["registered"] * NUM_HOSPITALS
    node_ids = set(registered)
    lap("register")

    release = snapshot_app(REPO, tmp_path / "release")  # the steward approves it; `flwr run` submits it below
    approved = app_hash(release)
    assert approved == app_hash(REPO)
    supernodes = {
        name: fed.start_node(name, paths.private, _node_config(folders[name], tmp_path / "state" / name,
                                                               MAX_EPSILON[name]), approved=approved)
        for name, paths in zip(names, keys, strict=True)
    }
    # A node whose key the SuperLink does not know is turned away at activation.
    rogue = fed.start_node("unregistered", rogue_key.private, f'state-dir="{tmp_path / "state" / "rogue"}"',
                           approved=approved)
    try:
        rogue_rc = rogue.popen.wait(timeout=START_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the unregistered SuperNode was not refused within {START_TIMEOUT:.0f} s:\n{rogue.tail()}")
    rogue_log = rogue.output()
    assert rogue_rc == 1, rogue_log
    assert "Exit Code: 305" in rogue_log
    assert "[code: 2004] Failed to activate SuperNode" in rogue_log
    online = _wait_until(lambda: list(fed.nodes().values()) == ["online"] * NUM_HOSPITALS, START_TIMEOUT,
                         interval=1.0)
    assert online, f"SuperNodes not online: {fed.nodes()}"
    assert set(fed.nodes()) == node_ids  # the refused node never joined
    # Each launcher imports torch, Opacus and the ClientApp once, while its SuperNode connects; a message arriving
    # before that waits for it (start-up, paid once per node, not per message).
    ready = _wait_until(lambda: all("launcher serving" in node.output() for node in supernodes.values()),
                        START_TIMEOUT * 2, interval=1.0)
    assert ready, {name: node.tail(5) for name, node in supernodes.items()}
    lap("nodes online, unregistered node refused")

    run_dir = tmp_path / "run"
    config = deployment_run_config(run_dir)
    flwr_run = fed.procs.start(
        "flwr-run", [str(BIN / "flwr"), "run", str(release), CONNECTION, "--stream", "--run-config",
                     _run_config(config)], home=fed.cli_home, cwd=tmp_path)
    killed_at = fed.power_off(supernodes[KILLED], during=flwr_run, timeout=START_TIMEOUT * 4, nth=KILLED_AT_MESSAGE)
    killed_log = supernodes[KILLED].output()  # it died holding its training message, its keys already shared
    assert killed_log.count("Receiving: train message") == KILLED_AT_MESSAGE, killed_log
    assert killed_log.count("Sending:") == KILLED_AT_MESSAGE - 1, killed_log
    killed_id = int(re.search(r"SuperNode ID: (\d+)", killed_log).group(1))
    assert killed_id in node_ids
    lap(f"{KILLED} received its training message, node killed")
    try:
        rc = flwr_run.popen.wait(timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"flwr run did not finish within {RUN_TIMEOUT:.0f} s:\n{flwr_run.tail()}")
    assert rc == 0, flwr_run.output()[-6000:]
    timings["kill to end of run"] = time.monotonic() - killed_at
    lap("flwr run after the kill")

    rc, listing = fed.flwr("flwr-ls", "ls", CONNECTION, "--format", "json")
    assert rc == 0, listing
    runs = json.loads(listing)["runs"]
    assert [r["status"] for r in runs] == ["finished:completed"], runs
    survivor_ids = node_ids - {killed_id}
    assert fed.nodes() == {node_id: "offline" if node_id == killed_id else "online" for node_id in node_ids}

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [1]
    round_1 = metrics["rounds"][0]
    train = round_1["replies"]["train"]
    assert (train["sampled"], train["valid"], train["failed"], train["missing"]) == (NUM_HOSPITALS, SURVIVORS, 1, 0)
    assert len(train["notes"]) == 1, train  # the failure is named after the killed node, not the SuperLink
    assert train["notes"][0].startswith(f"node-{killed_id}: failed:"), train
    assert "Node Unavailable" in train["notes"][0], train
    secure = round_1["secure_aggregation"]  # only the sum of the two survivors' shares was revealed
    share = config["noise-multiplier"] / 2 ** 0.5
    assert (secure["participants"], secure["contributors"], secure["threshold"]) == (NUM_HOSPITALS, SURVIVORS, 2)
    assert secure["noise_multiplier_of_sum"] == pytest.approx(config["noise-multiplier"])
    evaluate = round_1["replies"]["evaluate"]  # the dead node is no longer sampled
    assert (evaluate["sampled"], evaluate["valid"], evaluate["failed"]) == (SURVIVORS, SURVIVORS, 0), evaluate
    assert round_1["federated_eval"]["num_examples"] > 0
    assert round_1["epsilon_max"] > 0
    privacy = metrics["privacy"]
    assert sorted(privacy) == sorted(f"node-{node_id}" for node_id in survivor_ids)
    assert max(entry["epsilon"] for entry in privacy.values()) == pytest.approx(round_1["epsilon_max"])
    for entry in privacy.values():
        assert entry["noise_multiplier"] == pytest.approx(share)
        assert entry["aggregate_noise_multiplier"] == pytest.approx(config["noise-multiplier"])
        assert entry["epsilon"] < entry["epsilon_own_noise"]
        assert entry["steps"] == 1  # FedSGD: one DP-SGD step per round
        assert entry["accountant"] == "rdp"
    assert metrics["config"]["num-server-rounds"] == 1
    # After the last round each survivor explained the final model on its own validation images: heatmaps and
    # per-image results stay in its state-dir, only counts came back; the report was written.
    explanations = metrics["explanations"]
    assert explanations["asked"] == SURVIVORS and not explanations["notes"], explanations
    ids = {name: int(re.search(r"SuperNode ID: (\d+)", supernodes[name].output()).group(1)) for name in names}
    for name in names:
        if name == KILLED:
            assert f"node-{ids[name]}" not in explanations["hospitals"]
            continue
        results = tmp_path / "state" / name / "explanations" / f"run-{runs[0]['run-id']}" / "results.json"
        assert explanations["hospitals"][f"node-{ids[name]}"] == {
            "images": len(json.loads(results.read_text())["images"])}
    assert "operating_point" in metrics["final"] and (run_dir / "report.html").is_file()
    assert metrics["config"]["model"] == config["model"]
    assert (run_dir / "model.mammofl").is_file()
    epsilons = sorted((entry["epsilon"], entry["epsilon_own_noise"]) for entry in privacy.values())
    ledger_epsilons = []
    for name in names:  # each survivor recorded the round in the ledger on its own disk (node config state-dir)
        ledger_path = tmp_path / "state" / name / "privacy-ledger.json"
        if name == KILLED:  # killed as its training message came in: nothing trained, nothing recorded
            assert not ledger_path.exists()
            continue
        ledger = json.loads(ledger_path.read_text())
        assert [(e["run_id"], e["server_round"]) for e in ledger["entries"]] == [(runs[0]["run-id"], 1)]
        entry = ledger["entries"][0]
        assert (entry["noise_multiplier"], entry["aggregate_noise_multiplier"]) == pytest.approx(
            (share, config["noise-multiplier"]))
        ledger_epsilons.append((entry["epsilon_aggregate"], entry["epsilon"]))
    assert [e for pair in sorted(ledger_epsilons) for e in pair] == pytest.approx([e for pair in epsilons for e in pair])

    # Each survivor's launcher served every message its SuperNode received, in one warm process, each with
    # less than MAX_OVERHEAD seconds at the node besides the app's own work and the wait for the message itself
    # to arrive from the SuperLink (from the task's creation at the SuperNode to the reply handed back to it).
    overheads = {}
    for name in names:
        if name == KILLED:
            continue
        served = [json.loads(line) for line in
                  (tmp_path / "state" / name / LAUNCHER_DIR / TIMINGS_FILE).read_text().splitlines()]
        assert len(served) == supernodes[name].output().count("Receiving:"), served
        assert all(entry["approved"] and entry["status"] == "completed" for entry in served), served
        assert not (tmp_path / "state" / name / LAUNCHER_DIR / REFUSALS_FILE).exists()
        overheads[name] = max(entry["overhead"] for entry in served)
        assert overheads[name] < MAX_OVERHEAD, json.dumps(served, indent=1)
    timings["max overhead per message"] = max(overheads.values())
    timings["max message arrival"] = max(entry["arrival"] for name in names if name != KILLED for entry in (
        json.loads(line) for line in (tmp_path / "state" / name / LAUNCHER_DIR / TIMINGS_FILE).read_text().splitlines()))

    # Registering again (e.g. `docker compose up` after a restart) is harmless.
    rc, out = fed.register_all(tmp_path / "node-keys")
    assert rc == 0, out
    assert out.splitlines() == [f"already registered: {name}.pub" for name in names]
    assert set(fed.nodes()) == node_ids
    lap("checks")
    log.info("deployment test timings (s): %s", {k: round(v, 1) for k, v in timings.items()})
