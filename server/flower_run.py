"""Submit a run with Flower's CLI, follow its logs, and exit with the run's outcome.

Flower 1.42's ``flwr run APP CONNECTION --stream`` exits 0 once the log stream ends, whatever became of the run:
the command never reads the run's status (``flwr/cli/run/run.py`` returns after ``start_stream``). The failure is
not lost before that: a ServerApp that raises (too few replies, a bad config) is recorded by the SuperLink as
``finished:failed`` with the exception in its details (``flwr/superlink/runtime/run_serverapp.py``), and
``flwr ls --run-id`` shows it. :func:`follow_run` does the three steps with Flower's own commands:

1. ``flwr run APP CONNECTION --format json [--run-config ...]``: submit, read the run id;
2. ``flwr log RUN_ID CONNECTION --stream``: print the logs until the run ends;
3. ``flwr ls CONNECTION --run-id RUN_ID --format json``: read the status (waiting until it is ``finished:*``);

and returns the run's outcome, whose :attr:`RunOutcome.exit_status` is 0 completed, 1 failed, 2 stopped, 3 not
finished in time (``mammofl-coordinator run`` exits with it).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

#: Exit status of a finished run, by Flower's status text (``Status.FINISHED`` + ":" + ``SubStatus.*``).
EXIT_STATUS = {"finished:completed": 0, "finished:failed": 1, "finished:stopped": 2}
#: Exit status when the run has not finished (or its status cannot be read) within the wait.
EXIT_UNFINISHED = 3


class FlowerCliError(RuntimeError):
    """A `flwr` command failed or printed something that is not the JSON it promises."""


@dataclass(frozen=True)
class RunOutcome:
    """What became of a submitted run: Flower's status text ("" when it could not be read) and details."""

    run_id: int
    status: str
    details: str

    @property
    def exit_status(self) -> int:
        return exit_status(self.status)


def exit_status(status_text: str) -> int:
    """The exit status for a run whose ``flwr ls`` status is `status_text`."""
    return EXIT_STATUS.get(status_text, EXIT_UNFINISHED)


def flwr_executable() -> str:
    """The `flwr` command of this Python environment (the one MammoFL is installed in)."""
    local = Path(sys.executable).with_name("flwr")
    return str(local) if local.exists() else "flwr"


def parse_json_output(text: str, command: str) -> dict:
    """The JSON object a `flwr ... --format json` command printed (Flower prints it with rich, possibly after
    other lines)."""
    start = text.find("{")
    if start < 0:
        raise FlowerCliError(f"`{command}` printed no JSON: {text.strip()[:300]!r}")
    try:
        payload, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as error:
        raise FlowerCliError(f"`{command}` printed malformed JSON ({error}): {text.strip()[:300]!r}") from None
    if not isinstance(payload, dict) or payload.get("success") is False:
        raise FlowerCliError(f"`{command}` failed: {payload!r}"[:500])
    return payload


def submitted_run_id(text: str) -> int:
    """The run id in the output of ``flwr run ... --format json``."""
    payload = parse_json_output(text, "flwr run")
    try:
        return int(payload["run-id"])
    except (KeyError, TypeError, ValueError):
        raise FlowerCliError(f"`flwr run` gave no run id: {payload!r}") from None


def run_status(text: str, run_id: int) -> tuple[str, str]:
    """(status text, details) of `run_id` in the output of ``flwr ls ... --run-id RUN_ID --format json``."""
    payload = parse_json_output(text, "flwr ls")
    for run in payload.get("runs") or []:
        if str(run.get("run-id")) == str(run_id):
            return str(run.get("status", "")), str(run.get("status-details", ""))
    raise FlowerCliError(f"`flwr ls` does not list run {run_id}")


def follow_run(app_dir: Path, connection: str, *, run_config: Sequence[str] = (),
               federation_config: Sequence[str] = (), wait_s: float = 120.0, poll_s: float = 2.0,
               flwr: str | None = None, env: dict[str, str] | None = None) -> RunOutcome:
    """Submit `app_dir` to the SuperLink `connection`, stream its logs to this process's stdout, and return the
    run's outcome (see the module doc); `wait_s` bounds the wait for the final status after the log stream
    ends."""
    flwr = flwr or flwr_executable()
    env = {**os.environ, **(env or {})}
    command = [flwr, "run", str(app_dir), connection, "--format", "json"]
    for value in run_config:
        command += ["--run-config", value]
    for value in federation_config:
        command += ["--federation-config", value]
    submitted = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if submitted.returncode != 0:
        sys.stderr.write(submitted.stderr)
        raise FlowerCliError(f"`flwr run` exited {submitted.returncode}: "
                             f"{(submitted.stderr or submitted.stdout).strip()[-500:]}")
    run_id = submitted_run_id(submitted.stdout)
    log.info("run %d submitted; following its logs", run_id)
    subprocess.run([flwr, "log", str(run_id), connection, "--stream"], env=env, check=False)
    deadline = time.monotonic() + wait_s
    status, details = "", ""
    while True:
        listed = subprocess.run([flwr, "ls", connection, "--run-id", str(run_id), "--format", "json"],
                                capture_output=True, text=True, env=env, check=False)
        if listed.returncode == 0:
            status, details = run_status(listed.stdout, run_id)
            if status in EXIT_STATUS:
                break
        if time.monotonic() >= deadline:
            break
        time.sleep(poll_s)
    return RunOutcome(run_id=run_id, status=status, details=details)
