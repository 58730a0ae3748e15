"""A coordinator killed with SIGKILL and restarted resumes its run: no round lost, no budget spent twice.

The rule (``server.app``, ``server.checkpoints``): a run is named across restarts by its run directory's
``run_key``, sent with every training instruction and recorded by each hospital in its privacy ledger with the
round; a hospital never trains a (run key, round) its ledger holds. A round is marked started before its training
instructions go out; on resume, a round started after the last checkpoint is lost (hospitals may have trained it
and spent budget on it), recorded so in ``metrics.json``, and the run continues at the next round number.

Fast tests check each piece (markers, run key, ledger lookup, the node's refusal). A slow in-process simulation
checks the rule for a round interrupted after a hospital trained it. The slow loopback test runs the real deployment on loopback (``deployment_helpers``:
TLS, node auth, SQLite ``--database``, subprocess isolation, two SuperNodes, local DP): the SuperLink and its
ServerApp are SIGKILLed after round 1's checkpoint and before round 2 starts, the SuperLink is restarted on the
same database, the SuperNodes reconnect, and ``flwr run`` with run config ``resume`` finishes rounds 2 and 3.

Cost of the loopback test: 8 minutes measured on 2 shared cores at load average ~24 (nodes online 46 s, round 1
99 s, restart and reconnection 24 s, the resumed run's two rounds 269 s), each message paying a fresh
``flwr-clientapp`` process. Federated evaluation stays on: it is what keeps round 2 from starting for seconds
after round 1's checkpoint, the window in which the kill lands. The in-process test takes about 5 minutes there.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.node import train_round
from client.privacy_ledger import PrivacyLedger
from common.node_policy import NodePolicy
from common.run_config import NodeConfig, RunConfig
from server.checkpoints import Checkpoint, CheckpointStore
from server.run_directory import RunDirectory

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- pieces
def test_a_round_started_after_the_last_checkpoint_is_lost(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints")
    assert store.lost_rounds() == [] and store.started_rounds() == []
    store.mark_started(1)
    assert store.lost_rounds() == [1]  # started, never checkpointed
    store.save(Checkpoint(round=1, arrays={"w": np.zeros(2, np.float32)}))
    assert store.lost_rounds() == []
    store.mark_started(2)
    assert (store.started_rounds(), store.lost_rounds(), store.rounds()) == ([1, 2], [2], [1])
    assert sorted(p.name for p in store.directory.iterdir()) == ["round-0001.npz"]  # markers live beside it
    assert sorted(p.name for p in store.started_dir.iterdir()) == ["started-0001", "started-0002"]


def test_the_run_key_survives_a_resume(tmp_path):
    run = RunDirectory.create(tmp_path / "run", config={"model": "cnn"})
    assert re.fullmatch(r"[0-9a-f]{32}", run.run_key)
    run.checkpoints.save(Checkpoint(round=1, arrays={"w": np.zeros(2, np.float32)}))
    resumed = RunDirectory.resume(tmp_path / "run", config={"model": "cnn"})
    assert resumed.run_key == run.run_key
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["run_key"] == run.run_key
    other = RunDirectory.create(tmp_path / "other", config={"model": "cnn"})
    assert other.run_key != run.run_key


def _record(ledger: PrivacyLedger, *, run_key: str | None, server_round: int, run_id: str) -> None:
    ledger.record(noise_multiplier=1.0, sample_rate=0.1, steps=3, delta=1e-5, run_id=run_id,
                  server_round=server_round, run_key=run_key)


def test_the_ledger_knows_which_rounds_of_a_run_key_were_spent(tmp_path):
    path = tmp_path / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    _record(ledger, run_key="a" * 32, server_round=1, run_id="101")
    _record(ledger, run_key=None, server_round=2, run_id="102")  # an instruction without a run key
    reread = PrivacyLedger(path)  # what a restarted node sees
    assert reread.has_trained("a" * 32, 1)
    assert not reread.has_trained("a" * 32, 2)  # another round of the same run
    assert not reread.has_trained("b" * 32, 1)  # the same round of another run
    assert [(e["run_id"], e["run_key"], e["server_round"]) for e in reread.entries] == [
        ("101", "a" * 32, 1), ("102", None, 2)]


def test_a_node_refuses_a_round_its_ledger_holds_under_the_run_key(tmp_path):
    """Before the resumed run's first instruction the node's Flower state is empty (a new Flower run): the ledger
    alone remembers round 2 of this run key. The refusal comes before any data is read or budget spent."""
    node = NodeConfig(data_dir=tmp_path / "no-data-here", state_dir=tmp_path / "state",
                      policy=NodePolicy(max_epsilon=50.0))
    run = RunConfig(dp_mode="local", min_nodes=2)
    ledger = PrivacyLedger(node.ledger_path, mechanism=node.policy.accountant)
    _record(ledger, run_key="k" * 32, server_round=2, run_id="7")
    before = node.ledger_path.read_bytes()
    result = train_round(run=run, node=node, global_weights={}, server_round=2, run_id="8", run_key="k" * 32)
    assert result.refused and result.weights is None
    assert result.refusal == "refused: round 2 was already trained by this node in this run"
    assert result.steps == 3 and math.isfinite(result.epsilon)
    assert node.ledger_path.read_bytes() == before  # nothing spent, nothing recorded


# ---------------------------------------------------------------- a round interrupted mid-way (in-process)
@pytest.mark.slow
def test_a_round_interrupted_after_hospitals_trained_it_is_lost_not_trained_twice(mias_dir, tmp_path):
    """The coordinator died during round 2: the round was marked started and hospital 0 had trained it (its ledger
    holds round 2 under the run key), no checkpoint 2 exists. The resumed run records round 2 as lost and
    trains round 3: nobody trains round 2 again, nobody refuses, hospital 0's real spend on round 2 stays."""
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app

    run_dir, state = tmp_path / "run", tmp_path / "hospitals"
    config = {"model": "cnn", "image-size": 64, "num-server-rounds": 1, "batch-size": 4, "min-nodes": 2,
              "min-train-replies": 2, "min-evaluate-replies": 2, "round-timeout": 300.0, "dp-mode": "local",
              "sim-data-dir": str(mias_dir), "sim-state-dir": str(state), "sim-max-patients": 12,
              "sim-test-fraction": 0.25, "val-fraction": 0.25, "run-dir": str(run_dir), "explain-methods": ""}

    def simulate(overrides: dict) -> None:  # evaluations in clear: the ledgers hold the training rounds only
        clear = {k: {"evaluation": "clear"} for k in range(2)}
        run_simulation(server_app=make_server_app(overrides=overrides), num_supernodes=2,
                       client_app=make_client_app(overrides=overrides, node_overrides=clear),
                       backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                       "init_args": {"num_cpus": 2}})

    simulate(config)
    run_key = json.loads((run_dir / "metrics.json").read_text())["run_key"]
    ledgers = [state / f"hospital-{k}" / "privacy-ledger.json" for k in range(2)]
    assert [[e["run_key"] for e in json.loads(p.read_text())["entries"]] for p in ledgers] == [[run_key]] * 2
    # The interruption: round 2 started, hospital 0 trained it and recorded the spend, then the coordinator died.
    CheckpointStore(run_dir / "checkpoints").mark_started(2)
    _record(PrivacyLedger(ledgers[0]), run_key=run_key, server_round=2, run_id="killed-run")

    simulate({**config, "num-server-rounds": 3, "run-dir": "", "resume": str(run_dir)})
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["run_key"] == run_key
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]
    assert [bool(r.get("lost")) for r in metrics["rounds"]] == [False, True, False]
    assert metrics["resumed"][0]["from_round"] == 1 and metrics["resumed"][0]["lost_rounds"] == [2]
    train = metrics["rounds"][2]["replies"]["train"]
    assert (train["valid"], train["refused"], train["failed"]) == (2, 0, 0), train
    rounds = [[e["server_round"] for e in json.loads(p.read_text())["entries"]] for p in ledgers]
    assert rounds == [[1, 2, 3], [1, 3]]  # round 2 spent once (hospital 0, before the kill), never again
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.npz")) == ["round-0001.npz", "round-0003.npz"]
    assert metrics["final"]["round"] == 3


# ---------------------------------------------------------------- the deployment on loopback
HOSPITALS = {"hospital-a": 50.0, "hospital-b": 60.0}  # node config max-epsilon (not reached)
NUM_ROUNDS = 3
KILL_AFTER_ROUND = 1
ROUND_TIMEOUT = 180.0
RUN_TIMEOUT = 420.0
RECONNECT_TIMEOUT = 90.0


def restart_run_config(run_dir: Path) -> dict[str, Any]:
    """The `smoke` preset's run config (small CNN, 64-px images, DP on) without its simulation keys, local noise,
    two hospitals, three rounds, no federated explanations (one message less per node)."""
    from simulations.presets import PRESETS

    smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
    return {**smoke, "num-server-rounds": NUM_ROUNDS, "dp-mode": "local", "min-nodes": len(HOSPITALS),
            "min-train-replies": len(HOSPITALS), "min-evaluate-replies": len(HOSPITALS),
            "round-timeout": ROUND_TIMEOUT, "run-dir": str(run_dir), "explain-methods": ""}


@pytest.mark.slow
def test_a_superlink_killed_mid_run_resumes_without_losing_a_round_or_spending_twice(mias_dir, tmp_path):
    from deployment_helpers import (
        BIN,
        CONNECTION,
        REPO,
        START_TIMEOUT,
        make_hospital_folders,
        node_config_text,
        run_config_text,
        running_federation,
        wait_until,
    )
    from server import certs

    timings: dict[str, float] = {}
    clock = time.monotonic()

    def lap(name: str) -> None:
        nonlocal clock
        timings[name] = round(time.monotonic() - clock, 1)
        clock = time.monotonic()

    with running_federation(tmp_path) as fed:
        names = list(HOSPITALS)
        folders = make_hospital_folders(mias_dir, tmp_path / "hospitals", names, patients_per_class=2)
        keys = certs.write_node_key_pairs(tmp_path / "node-keys", names)
        rc, out = fed.register_all(tmp_path / "node-keys")
        assert rc == 0, out
        supernodes = {
            # evaluations released in clear: the ledgers then hold exactly the training rounds this test counts
            name: fed.start_supernode(name, pair.private, node_config_text(
                folders[name], tmp_path / "state" / name, HOSPITALS[name], evaluation="clear"), max_retries=None)
            for name, pair in zip(names, keys, strict=True)
        }
        assert wait_until(lambda: list(fed.nodes().values()) == ["online"] * len(names), START_TIMEOUT,
                          interval=1.0), f"SuperNodes not online: {fed.nodes()}"
        node_ids = set(fed.nodes())
        lap("nodes online")

        run_dir = tmp_path / "run"
        config = restart_run_config(run_dir)
        first = fed.procs.start("flwr-run", [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream",
                                             "--run-config", run_config_text(config)],
                                home=fed.cli_home, cwd=tmp_path)
        checkpoint = run_dir / "checkpoints" / f"round-{KILL_AFTER_ROUND:04d}.npz"
        started_next = run_dir / "started-rounds" / f"started-{KILL_AFTER_ROUND + 1:04d}"
        assert wait_until(lambda: checkpoint.exists() or first.popen.poll() is not None, RUN_TIMEOUT,
                          interval=0.1), f"no checkpoint of round {KILL_AFTER_ROUND}:\n{first.tail()}"
        assert first.popen.poll() is None, first.tail()
        # Between rounds: round 1 aggregated and checkpointed (its evaluation under way), round 2 not started.
        fed.kill_superlink()
        assert checkpoint.exists() and not started_next.exists()
        lap("round 1 checkpointed, SuperLink killed")
        first_rc = first.popen.wait(timeout=START_TIMEOUT)  # the CLI loses its stream
        first_run_id = _ledger(tmp_path, names[0])["entries"][0]["run_id"]

        fed.start_superlink()  # same port, certificates and database
        assert wait_until(lambda: fed.nodes() == {n: "online" for n in node_ids}, RECONNECT_TIMEOUT,
                          interval=1.0), f"SuperNodes did not reconnect: {fed.nodes()}"
        rc, listing = fed.flwr("flwr-ls", "ls", CONNECTION, "--format", "json")
        assert rc == 0, listing
        (old,) = json.loads(listing)["runs"]
        # The killed run still reads "running" until its ServerApp's heartbeats are missed (about a minute);
        # the resumed run need not wait for that.
        log.info("after the restart the killed run (flwr run exit %s) reads %s", first_rc, old["status"])
        assert str(old["run-id"]) == first_run_id and old["status"] in ("running", "finished:failed"), old
        lap("SuperLink restarted, nodes reconnected")

        resumed = {**config, "run-dir": "", "resume": str(run_dir)}
        rc, out = fed.procs.run("flwr-run-resumed", [str(BIN / "flwr"), "run", str(REPO), CONNECTION, "--stream",
                                                     "--run-config", run_config_text(resumed)],
                                home=fed.cli_home, cwd=tmp_path, timeout=RUN_TIMEOUT)
        assert rc == 0, out[-6000:]
        lap("resumed run")
        rc, listing = fed.flwr("flwr-ls", "ls", CONNECTION, "--format", "json")
        runs = {str(r["run-id"]): r["status"] for r in json.loads(listing)["runs"]}
        (second_run_id,) = set(runs) - {first_run_id}
        assert (runs[first_run_id], runs[second_run_id]) == ("finished:failed", "finished:completed"), runs
        for name in names:
            assert "Receiving: train message" in supernodes[name].output()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert [r["round"] for r in metrics["rounds"]] == [1, 2, 3]  # every round once, none lost
    assert not any(r.get("lost") for r in metrics["rounds"])
    assert [(r["from_round"], r.get("lost_rounds")) for r in metrics["resumed"]] == [(KILL_AFTER_ROUND, None)]
    assert metrics["rounds"][0]["note"] == "the run stopped before this round was evaluated"
    for entry in metrics["rounds"][1:]:
        train = entry["replies"]["train"]
        assert (train["valid"], train["refused"], train["failed"]) == (len(names), 0, 0), train
        assert entry["federated_eval"]["num_examples"] > 0
    run_key = metrics["run_key"]
    assert (run_dir / "model.mammofl").is_file() and metrics["final"] is not None
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("*.npz")) == [
        f"round-{r:04d}.npz" for r in range(1, NUM_ROUNDS + 1)]

    spent: dict[str, tuple[int, float]] = {}
    for name in names:  # each round trained (and spent) exactly once, under one run key and two Flower runs
        ledger = _ledger(tmp_path, name)
        entries = ledger["entries"]
        assert [(e["run_key"], e["server_round"]) for e in entries] == [(run_key, r) for r in (1, 2, 3)]
        assert [e["run_id"] for e in entries] == [first_run_id, second_run_id, second_run_id]
        steps = [e["steps"] for e in entries]
        assert sum(s for _, _, s in ledger["history"]) == sum(steps) and min(steps) > 0  # history: merged runs
        epsilons = [e["epsilon"] for e in entries]
        assert epsilons == sorted(epsilons) and len(set(epsilons)) == 3
        reread = PrivacyLedger(tmp_path / "state" / name / "privacy-ledger.json")
        assert reread.epsilon(entries[-1]["delta"]) == pytest.approx(epsilons[-1])
        spent[name] = (sum(steps), epsilons[-1])
    # What the coordinator last heard from each hospital is what its ledger holds after round 3.
    reported = sorted((p["steps"], p["epsilon"]) for p in metrics["privacy"].values())
    assert len(reported) == len(names) and all(p["last_round"] == NUM_ROUNDS for p in metrics["privacy"].values())
    expected = sorted(spent.values())
    assert [s for s, _ in reported] == [s for s, _ in expected]
    assert [e for _, e in reported] == pytest.approx([e for _, e in expected])
    log.info("SuperLink restart test timings (s): %s", timings)


def _ledger(root: Path, name: str) -> dict:
    return json.loads((root / "state" / name / "privacy-ledger.json").read_text())
