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

Processes, teardown and the SuperLink are `deployment_helpers` (shared with `test_superlink_restart`).

Cost: a few minutes on 2 shared cores, mostly Flower's: the nodes import torch once each at start, SuperNodes and
the ServerApp poll for messages every 3 s, and the training stage lasts until the killed node's heartbeat expires
(36 to 60 s after the kill). The log line "deployment test timings" (INFO) gives the phases.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from client.app_approval import app_hash
from client.hospital_node import LAUNCHER_DIR
from client.launcher import REFUSALS_FILE, TIMINGS_FILE
from deployment_helpers import (
    BIN,
    CONNECTION,
    REPO,
    START_TIMEOUT,
    Federation,
    make_hospital_folders,
    node_config_text,
    run_config_text,
    running_federation,
    snapshot_app,
    wait_until,
)
from common.signing import TrustedKeys, verify_file
from server import certs
from server.signing_keys import generate_key_directory
from simulations.presets import PRESETS

pytestmark = pytest.mark.slow

MAX_OVERHEAD = 5.0  # seconds per message at a node, besides the app's own work (issue 14's bar)

log = logging.getLogger(__name__)

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
RUN_TIMEOUT = 600.0


def deployment_run_config(run_dir: Path) -> dict[str, Any]:
    """The run config passed with `flwr run --run-config`: the survivors alone are enough for every step."""
    smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
    return {**smoke, "min-nodes": SURVIVORS, "min-train-replies": SURVIVORS, "min-evaluate-replies": SURVIVORS,
            "round-timeout": ROUND_TIMEOUT, "run-dir": str(run_dir), "dp-mode": "distributed",
            "secagg-dropouts": 1}


@pytest.fixture
def federation(tmp_path) -> Iterator[Federation]:
    with running_federation(tmp_path) as started:
        yield started


def test_federated_round_over_tls_with_node_auth_survives_a_killed_node(federation, mias_dir, tmp_path):
    fed = federation
    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = time.monotonic() - clock
        clock = time.monotonic()

    names = list(MAX_EPSILON)
    folders = make_hospital_folders(mias_dir, tmp_path / "hospitals", names,
                                    patients_per_class=PATIENTS_PER_CLASS)
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
        name: fed.start_node(name, paths.private, node_config_text(folders[name], tmp_path / "state" / name,
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
    online = wait_until(lambda: list(fed.nodes().values()) == ["online"] * NUM_HOSPITALS, START_TIMEOUT,
                         interval=1.0)
    assert online, f"SuperNodes not online: {fed.nodes()}"
    assert set(fed.nodes()) == node_ids  # the refused node never joined
    # Each launcher imports torch, Opacus and the ClientApp once, while its SuperNode connects; a message arriving
    # before that waits for it (start-up, paid once per node, not per message).
    ready = wait_until(lambda: all("launcher serving" in node.output() for node in supernodes.values()),
                       START_TIMEOUT * 2, interval=1.0)
    assert ready, {name: node.tail(5) for name, node in supernodes.items()}
    lap("nodes online, unregistered node refused")

    run_dir = tmp_path / "run"
    keys = generate_key_directory(tmp_path / "signing-key")  # the coordinator's own key, made beforehand
    config = {**deployment_run_config(run_dir), "signing-key": str(keys.private)}
    flwr_run = fed.procs.start(
        "flwr-run", [str(BIN / "flwr"), "run", str(release), CONNECTION, "--stream", "--run-config",
                     run_config_text(config)], home=fed.cli_home, cwd=tmp_path)
    killed_at = fed.power_off_on_message(supernodes[KILLED], during=flwr_run, timeout=START_TIMEOUT * 4, nth=KILLED_AT_MESSAGE)
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
    # the nodes' policy (default `evaluation = noised`) noises the counts: a sum of two tiny noised validation
    # splits may well be 0, so only the noise is asserted
    assert round_1["federated_eval"]["evaluation_noise"] > 0 and round_1["federated_eval"]["num_examples"] >= 0
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
        # the exact count stays at the hospital; what it reported is noised (client.explanation_round.noised_tally)
        assert len(json.loads(results.read_text())["images"]) >= 1
        assert set(explanations["hospitals"][f"node-{ids[name]}"]) == {"images"}
    assert "operating_point" in metrics["final"] and (run_dir / "report.html").is_file()
    assert metrics["config"]["model"] == config["model"]
    assert (run_dir / "model.mammofl").is_file()
    assert metrics["signing"]["generated"] is False and not (run_dir / "signing").exists()
    signed = verify_file(run_dir / "model.mammofl", TrustedKeys.read(keys.trusted), kind="bundle").provenance
    assert signed.epsilon == {h: entry["epsilon"] for h, entry in privacy.items()}
    epsilons = sorted((entry["epsilon"], entry["epsilon_own_noise"]) for entry in privacy.values())
    ledger_epsilons = []
    for name in names:  # each survivor recorded the round in the ledger on its own disk (node config state-dir)
        ledger_path = tmp_path / "state" / name / "privacy-ledger.json"
        if name == KILLED:  # killed as its training message came in: nothing trained, nothing recorded
            assert not ledger_path.exists()
            continue
        ledger = json.loads(ledger_path.read_text())
        training = [e for e in ledger["entries"] if e["kind"] == "training"]
        assert [(e["run_id"], e["run_key"], e["server_round"]) for e in training] == [
            (runs[0]["run-id"], metrics["run_key"], 1)]  # the run key came through SecAgg+'s fit instruction
        # the noised evaluation and the explanation counts were charged too (node policy evaluation = noised)
        assert sorted(e["kind"] for e in ledger["entries"] if e["kind"] != "training") == ["evaluation",
                                                                                           "explanation"]
        entry = training[0]
        assert (entry["noise_multiplier"], entry["aggregate_noise_multiplier"]) == pytest.approx(
            (share, config["noise-multiplier"]))
        ledger_epsilons.append((entry["epsilon_aggregate"], entry["epsilon"]))
    assert [e for pair in sorted(ledger_epsilons) for e in pair] == pytest.approx([e for pair in epsilons for e in pair])

    # Each survivor's launcher served every message its SuperNode received, in one warm process, each with
    # less than MAX_OVERHEAD seconds at the node besides the app's own work and the wait for the message itself
    # to arrive from the SuperLink (from the task's creation at the SuperNode to the reply handed back to it).
    overheads, arrivals = {}, []
    for name in names:
        if name == KILLED:
            continue
        served = [json.loads(line) for line in
                  (tmp_path / "state" / name / LAUNCHER_DIR / TIMINGS_FILE).read_text().splitlines()]
        assert len(served) == supernodes[name].output().count("Receiving:"), served
        assert all(entry["approved"] and entry["status"] == "completed" for entry in served), served
        assert not (tmp_path / "state" / name / LAUNCHER_DIR / REFUSALS_FILE).exists()
        overheads[name] = max(entry["overhead"] for entry in served)
        arrivals += [entry["arrival"] for entry in served]
        assert overheads[name] < MAX_OVERHEAD, json.dumps(served, indent=1)
    timings["max overhead per message"] = max(overheads.values())
    timings["max message arrival"] = max(arrivals)

    # Registering again (e.g. `docker compose up` after a restart) is harmless.
    rc, out = fed.register_all(tmp_path / "node-keys")
    assert rc == 0, out
    assert out.splitlines() == [f"already registered: {name}.pub" for name in names]
    assert set(fed.nodes()) == node_ids
    lap("checks")
    log.info("deployment test timings (s): %s", {k: round(v, 1) for k, v in timings.items()})
