"""The node's privacy ledger: cumulative over rounds and restarts, budget refusals, safe writes, concurrent writers
(real processes, started with spawn) and writers killed with SIGKILL."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
from opacus.accountants import RDPAccountant

from client.privacy_ledger import LedgerError, PrivacyLedger

DELTA = 1e-5
ROUND = dict(noise_multiplier=1.1, sample_rate=1 / 8, steps=8)  # DESIGN §5: 3.15 -> 3.91 -> 4.52


def test_epsilon_grows_across_rounds_and_restarts(tmp_path):
    path = tmp_path / "node" / "privacy-ledger.json"
    ledger = PrivacyLedger(path)
    assert ledger.epsilon(DELTA) == 0.0 and not path.exists()
    first = ledger.record(delta=DELTA, run_id="run-a", server_round=1, **ROUND)
    second = ledger.record(delta=DELTA, run_id="run-a", server_round=2, **ROUND)

    restarted = PrivacyLedger(path)  # the node process restarted; a new run begins
    assert restarted.epsilon(DELTA) == second
    assert restarted.history == [(1.1, 1 / 8, 16)]
    third = restarted.record(delta=DELTA, run_id="run-b", server_round=1, **ROUND)

    assert [round(e, 2) for e in (first, second, third)] == [3.15, 3.91, 4.52]
    fresh = RDPAccountant()
    fresh.history = [(1.1, 1 / 8, 24)]
    assert PrivacyLedger(path).epsilon(DELTA) == fresh.get_epsilon(delta=DELTA) == third
    assert [e["run_id"] for e in PrivacyLedger(path).entries] == ["run-a", "run-a", "run-b"]
    assert PrivacyLedger(path).accountant_state() == {"history": [(1.1, 0.125, 24)], "mechanism": "rdp"}


def test_budget_exhausted_node_refuses(tmp_path):
    ledger = PrivacyLedger(tmp_path / "ledger.json")
    ledger.record(delta=DELTA, **ROUND)
    ok = ledger.check_budget(delta=DELTA, max_epsilon=4.0, **ROUND)
    assert ok.allowed and round(ok.epsilon_after, 2) == 3.91
    ledger.record(delta=DELTA, **ROUND)
    decision = PrivacyLedger(tmp_path / "ledger.json").check_budget(delta=DELTA, max_epsilon=4.0, **ROUND)
    assert not decision.allowed
    assert round(decision.epsilon_now, 2) == 3.91 and round(decision.epsilon_after, 2) == 4.52
    assert decision.max_epsilon == 4.0
    assert decision.reason.startswith("refused: privacy budget would exceed max-epsilon 4")
    assert "3.914 now" in decision.reason and "4.520 after" in decision.reason
    # checking never spends anything
    assert PrivacyLedger(tmp_path / "ledger.json").total_steps == 16


def test_file_is_plain_json_and_no_temporary_left(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).record(delta=DELTA, server_round=3, **ROUND)
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["mechanism"] == "rdp"
    assert data["history"] == data["aggregate-history"] == [[1.1, 0.125, 8]]
    assert data["entries"][0]["server_round"] == 3 and data["entries"][0]["steps"] == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json", "ledger.json.lock"]
    assert (tmp_path / "ledger.json.lock").read_bytes() == b""


def test_unreadable_ledger_refuses_to_guess(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text('{"version": 1, "mechanism": "rdp", "hist')
    with pytest.raises(LedgerError, match="unreadable"):
        PrivacyLedger(path)


def test_other_mechanism_reads_same_history(tmp_path):
    path = tmp_path / "ledger.json"
    PrivacyLedger(path).record(delta=DELTA, **ROUND)
    prv = PrivacyLedger(path, mechanism="prv")
    assert prv.mechanism == "prv" and prv.history == [(1.1, 0.125, 8)]
    assert 0 < prv.epsilon(DELTA) < PrivacyLedger(path).epsilon(DELTA)


def test_distributed_noise_records_both_epsilons_and_budget_uses_the_policy_basis(tmp_path):
    """Distributed noise: the node's own share (sigma / sqrt(2)) and the noise in the secure sum (sigma) are
    kept apart; each epsilon equals a fresh Opacus RDP accountant fed that history; the budget basis decides."""
    path = tmp_path / "ledger.json"
    share, total = 1.1 / 2 ** 0.5, 1.1
    ledger = PrivacyLedger(path)
    own = ledger.record(noise_multiplier=share, aggregate_noise_multiplier=total, sample_rate=1 / 8, steps=8,
                        delta=DELTA, server_round=1)
    reread = PrivacyLedger(path)
    assert reread.history == [(share, 1 / 8, 8)] and reread.aggregate_history == [(total, 1 / 8, 8)]
    for history, value in (([(share, 1 / 8, 8)], own), ([(total, 1 / 8, 8)], reread.epsilon(DELTA, aggregate=True))):
        fresh = RDPAccountant()
        fresh.history = history
        assert value == fresh.get_epsilon(delta=DELTA)
    assert round(reread.epsilon(DELTA, aggregate=True), 2) == 3.15 < own == reread.epsilon(DELTA)
    entry = json.loads(path.read_text())["entries"][0]
    assert (entry["noise_multiplier"], entry["aggregate_noise_multiplier"]) == (share, total)
    assert entry["epsilon_aggregate"] == reread.epsilon(DELTA, aggregate=True) and entry["epsilon"] == own
    spend = dict(noise_multiplier=share, aggregate_noise_multiplier=total, sample_rate=1 / 8, steps=8, delta=DELTA,
                 max_epsilon=4.0)
    conservative = reread.check_budget(**spend)
    trusting = reread.check_budget(**spend, on_aggregate=True)
    assert not conservative.allowed and "of this node's own noise" in conservative.reason
    assert trusting.allowed and round(trusting.epsilon_after, 2) == 3.91
    with pytest.raises(ValueError, match="below the node's own"):
        reread.record(noise_multiplier=2.0, aggregate_noise_multiplier=1.0, sample_rate=1 / 8, steps=1, delta=DELTA)


def test_version_1_ledger_reads_its_history_as_both(tmp_path):
    path = tmp_path / "ledger.json"
    path.write_text(json.dumps({"version": 1, "mechanism": "rdp", "history": [[1.1, 0.125, 16]], "entries": []}))
    ledger = PrivacyLedger(path)
    assert ledger.history == ledger.aggregate_history == [(1.1, 0.125, 16)]
    assert ledger.epsilon(DELTA) == ledger.epsilon(DELTA, aggregate=True)


# ---------------------------------------------------------------------------------------------- several processes
STEP = dict(noise_multiplier=1.1, sample_rate=1 / 8, steps=1)
WRITERS = 4
START_TIMEOUT_S = 180  # spawned processes import torch (through Opacus) first; slow on a busy 2-core machine


def _fresh_rdp(history, delta=DELTA):
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def _wait_for_go(sync: Path) -> None:
    """Say ready, then start together with the other writers (so their writes really interleave)."""
    (sync / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not (sync / "go").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("no go")
        time.sleep(0.001)


def _record_many(path: str, sync: str, writer: int, count: int) -> int:
    ledger = PrivacyLedger(path)
    _wait_for_go(Path(sync))
    for server_round in range(1, count + 1):
        ledger.record(delta=DELTA, run_id=f"writer-{writer}", server_round=server_round, **STEP)
    return os.getpid()


def _spend_until_refused(path: str, sync: str, writer: int, max_epsilon: float) -> int:
    ledger = PrivacyLedger(path)
    _wait_for_go(Path(sync))
    allowed = 0
    while ledger.spend(delta=DELTA, max_epsilon=max_epsilon, run_id=f"writer-{writer}", server_round=allowed + 1,
                       **STEP).allowed:
        allowed += 1
    return allowed


def _record_forever(path: str) -> None:
    ledger = PrivacyLedger(path)
    while True:
        ledger.record(delta=DELTA, run_id="killed", **STEP)


@pytest.fixture(scope="module")
def pool():
    """Writer processes, started with spawn (nothing inherited from this process), kept for the module."""
    with ProcessPoolExecutor(max_workers=WRITERS, mp_context=multiprocessing.get_context("spawn")) as executor:
        yield executor


def _run_together(pool, tmp_path: Path, function, *args_per_writer) -> list:
    sync = tmp_path / "sync"
    sync.mkdir()
    futures = [pool.submit(function, *args) for args in args_per_writer]
    deadline = time.monotonic() + START_TIMEOUT_S
    while len(list(sync.glob("ready-*"))) < len(futures):
        assert time.monotonic() < deadline, "writer processes did not start"
        for future in futures:
            if future.done():
                future.result()  # raises what the writer raised
        time.sleep(0.01)
    assert len({p.name for p in sync.glob("ready-*")}) == len(futures)  # one process per writer
    (sync / "go").touch()
    return [future.result(timeout=START_TIMEOUT_S) for future in futures]


@pytest.mark.parametrize("writers", [2, WRITERS])
def test_concurrent_writers_lose_no_record(pool, tmp_path, writers):
    path = tmp_path / "node" / "privacy-ledger.json"
    count = 8
    pids = _run_together(pool, tmp_path, _record_many,
                         *[(str(path), str(tmp_path / "sync"), w, count) for w in range(writers)])
    assert len(set(pids)) == writers and os.getpid() not in pids
    ledger = PrivacyLedger(path)
    recorded = sorted((e["run_id"], e["server_round"]) for e in ledger.entries)
    assert recorded == sorted((f"writer-{w}", r) for w in range(writers) for r in range(1, count + 1))
    assert ledger.total_steps == writers * count
    assert ledger.history == ledger.aggregate_history == [(1.1, 1 / 8, writers * count)]
    assert ledger.epsilon(DELTA) == _fresh_rdp([(1.1, 1 / 8, writers * count)])
    epsilons = [e["epsilon"] for e in ledger.entries]  # each entry: epsilon of everything before it, in file order
    assert epsilons == [_fresh_rdp([(1.1, 1 / 8, n)]) for n in range(1, writers * count + 1)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["privacy-ledger.json", "privacy-ledger.json.lock"]


def test_concurrent_spends_never_overspend_the_budget(pool, tmp_path):
    """Every writer spends one step at a time until refused: together they spend exactly the largest number of
    steps whose epsilon (Opacus' RDP accountant on the recorded history) is within the budget, and no more."""
    path = tmp_path / "node" / "privacy-ledger.json"
    budget = 4.0
    fits = max(n for n in range(1, 40) if _fresh_rdp([(1.1, 1 / 8, n)]) <= budget)
    assert fits == 17 and _fresh_rdp([(1.1, 1 / 8, fits + 1)]) > budget
    allowed = _run_together(pool, tmp_path, _spend_until_refused,
                            *[(str(path), str(tmp_path / "sync"), w, budget) for w in range(WRITERS)])
    ledger = PrivacyLedger(path)
    assert sum(allowed) == len(ledger.entries) == ledger.total_steps == fits
    assert _fresh_rdp(ledger.history) == ledger.epsilon(DELTA) <= budget
    for writer, n in enumerate(allowed):
        assert sorted(e["server_round"] for e in ledger.entries if e["run_id"] == f"writer-{writer}") == \
            list(range(1, n + 1))


_HOLD_LOCK_AND_DIE_MID_WRITE = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
with open(sys.argv[2], "w") as torn:
    torn.write('{"version": 2, "mechanism": "rdp", "hist')
print("locked", flush=True)
time.sleep(600)
"""


def test_writer_killed_holding_the_lock_does_not_block_the_others(tmp_path):
    """A writer holds the lock and has half-written its temporary file when it gets SIGKILL: until then others
    wait (and reading works); after it, the OS has released the lock, the next writer proceeds and removes the
    temporary file, and the ledger is whole."""
    path = tmp_path / "privacy-ledger.json"
    PrivacyLedger(path).record(delta=DELTA, run_id="before", **ROUND)
    torn = tmp_path / ".privacy-ledger.json.crashed.tmp"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD_LOCK_AND_DIE_MID_WRITE, str(PrivacyLedger(path).lock_path),
                               str(torn)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        waiting = PrivacyLedger(path, lock_timeout=0.3)  # opening reads; the temporary file is not stale yet
        assert waiting.total_steps == 8 and torn.exists()
        started = time.monotonic()
        with pytest.raises(LedgerError, match="held the privacy ledger's lock for over 0.3 s"):
            waiting.record(delta=DELTA, run_id="during", **ROUND)
        assert time.monotonic() - started >= 0.3
        with pytest.raises(LedgerError, match="lock"):
            waiting.spend(delta=DELTA, max_epsilon=100.0, **ROUND)
        assert PrivacyLedger(path).total_steps == 8  # nothing was written meanwhile
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    assert holder.returncode == -signal.SIGKILL
    after = PrivacyLedger(path, lock_timeout=5.0)  # the OS released the dead writer's lock
    assert not torn.exists()  # opening removed what the dead writer left
    torn.write_text("{")  # and a leftover found by the next writer is removed too
    epsilon = after.record(delta=DELTA, run_id="after", **ROUND)
    assert [e["run_id"] for e in PrivacyLedger(path).entries] == ["before", "after"]
    assert epsilon == _fresh_rdp([(1.1, 1 / 8, 16)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy-ledger.json", "privacy-ledger.json.lock"]


@pytest.mark.slow
def test_writers_killed_mid_record_leave_a_whole_ledger_that_never_shrinks(tmp_path):
    """SIGKILL at random moments of a writer recording as fast as it can (mostly inside the lock): every time, the
    file parses, epsilon has not decreased, and the next writer records at once and leaves no temporary file."""
    path = tmp_path / "privacy-ledger.json"
    rng = random.Random(13)
    spawn = multiprocessing.get_context("spawn")
    steps_seen = 0
    for kill in range(3):
        writer = spawn.Process(target=_record_forever, args=(str(path),))
        writer.start()
        try:
            deadline = time.monotonic() + START_TIMEOUT_S
            while PrivacyLedger(path).total_steps < steps_seen + 3:
                assert time.monotonic() < deadline and writer.is_alive()
                time.sleep(0.01)
            time.sleep(rng.uniform(0.0, 0.3))
        finally:
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(timeout=30)
        assert writer.exitcode == -signal.SIGKILL
        json.loads(path.read_text())  # whole
        survivor = PrivacyLedger(path, lock_timeout=5.0)
        assert survivor.total_steps >= steps_seen + 3
        survivor.record(delta=DELTA, run_id=f"after-kill-{kill}", **STEP)
        reread = PrivacyLedger(path)
        assert reread.total_steps == survivor.total_steps == len(reread.entries)
        assert reread.epsilon(DELTA) == _fresh_rdp([(1.1, 1 / 8, reread.total_steps)])
        assert sorted(p.name for p in tmp_path.iterdir()) == ["privacy-ledger.json", "privacy-ledger.json.lock"]
        steps_seen = reread.total_steps
