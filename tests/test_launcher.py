"""The hospital's node: app approval by FAB hash, start-up refusals, and (slow) a modified app refused on loopback.

The hash is Flower's own FAB hash, rebuilt from a folder with Flower's builder (``client.app_approval``); the
fast tests build small apps in a temporary folder. The slow test starts a real SuperLink and one hospital node
(`mammofl-hospital node`: SuperNode in process isolation + the warm launcher) and runs first the approved app
(this checkout), then a copy with DP turned off and a line changed in ``client/node.py``: the copy is refused
by hash, without training, the ledger byte for byte as the approved run left it, the refusal in the node's log.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from client.app_approval import AllowList, AllowListError, app_hash, fab_hash, read_allow_list
from client.cli import app as hospital_cli
from client.hospital_node import NodeOptions, NodeStartError, supernode_command
from simulations.presets import PRESETS

REPO = Path(__file__).resolve().parent.parent

_PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "tiny-app"
version = "1.0.0"
dependencies = ["flwr==1.42.0"]

[tool.flwr.app]
publisher = "mammofl"

[tool.flwr.app.components]
serverapp = "tiny.server:app"
clientapp = "tiny.client:app"

[tool.flwr.app.config]
dp = true
"""


def _tiny_app(root: Path) -> Path:
    (root / "tiny").mkdir(parents=True)
    (root / "pyproject.toml").write_text(_PYPROJECT)
    (root / "tiny" / "__init__.py").write_text("")
    (root / "tiny" / "client.py").write_text("BUDGET_CHECK = True\n")
    (root / "tiny" / "server.py").write_text("ROUNDS = 3\n")
    return root


def test_app_hash_is_the_fab_flower_builds(tmp_path):
    from flwr.cli.build import build_fab_from_disk

    folder = _tiny_app(tmp_path / "app")
    fab = build_fab_from_disk(folder)
    assert app_hash(folder) == hashlib.sha256(fab).hexdigest() == fab_hash(fab)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:  # what the hash covers
        assert sorted(archive.namelist()) == [".info/CONTENT", "pyproject.toml", "tiny/__init__.py",
                                              "tiny/client.py", "tiny/server.py"]
    assert app_hash(folder) == app_hash(folder)  # deterministic: fixed zip dates, sorted files


def test_app_hash_covers_code_and_run_config_defaults_not_other_files(tmp_path):
    folder = _tiny_app(tmp_path / "app")
    approved = app_hash(folder)
    (folder / "notes.txt").write_text("not an app file type")
    (folder / "tiny" / "test_client.py").write_text("def test(): pass\n")  # Flower leaves tests out
    (folder / "pyproject.toml").write_text(_PYPROJECT + '\n[tool.flwr.federations]\ndefault = "x"\n')
    assert app_hash(folder) == approved
    (folder / "tiny" / "client.py").write_text("BUDGET_CHECK = False\n")
    budget_removed = app_hash(folder)
    assert budget_removed != approved
    (folder / "tiny" / "client.py").write_text("BUDGET_CHECK = True\n")
    (folder / "pyproject.toml").write_text(_PYPROJECT.replace("dp = true", "dp = false"))
    dp_off = app_hash(folder)
    assert len({approved, budget_removed, dp_off}) == 3


def test_app_hash_of_this_checkout_matches_the_cli(tmp_path):
    result = CliRunner().invoke(hospital_cli, ["app-hash", str(REPO)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == app_hash(REPO)
    missing = CliRunner().invoke(hospital_cli, ["app-hash", str(tmp_path)])
    assert missing.exit_code == 2
    assert "no pyproject.toml" in missing.output


def test_allow_list_refuses_unlisted_and_mislabelled_apps():
    approved, other = b"approved fab bytes", b"modified fab bytes"
    allowed = AllowList.of([fab_hash(approved).upper()])
    assert allowed.refusal(declared_hash=fab_hash(approved), fab_bytes=approved) is None
    refusal = allowed.refusal(declared_hash=fab_hash(other), fab_bytes=other)
    assert refusal.startswith(f"refused: app sha256 {fab_hash(other)} is not approved by this hospital")
    # the SuperLink's declared hash is not trusted: the bytes are hashed here
    mislabelled = allowed.refusal(declared_hash=fab_hash(approved), fab_bytes=other)
    assert mislabelled == (f"refused: the app's declared hash {fab_hash(approved)} does not match its content "
                           f"(sha256 {fab_hash(other)})")


def test_allow_list_file(tmp_path):
    a, b = "a" * 64, "0123456789abcdef" * 4
    path = tmp_path / "approved-apps"
    path.write_text(f"# approved by the data steward\n{a}  # release 0.1\n\n{b}\n")
    assert read_allow_list(path).hashes == {a, b}
    path.write_text(f"{a}\nnot-a-hash\n")
    with pytest.raises(AllowListError, match=r"approved-apps, line 2: 'not-a-hash' is not a SHA-256"):
        read_allow_list(path)
    with pytest.raises(AllowListError, match="cannot read"):
        read_allow_list(tmp_path / "missing")


def _options(tmp_path: Path, **changes) -> NodeOptions:
    values = dict(superlink="127.0.0.1:9092", node_config=f'state-dir="{tmp_path / "state"}"',
                  allowed=AllowList.of(["a" * 64]))
    values.update(changes)
    return NodeOptions(**values)


def test_node_refuses_to_start_without_tls_and_node_auth(tmp_path):
    with pytest.raises(NodeStartError) as refused:
        _options(tmp_path).check()
    assert str(refused.value) == (
        "refusing to start without --root-certificates (TLS to the SuperLink) and --auth-supernode-private-key "
        "(node authentication); --insecure-test-only is for loopback tests only")
    ca = tmp_path / "ca.crt"
    ca.write_text("pem")
    with pytest.raises(NodeStartError, match=r"without --auth-supernode-private-key \(node authentication\);"):
        _options(tmp_path, root_certificates=ca).check()
    with pytest.raises(NodeStartError, match=r"--auth-supernode-private-key: .*missing-key: no such file"):
        _options(tmp_path, root_certificates=ca, auth_key=tmp_path / "missing-key").check()
    # the test flag alone is not enough while the node's own policy requires TLS (require-tls, default true)
    with pytest.raises(NodeStartError, match=r"--insecure-test-only: the node config's policy requires TLS"):
        _options(tmp_path, insecure_test_only=True).check()
    insecure = f'state-dir="{tmp_path / "state"}" require-tls=false'
    with pytest.raises(NodeStartError, match="no approved app"):
        _options(tmp_path, insecure_test_only=True, node_config=insecure, allowed=AllowList(frozenset())).check()
    with pytest.raises(NodeStartError, match="'state-dir' is required"):
        _options(tmp_path, insecure_test_only=True, node_config='require-tls=false').check()
    _options(tmp_path, insecure_test_only=True, node_config=insecure).check()  # flag and policy both say so


def test_node_command_refuses_before_starting_anything(tmp_path):
    result = CliRunner().invoke(hospital_cli, ["node", "--superlink", "127.0.0.1:9092", "--node-config",
                                               f'state-dir="{tmp_path}"', "--approved-app", "a" * 64])
    assert result.exit_code == 2
    assert "refusing to start without --root-certificates" in " ".join(result.output.split())
    assert not (tmp_path / "launcher").exists()
    bad = CliRunner().invoke(hospital_cli, ["node", "--superlink", "x:1", "--node-config", "", "--approved-app",
                                            "1234", "--insecure-test-only"])
    assert bad.exit_code == 2
    assert "--approved-app: '1234' is not a SHA-256 hex digest" in " ".join(bad.output.split())


def test_supernode_command_runs_no_app_itself(tmp_path):
    ca, key = tmp_path / "ca.crt", tmp_path / "node1"
    secure = supernode_command(_options(tmp_path, root_certificates=ca, auth_key=key, runtime_port=9200),
                               secret_file=tmp_path / "secret")
    assert secure[1:] == ["--superlink", "127.0.0.1:9092", "--isolation", "process", "--host", "127.0.0.1",
                          "--port", "9200", "--superexec-auth-secret-file", str(tmp_path / "secret"),
                          "--root-certificates", str(ca), "--auth-supernode-private-key", str(key),
                          "--node-config", f'state-dir="{tmp_path / "state"}"']
    insecure = supernode_command(_options(tmp_path, insecure_test_only=True, node_config="require-tls=false"),
                                 secret_file=tmp_path / "secret")
    assert "--insecure" in insecure and "--auth-supernode-private-key" not in insecure


# ---------------------------------------------------------------- on loopback
def _modified_app(release: Path, root: Path) -> Path:
    """A copy of the release with DP off by default and the node code changed."""
    shutil.copytree(release, root)
    pyproject = root / "pyproject.toml"
    assert "dp = true" in pyproject.read_text()
    pyproject.write_text(pyproject.read_text().replace("dp = true", "dp = false"))
    with open(root / "client" / "node.py", "a") as handle:
        handle.write("# budget check removed by the coordinator\n")
    return root


@pytest.mark.slow
def test_a_modified_app_is_refused_by_hash(tmp_path, mias_dir):
    import deployment_helpers as loopback

    base_env = {**os.environ, "PATH": f"{loopback.BIN}:{os.environ.get('PATH', '')}",
                "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    procs = loopback.Processes(log_dir=tmp_path / "logs", base_env=base_env)
    procs.log_dir.mkdir()
    try:
        port = loopback.free_port()
        link = procs.start("superlink", [str(loopback.BIN / "flower-superlink"), "--insecure",
                                         "--database", str(tmp_path / "link.db"),
                                         "--disable-runtime-dependency-installation", "--isolation", "subprocess",
                                         "--host", "127.0.0.1", "--port", str(port)],
                           home=tmp_path / "homes" / "superlink", cwd=tmp_path)
        cli_home = tmp_path / "homes" / "cli"
        cli_home.mkdir(parents=True)
        (cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "loop"\n\n[superlink.loop]\naddress = "127.0.0.1:{port}"\ninsecure = true\n')
        (folder,) = loopback.make_hospital_folders(mias_dir, tmp_path / "hospitals", ["hospital-a"]).values()
        state = tmp_path / "state"
        release = loopback.snapshot_app(REPO, tmp_path / "release")
        approved = app_hash(release)
        node = procs.start("node", [*loopback.HOSPITAL_CLI, "node", "--superlink", f"127.0.0.1:{port}",
                                    "--insecure-test-only", "--approved-app", approved,
                                    "--runtime-port", str(loopback.free_port()),
                                    "--node-config",
                                    loopback.node_config_text(folder, state, 50.0) + " require-tls=false"],
                           home=tmp_path / "homes" / "node", cwd=tmp_path, env={"PYTHONPATH": str(REPO)})
        assert loopback.wait_until(lambda: "SuperNode ID:" in node.output() or link.popen.poll() is not None
                                    or node.popen.poll() is not None, 90), node.tail()
        assert node.popen.poll() is None and link.popen.poll() is None, node.tail() + link.tail()

        def run(app_dir: Path, name: str) -> dict:
            smoke = {k: v for k, v in PRESETS["smoke"].overrides.items() if not k.startswith("sim-")}
            config = {**smoke, "min-nodes": 1, "min-train-replies": 1, "min-evaluate-replies": 1,
                      "round-timeout": 120.0, "dp-mode": "local", "explain-methods": "",
                      "run-dir": str(tmp_path / name)}
            rc, out = procs.run(f"flwr-run-{name}", [str(loopback.BIN / "flwr"), "run", str(app_dir), "loop",
                                                     "--stream", "--run-config", loopback.run_config_text(config)],
                                home=cli_home, cwd=tmp_path, timeout=300)
            rc, listing = procs.run("flwr-ls", [str(loopback.BIN / "flwr"), "ls", "loop", "--format", "json"],
                                    home=cli_home, cwd=tmp_path, timeout=60)
            assert rc == 0, listing
            return {r["run-id"]: r for r in json.loads(listing)["runs"]}

        runs = run(release, "approved")  # the approved app trains (and evaluates): the ledger records it
        assert [r["status"] for r in runs.values()] == ["finished:completed"], runs
        (approved_run,) = runs
        ledger = state / "privacy-ledger.json"
        recorded = ledger.read_bytes()
        assert any(e["server_round"] == 1 for e in json.loads(recorded)["entries"])  # the round it trained

        modified = _modified_app(release, tmp_path / "modified-app")
        modified_hash = app_hash(modified)
        assert modified_hash != approved
        runs = run(modified, "modified")
        (refused_run,) = [r for r in runs.values() if r["status"] != "finished:completed"]
        assert refused_run["status"] == "finished:failed", runs
        assert ledger.read_bytes() == recorded  # no training, no budget spent
        reason = f"refused: app sha256 {modified_hash} is not approved by this hospital"
        assert reason in node.output()  # the hospital's own log names the refusal
        refusals = [json.loads(line) for line in (state / "launcher" / "refusals.jsonl").read_text().splitlines()]
        assert refusals and {r["run_id"] for r in refusals} == {int(refused_run["run-id"])}
        assert all(r["declared_hash"] == modified_hash and r["reason"].startswith(reason) for r in refusals)
        served = [json.loads(line) for line in (state / "launcher" / "timings.jsonl").read_text().splitlines()]
        by_run = {}
        for entry in served:
            by_run.setdefault(entry["run_id"], set()).add(entry["approved"])
        assert by_run == {int(approved_run): {True}, int(refused_run["run-id"]): {False}}
        # the coordinator saw error replies only: no weights
        metrics = json.loads((tmp_path / "modified" / "metrics.json").read_text())
        assert metrics["status"] == "failed"
        assert not (tmp_path / "modified" / "model.mammofl").exists()
    finally:
        survivors = procs.stop_all()
        assert not survivors, f"processes left running: {survivors}"


def test_message_timings_count_the_wait_at_the_supernode():
    from flwr.supercore.date import now

    from client.launcher import MessageTimings, _seconds_since

    created = now()  # how the SuperNode stamps a task (`pending_at`)
    assert _seconds_since(created.isoformat(), created.timestamp() + 1.5) == pytest.approx(1.5)
    assert _seconds_since("", created.timestamp()) == 0.0
    timings = MessageTimings(run_id=7, message_type="train", approved=True, status="completed", acquired_at=0.0,
                             queued=0.25, arrival=0.3, pull=0.5, check=0.01, handle=2.0, push=0.24, total=3.0)
    assert timings.overhead == pytest.approx(0.7)
    assert json.loads(timings.to_json())["overhead"] == 0.7
