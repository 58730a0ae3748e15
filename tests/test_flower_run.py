"""`mammofl-coordinator run`: a failed run exits non-zero (Flower 1.42's `flwr run --stream` exits 0).

The status texts come from Flower's own code path: real ``flwr.supercore.run.Run`` records with Flower's
``Status``/``SubStatus`` constants, formatted by ``flwr.cli.run_utils.format_runs`` and printed as
``flwr ls --format json`` prints them (``flwr.cli.ls._to_json`` through rich's ``print_json``).
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flwr.cli.ls import _to_json
from flwr.cli.run_utils import format_runs
from flwr.common.constant import Status, SubStatus
from flwr.supercore.run import Run, RunStatus
from rich.console import Console
from typer.testing import CliRunner

from conftest import REPO_ROOT
from server.cli import app
from server.flower_run import (EXIT_STATUS, EXIT_UNFINISHED, FlowerCliError, RunOutcome, follow_run, run_status,
                               submitted_run_id)


def _printed(data) -> str:
    """What Flower's `print_json_to_stdout` writes for `data`, preceded by a line of other output."""
    out = io.StringIO()
    out.write("Loading project configuration...\n")
    Console(file=out).print_json(data) if isinstance(data, str) else Console(file=out).print_json(data=data)
    return out.getvalue()


def _ls_output(run_id: int, status: str, sub_status: str, details: str = "") -> str:
    run = Run(run_id=run_id, fab_id="mammofl/mammo-fl", fab_version="1.0.0", fab_hash="ab" * 32,
              override_config={}, pending_at="2026-01-01T00:00:00+00:00", starting_at="", running_at="",
              finished_at="", status=RunStatus(status=status, sub_status=sub_status, details=details),
              flwr_aid="", federation_id="", primary_task_id=None, bytes_sent=0, bytes_recv=0,
              clientapp_runtime=0.0)
    return _printed(_to_json(format_runs([run], "2026-01-01T00:01:00+00:00")))


@pytest.mark.parametrize("status, sub_status, expected", [
    (Status.FINISHED, SubStatus.COMPLETED, 0),
    (Status.FINISHED, SubStatus.FAILED, 1),
    (Status.FINISHED, SubStatus.STOPPED, 2),
    (Status.RUNNING, "", EXIT_UNFINISHED),
    (Status.PENDING, "", EXIT_UNFINISHED),
])
def test_flower_run_statuses_map_to_exit_statuses(status, sub_status, expected):
    text, details = run_status(_ls_output(7, status, sub_status, "ServerApp failed with exception: x"), 7)
    assert RunOutcome(run_id=7, status=text, details=details).exit_status == expected
    if sub_status:
        assert text == f"{status}:{sub_status}" and text in EXIT_STATUS
    assert details == "ServerApp failed with exception: x"


def test_every_finished_sub_status_of_flower_has_an_exit_status():
    subs = {v for k, v in vars(SubStatus).items() if k.isupper()}
    assert {f"{Status.FINISHED}:{s}" for s in subs} == set(EXIT_STATUS)
    assert EXIT_STATUS["finished:completed"] == 0 and all(v > 0 for k, v in EXIT_STATUS.items()
                                                           if k != "finished:completed")


def test_the_run_id_and_failures_are_read_from_flowers_json():
    assert submitted_run_id(_printed({"success": True, "run-id": "4217", "federation-id": ""})) == 4217
    with pytest.raises(FlowerCliError, match="failed"):
        submitted_run_id(_printed({"success": False, "error-message": "no SuperLink"}))
    with pytest.raises(FlowerCliError, match="printed no JSON"):
        submitted_run_id("Successfully started run 3\n")
    with pytest.raises(FlowerCliError, match="does not list run 8"):
        run_status(_ls_output(7, Status.FINISHED, SubStatus.COMPLETED), 8)


def test_a_run_that_cannot_be_submitted_fails_with_flowers_reason(tmp_path):
    env = {"FLWR_HOME": str(tmp_path / "flwr-home"), "FLWR_DISABLE_UPDATE_CHECK": "1"}
    with pytest.raises(FlowerCliError, match="SuperLink connection 'no-such-connection' not found"):
        follow_run(REPO_ROOT, "no-such-connection", env=env, wait_s=1.0)


def test_the_command_is_part_of_the_coordinator_cli():
    result = CliRunner().invoke(app, ["run", "--help"])
    assert result.exit_code == 0
    assert "0 completed, 1 failed, 2 stopped" in " ".join(result.output.split())


def _free_ports(count: int) -> list[int]:
    """Distinct free loopback ports (all held open while choosing, so none is handed out twice)."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _processes_of(home: Path) -> list[int]:
    """PIDs of live processes whose command line names `home` (the local SuperLink this test started)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(home).encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


@pytest.mark.slow
def test_a_failed_loopback_run_exits_1_with_the_serverapps_error(tmp_path):
    """A real local SuperLink (Flower's `local` connection, simulation) runs the app with a run config the
    ServerApp refuses: Flower records `finished:failed`, and the command exits 1 naming the key. (Measured here:
    `flwr run . local --stream` on the same run exits 0.)"""
    home = tmp_path / "flwr-home"
    home.mkdir()
    http_port, control_port = _free_ports(2)
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
           "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port), "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-c", "from server.cli import app; app()", "run", str(REPO_ROOT), "local",
               "--federation-config", "num-supernodes=2", "--run-config", "min-train-replies=5", "--wait", "60"]
    try:
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=400)
    finally:
        for pid in _processes_of(home):  # the detached local SuperLink outlives the command
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(1)
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "finished:failed" in result.stderr
    assert "run config 'min-train-replies' (5) exceeds 'min-nodes' (2)" in result.stderr
