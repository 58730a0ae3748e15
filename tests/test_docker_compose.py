"""Static checks of docker-compose.yml and the Dockerfile (no container engine runs in CI).

The facts that matter for a deployment: three hospital SuperNodes, each with its own data folder mounted read-only,
its own key and state; TLS files mounted read-only where the flags point; node authentication on; never an
insecure mode; and every command line accepted by Flower's own argument parsers (flags exist, values valid) with a
node config that MammoFL's NodeConfig accepts.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import typer
import yaml
from flwr.common.config import parse_config_args
from flwr.superlink.cli.flower_superlink import _parse_args_run_superlink
from flwr.supernode.cli.flower_supernode import _parse_args_run_supernode

from client.app_approval import AllowList
from client.cli import app as hospital_cli
from client.hospital_node import NodeOptions, supernode_command
from common.run_config import NodeConfig, RunConfig
from server import certs

REPO = Path(__file__).resolve().parent.parent
COMPOSE = REPO / "docker-compose.yml"
HOSPITALS = ("hospital-a", "hospital-b", "hospital-c")
CERT_DIR = Path("deploy/certs")
KEY_DIR = Path("deploy/keys")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _command(service: dict) -> list[str]:
    command = service["command"]
    return shlex.split(command) if isinstance(command, str) else list(command)


def _mounts(service: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read_only) for the short volume syntax `SRC:DST[:ro]`."""
    mounts = {}
    for spec in service.get("volumes", []):
        parts = spec.split(":")
        source, target, options = parts[0], parts[1], parts[2:]
        if source.startswith("${"):  # ${VAR:-default}:target[:ro]
            source, _, rest = spec.partition("}:")
            source += "}"
            target, _, opts = rest.partition(":")
            options = [opts] if opts else []
        assert target not in mounts, f"{target} mounted twice"
        mounts[target] = (source, "ro" in options)
    return mounts


def _hospital_services(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if _command(s)[:2] == ["mammofl-hospital", "node"]}


def _node_options(command: list[str]) -> NodeOptions:
    """`mammofl-hospital node` arguments, parsed by the command's own parser, as the node's options."""
    node = typer.main.get_command(hospital_cli).commands["node"]
    params = node.make_context("node", command[2:]).params
    return NodeOptions(superlink=params["superlink"], node_config=params["node_config"],
                       allowed=AllowList(frozenset()), root_certificates=params["root_certificates"],
                       auth_key=params["auth_key"], insecure_test_only=params["insecure_test_only"])


def _supernode_args(command: list[str]):
    """The `flower-supernode` command line the node starts, parsed by Flower's own parser."""
    supernode = supernode_command(_node_options(command), secret_file=Path("/state/launcher/superexec-secret"))
    return _parse_args_run_supernode().parse_args(supernode[1:])


def test_header_says_how_it_is_tested():
    header = COMPOSE.read_text().split("\n\n")[0]
    assert "exercised only by the static checks of" in header
    assert "tests/test_docker_compose.py" in header


def test_services(compose):
    assert set(compose["services"]) == {"superlink", "register-nodes", *HOSPITALS}
    assert sorted(_hospital_services(compose)) == list(HOSPITALS)
    for name, service in compose["services"].items():
        assert service["build"]["dockerfile"] == "Dockerfile", name
        assert service["image"] == "mammofl:0.1.0", name


def test_no_insecure_mode_anywhere(compose):
    text = COMPOSE.read_text()
    for name, service in compose["services"].items():
        assert not any(arg.startswith("--insecure") for arg in _command(service)), name
    assert "--insecure" not in text.replace("`--isolation process`", "")
    assert "allow-runtime-dependency-installation" not in text


def test_superlink_tls_auth_database_isolation(compose):
    service = compose["services"]["superlink"]
    command = _command(service)
    assert command[0] == "flower-superlink"
    args = _parse_args_run_superlink().parse_args(command[1:])
    mounts = _mounts(service)
    paths = certs.cert_paths(CERT_DIR)
    for flag_value, source in [
        (args.ssl_ca_certfile, paths.ca_cert),
        (args.ssl_certfile, paths.server_cert),
        (args.ssl_keyfile, paths.server_key),
    ]:
        assert mounts[flag_value] == (f"./{source}", True)
    assert "ca.key" not in COMPOSE.read_text()  # the CA key never goes near a container
    assert args.enable_supernode_auth is True
    assert args.insecure is False
    assert args.isolation == "subprocess"
    assert args.runtime_dependency_install is False
    database = Path(args.database)
    volume, read_only = mounts[str(database.parent)]
    assert volume in compose["volumes"] and not read_only  # a named volume: the state survives restarts
    assert (args.host, args.port) == ("0.0.0.0", 9093)
    assert service["ports"] == ["127.0.0.1:9093:9093"]
    assert service["healthcheck"]["test"][:3] == ["CMD", "python", "-c"]
    assert "server_hostname='superlink'" in service["healthcheck"]["test"][3]


def test_hospitals_data_read_only_and_distinct(compose):
    hospitals = _hospital_services(compose)
    sources, keys, states = set(), set(), set()
    for name, service in hospitals.items():
        command = _command(service)
        args = _supernode_args(command)
        mounts = _mounts(service)
        node_config = parse_config_args([args.node_config])
        resolved = NodeConfig.from_flower(node_config, run=RunConfig())
        data_target = node_config["data-dir"]
        source, read_only = mounts[data_target]
        assert read_only, f"{name}: data must be mounted read-only"
        assert source == f"${{HOSPITAL_{name[-1].upper()}_DATA:-./deploy/data/{name}}}"
        sources.add(source)
        assert Path(node_config["manifest"]).parent == Path(data_target)
        assert resolved.policy.max_epsilon == 8.0 and resolved.policy.require_tls
        # its own state on its own named volume, writable (ledger and cache)
        state_source, state_ro = mounts[node_config["state-dir"]]
        assert state_source == f"{name}-state" and state_source in compose["volumes"] and not state_ro
        states.add(state_source)
        # TLS: trusts the federation CA, mounted read-only
        assert args.insecure is False
        assert mounts[args.root_certificates] == (f"./{certs.cert_paths(CERT_DIR).ca_cert}", True)
        # node authentication with its own private key, as `mammofl-coordinator node-keys` names it
        key_source, key_ro = mounts[args.auth_supernode_private_key]
        assert key_source == f"./{certs.node_key_paths(KEY_DIR, name).private}" and key_ro
        keys.add(key_source)
        assert args.superlink == "superlink:9093"
        # the node runs only the apps its steward approved, in its own warm launcher (no app from the FAB)
        assert args.isolation == "process"
        assert not _node_options(command).insecure_test_only
        assert mounts["/config/approved-apps"] == ("./deploy/approved-apps", True)
        assert "--approved-apps=/config/approved-apps" in command
        assert service["depends_on"] == {"register-nodes": {"condition": "service_completed_successfully"}}
        assert not any(target == "/certs/server.key" for target in mounts), name
    assert len(sources) == len(keys) == len(states) == 3


def test_no_other_service_sees_hospital_data(compose):
    for name, service in compose["services"].items():
        if name in HOSPITALS:
            continue
        assert not any("deploy/data" in spec or "_DATA" in spec for spec in service.get("volumes", [])), name


def test_registration_runs_before_the_nodes(compose):
    service = compose["services"]["register-nodes"]
    assert _command(service) == ["sh", "/deploy/register-nodes.sh"]
    mounts = _mounts(service)
    assert mounts["/deploy/register-nodes.sh"] == ("./deploy/register-nodes.sh", True)
    assert mounts[service["environment"]["KEYS_DIR"]] == ("./deploy/node-keys", True)
    assert service["environment"]["SUPERLINK_ADDRESS"] == "superlink:9093"
    assert service["depends_on"] == {"superlink": {"condition": "service_healthy"}}
    assert (REPO / "deploy" / "register-nodes.sh").is_file()


def test_dockerfile_and_build_context():
    dockerfile = (REPO / "Dockerfile").read_text()
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith(("#", " "))]
    assert instructions[0] == "FROM python:3.11-slim"
    assert [line for line in instructions if line.startswith("FROM")] == [instructions[0]]
    assert "RUN pip install -r requirements.lock" in dockerfile
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in dockerfile
    assert "FLWR_TELEMETRY_ENABLED=0" in dockerfile
    assert "USER mammofl" in dockerfile
    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv/", ".git/", "data/", "deploy/"} <= set(ignored)
