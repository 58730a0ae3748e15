"""`mammofl-hospital ledger`: the releases a node recorded, with exact epsilons, against a ledger built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from opacus.accountants import RDPAccountant
from typer.testing import CliRunner

from client.cli import app
from client.privacy_ledger import LEDGER_FILE_NAME, PrivacyLedger
from conftest import REPO_ROOT

DELTA = 1e-5
LOCAL = dict(noise_multiplier=1.1, sample_rate=1 / 8, steps=8)  # DESIGN §5: 3.15 -> 3.91
SHARE, SUM = 1.1 / 2 ** 0.5, 1.1  # distributed noise with T = 2


def _rdp(history, delta=DELTA) -> float:
    accountant = RDPAccountant()
    accountant.history = list(history)
    return accountant.get_epsilon(delta=delta)


def _invoke(*args: str | Path):
    return CliRunner().invoke(app, ["ledger", *map(str, args)], env={"COLUMNS": "200"})


def _local_ledger(state: Path) -> PrivacyLedger:
    assert LEDGER_FILE_NAME == "privacy-ledger.json"  # NodeConfig.ledger_path: state-dir/privacy-ledger.json
    ledger = PrivacyLedger(state / LEDGER_FILE_NAME)
    ledger.record(delta=DELTA, run_id="run-a", server_round=1, **LOCAL)
    ledger.record(delta=DELTA, run_id="run-a", server_round=2, **LOCAL)
    return ledger


def test_json_lists_every_release_with_the_epsilon_after_it(tmp_path):
    state = tmp_path / "state"
    ledger = _local_ledger(state)
    ledger.record(noise_multiplier=SHARE, aggregate_noise_multiplier=SUM, sample_rate=1 / 8, steps=1, delta=DELTA,
                  run_id="run-b", server_round=1)
    result = _invoke("--state-dir", state, "--json", "--max-epsilon", "10")
    assert result.exit_code == 0, result.output
    statement = json.loads(result.stdout)
    times = [entry["time"] for entry in PrivacyLedger(state / LEDGER_FILE_NAME).entries]
    own_history = [(1.1, 1 / 8, 16), (SHARE, 1 / 8, 1)]
    sum_history = [(1.1, 1 / 8, 17)]  # the sum's noise equals the local rounds' noise: one merged entry
    assert statement["releases"] == [
        {"time": times[0], "run_id": "run-a", "server_round": 1, "steps": 8, "sample_rate": 0.125,
         "noise_multiplier": 1.1, "aggregate_noise_multiplier": 1.1,
         "epsilon": _rdp([(1.1, 1 / 8, 8)]), "epsilon_aggregate": _rdp([(1.1, 1 / 8, 8)])},
        {"time": times[1], "run_id": "run-a", "server_round": 2, "steps": 8, "sample_rate": 0.125,
         "noise_multiplier": 1.1, "aggregate_noise_multiplier": 1.1,
         "epsilon": _rdp([(1.1, 1 / 8, 16)]), "epsilon_aggregate": _rdp([(1.1, 1 / 8, 16)])},
        {"time": times[2], "run_id": "run-b", "server_round": 1, "steps": 1, "sample_rate": 0.125,
         "noise_multiplier": SHARE, "aggregate_noise_multiplier": SUM,
         "epsilon": _rdp(own_history), "epsilon_aggregate": _rdp(sum_history)},
    ]
    assert [round(r["epsilon"], 2) for r in statement["releases"][:2]] == [3.15, 3.91]
    epsilon, epsilon_sum = _rdp(own_history), _rdp(sum_history)
    assert epsilon > epsilon_sum
    assert statement["totals"] == {"releases": 3, "steps": 17, "unlisted_steps": 0, "epsilon": epsilon,
                                   "epsilon_aggregate": epsilon_sum}
    assert statement["budget"] == {"max_epsilon": 10.0, "remaining": 10.0 - epsilon,
                                   "remaining_aggregate": 10.0 - epsilon_sum}
    assert (statement["ledger"], statement["mechanism"], statement["delta"], statement["distributed"]) == \
        (str(state / "privacy-ledger.json"), "rdp", DELTA, True)


def test_table_shows_releases_totals_and_budget(tmp_path):
    state = tmp_path / "state"
    ledger = _local_ledger(state)
    result = _invoke("--state-dir", state, "--max-epsilon", "4")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    first, second = _rdp([(1.1, 1 / 8, 8)]), _rdp([(1.1, 1 / 8, 16)])
    assert any("releases (epsilon at delta 1e-05, accountant rdp)" in line for line in lines)
    header = next(line for line in lines if "sample rate" in line)
    assert "epsilon" in header and "(sum)" not in header and "noise of sum" not in header  # local noise only
    for entry, epsilon in zip(ledger.entries, (first, second)):
        row = next(line for line in lines if entry["time"] in line and f" {entry['server_round']} " in line)
        assert [cell.strip() for cell in row.split("│")[1:-1]] == \
            [entry["time"], "run-a", str(entry["server_round"]), "8", "0.125", "1.1", f"{epsilon:.3f}"]
    assert f"total: 2 releases, 16 steps, epsilon {second:.3f} at delta 1e-05" in lines
    assert f"budget: max-epsilon 4, left {4 - second:.3f}" in lines


def test_table_shows_both_epsilons_after_distributed_rounds(tmp_path):
    state = tmp_path / "state"
    PrivacyLedger(state / LEDGER_FILE_NAME).record(noise_multiplier=SHARE, aggregate_noise_multiplier=SUM,
                                                   sample_rate=1 / 8, steps=8, delta=DELTA, server_round=1)
    result = _invoke("--state-dir", state, "--max-epsilon", "5")
    assert result.exit_code == 0, result.output
    own, total = _rdp([(SHARE, 1 / 8, 8)]), _rdp([(SUM, 1 / 8, 8)])
    header = next(line for line in result.stdout.splitlines() if "sample rate" in line)
    assert "noise of sum" in header and "epsilon (own noise)" in header and "epsilon (sum)" in header
    assert f"total: 1 releases, 8 steps, epsilon {own:.3f} (own noise), {total:.3f} (sum) at delta 1e-05" \
        in result.stdout
    assert f"budget: max-epsilon 5, left {5 - own:.3f} (own noise), {5 - total:.3f} (sum)" in result.stdout


def test_delta_option_recomputes_every_epsilon(tmp_path):
    state = tmp_path / "state"
    _local_ledger(state)
    statement = json.loads(_invoke("--state-dir", state, "--json", "--delta", "1e-6").stdout)
    assert statement["delta"] == 1e-6
    assert [r["epsilon"] for r in statement["releases"]] == \
        [_rdp([(1.1, 1 / 8, 8)], 1e-6), _rdp([(1.1, 1 / 8, 16)], 1e-6)]
    assert statement["totals"]["epsilon"] == _rdp([(1.1, 1 / 8, 16)], 1e-6) > _rdp([(1.1, 1 / 8, 16)])


def test_empty_missing_and_unreadable_ledgers(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    empty = _invoke("--state-dir", state, "--json")
    assert empty.exit_code == 0
    assert json.loads(empty.stdout)["totals"] == {"releases": 0, "steps": 0, "unlisted_steps": 0, "epsilon": 0.0,
                                                  "epsilon_aggregate": 0.0}
    assert "no releases recorded" in _invoke("--state-dir", state).stdout
    assert not (state / LEDGER_FILE_NAME).exists()  # looking writes nothing

    missing = _invoke("--state-dir", tmp_path / "nowhere")
    assert missing.exit_code == 2 and "no such state-dir" in missing.stderr

    (state / LEDGER_FILE_NAME).write_text('{"version": 2, "hist')
    broken = _invoke("--state-dir", state)
    assert broken.exit_code == 2 and "privacy ledger unreadable" in broken.stderr

    bad_delta = _invoke("--state-dir", state, "--delta", "1")
    assert bad_delta.exit_code == 2 and "--delta must be in (0, 1)" in bad_delta.stderr


def test_real_command_prints_only_json(tmp_path):
    state = tmp_path / "state"
    _local_ledger(state)
    result = subprocess.run([sys.executable, "-c", "from client.cli import app; app()", "ledger", "--state-dir",
                             str(state), "--json"], capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["totals"]["epsilon"] == _rdp([(1.1, 1 / 8, 16)])
