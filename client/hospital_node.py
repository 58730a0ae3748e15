"""`mammofl-hospital node`: the hospital's SuperNode and its warm launcher, started and stopped together.

The SuperNode (``flower-supernode --isolation process``) talks to the SuperLink over TLS with its registered
node key and runs no app itself; the launcher (:mod:`client.launcher`), in this process, acquires its tasks and
runs the hospital's own ClientApp for the apps the hospital approved. A shared random SuperExec secret (written
0600 in the node's state folder) lets only this launcher acquire the SuperNode's tasks.

A node refuses to start without TLS (``--root-certificates``) and node authentication
(``--auth-supernode-private-key``), naming what is missing, unless started with ``--insecure-test-only``
(loopback tests and simulations of a deployment) and a node config whose policy says ``require-tls=false``, and
without at least one approved app.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from client.app_approval import AllowList

__all__ = ["LAUNCHER_DIR", "NodeOptions", "NodeStartError", "run_node", "supernode_command"]

log = logging.getLogger(__name__)

LAUNCHER_DIR = "launcher"  # under the node config's state-dir: timings, refusals, the SuperExec secret
_SECRET_FILE = "superexec-secret"
_START_TIMEOUT = 60.0
_STOP_TIMEOUT = 15.0


class NodeStartError(RuntimeError):
    """A node that may not start: what is missing or wrong, by option name."""


@dataclass(frozen=True)
class NodeOptions:
    """What `mammofl-hospital node` was given."""

    superlink: str
    node_config: str
    allowed: AllowList
    root_certificates: Path | None = None
    auth_key: Path | None = None
    insecure_test_only: bool = False
    runtime_port: int = 9094
    max_retries: int | None = None

    def node_values(self) -> dict:
        from flwr.common.config import parse_config_args

        return parse_config_args([self.node_config]) if self.node_config else {}

    def state_dir(self) -> Path:
        """The node config's `state-dir` (required: the ledger and the launcher's logs live there)."""
        values = self.node_values()
        if not values.get("state-dir"):
            raise NodeStartError("--node-config: 'state-dir' is required (the node's own disk: privacy ledger, "
                                 "caches, the launcher's logs)")
        return Path(str(values["state-dir"]))

    def check(self) -> None:
        """Refuse what a hospital node must not run without, naming each missing option."""
        missing = []
        require_tls = self.node_values().get("require-tls", True)  # the node's own policy (common.node_policy)
        if self.insecure_test_only and require_tls is not False:
            raise NodeStartError("--insecure-test-only: the node config's policy requires TLS and node "
                                 "authentication (require-tls, default true); a loopback test sets "
                                 "require-tls=false")
        if not self.insecure_test_only:
            if self.root_certificates is None:
                missing.append("--root-certificates (TLS to the SuperLink)")
            if self.auth_key is None:
                missing.append("--auth-supernode-private-key (node authentication)")
        if missing:
            raise NodeStartError("refusing to start without " + " and ".join(missing)
                                 + "; --insecure-test-only is for loopback tests only")
        for option, path in (("--root-certificates", self.root_certificates),
                             ("--auth-supernode-private-key", self.auth_key)):
            if path is not None and not path.is_file():
                raise NodeStartError(f"{option}: {path}: no such file")
        if not self.allowed.hashes:
            raise NodeStartError("no approved app: give --approved-app HASH or --approved-apps FILE "
                                 "(`mammofl-hospital app-hash APP_DIR` prints an app's hash)")
        self.state_dir()


def supernode_command(options: NodeOptions, *, secret_file: Path) -> list[str]:
    """The `flower-supernode` command line: process isolation, the node's TLS and key, the SuperExec secret."""
    command = [str(Path(sys.executable).parent / "flower-supernode"), "--superlink", options.superlink,
               "--isolation", "process", "--host", "127.0.0.1", "--port", str(options.runtime_port),
               "--superexec-auth-secret-file", str(secret_file)]
    if options.root_certificates is not None:
        command += ["--root-certificates", str(options.root_certificates)]
    else:
        command += ["--insecure"]
    if options.auth_key is not None:
        command += ["--auth-supernode-private-key", str(options.auth_key)]
    if options.max_retries is not None:
        command += ["--max-retries", str(options.max_retries)]
    if options.node_config:
        command += ["--node-config", options.node_config]
    return command


def _write_secret(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(secrets.token_hex(32).encode())


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _warm_up(log_dir: Path) -> object:
    """Import the hospital's ClientApp and what its handlers use, once: the per-message import tax, paid here."""
    start = time.monotonic()
    import opacus  # noqa: F401
    import torch

    import client.explanation_round  # noqa: F401
    import client.node  # noqa: F401
    from client.app import app

    torch.set_num_threads(1)
    seconds = time.monotonic() - start
    (log_dir / "startup.json").write_text(json.dumps({"imports": round(seconds, 3)}) + "\n")
    log.info("hospital ClientApp loaded in %.1f s", seconds)
    return app


def run_node(options: NodeOptions) -> int:
    """Start the SuperNode, then serve its tasks here until it exits or SIGTERM; returns the exit code."""
    from client.launcher import Launcher

    options.check()
    log_dir = options.state_dir() / LAUNCHER_DIR
    secret_file = log_dir / _SECRET_FILE
    _write_secret(secret_file)
    supernode = subprocess.Popen(supernode_command(options, secret_file=secret_file), stdin=subprocess.DEVNULL)
    try:
        # imports while the SuperNode connects; a SuperNode refused meanwhile (e.g. an unregistered key) ends the
        # node at once
        warm: dict = {}
        importer = threading.Thread(target=lambda: warm.update(app=_warm_up(log_dir)), daemon=True)
        importer.start()
        while importer.is_alive():
            if supernode.poll() is not None:
                log.error("the SuperNode exited with code %s", supernode.returncode)
                return supernode.returncode
            importer.join(0.2)
        if "app" not in warm:
            log.error("the hospital ClientApp could not be loaded")
            return 1
        launcher_app = warm["app"]
        deadline = time.monotonic() + _START_TIMEOUT
        while not _port_open(options.runtime_port):
            if supernode.poll() is not None:
                log.error("the SuperNode exited with code %s", supernode.returncode)
                return supernode.returncode
            if time.monotonic() > deadline:
                log.error("the SuperNode's Runtime API (127.0.0.1:%d) did not open within %.0f s",
                          options.runtime_port, _START_TIMEOUT)
                return 1
            time.sleep(0.2)
        launcher = Launcher(runtime_api_address=f"127.0.0.1:{options.runtime_port}", allowed=options.allowed,
                            client_app=launcher_app, log_dir=log_dir,
                            superexec_secret=secret_file.read_bytes())
        launcher.handle_sigterm()
        launcher.serve(alive=lambda: supernode.poll() is None)
    finally:
        if supernode.poll() is None:
            supernode.terminate()
            try:
                supernode.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                supernode.kill()
                supernode.wait()
    return supernode.returncode if supernode.returncode and supernode.returncode > 0 else 0
