"""The node's privacy ledger: cumulative over rounds and restarts, budget refusals, safe writes."""

from __future__ import annotations

import json

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
    assert [p.name for p in tmp_path.iterdir()] == ["ledger.json"]


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
