"""Shared fixtures: where the real test data lives, and how its absence is handled.

Tests that need `../shared/data` fail when the `CI` variable is set and the data is missing (CI must have it);
elsewhere they skip with a message saying how to get it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest_plugins = ("flower_messages",)  # NodesGrid and the serverapp_identity fixture

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("MAMMOFL_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))

_HOW_TO_GET = (
    "Put the shared test data beside the repository (../shared/data with mini-mias/ and dicom/), "
    "or point MAMMOFL_SHARED_DATA at it; mini-MIAS alone can be fetched with `make demo` "
    "(see README, 'Data')."
)


def _require(path: Path) -> Path:
    if path.exists():
        return path
    message = f"test data missing: {path}. {_HOW_TO_GET}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def mias_dir() -> Path:
    """The mini-MIAS folder (PNG copy + Info.txt) of the shared data."""
    return _require(SHARED_DATA / "mini-mias")


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    """The 15 real DICOM files of the shared data."""
    return _require(SHARED_DATA / "dicom")


#: Third-party console noise no run may print (the coordinator's process or the hospitals' Ray actors); each is
#: fixed at its cause or filtered by its exact text (client.console, simulations.console).
CONSOLE_NOISE = {
    "Ray's accelerator env-var tip": "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO",
    "Opacus' secure-RNG notice": "Secure RNG turned off",
    "torch's full-backward-hook warning under Opacus": "Full backward hook is firing",
    "Flower's run_simulation deprecation": "DEPRECATED FEATURE",
    "Flower's actor shutdown notice": "Manually terminating",
    "Flower DEBUG lines (SecAgg+ stages)": "DEBUG",
}


@pytest.fixture(scope="session")
def console_noise():
    """`find(text) -> {what: first line}` of the known third-party noise in captured console text."""
    def find(text: str) -> dict[str, str]:
        found: dict[str, str] = {}
        for line in text.splitlines():
            for what, marker in CONSOLE_NOISE.items():
                if marker in line:
                    found.setdefault(what, line)
        return found
    return find


@pytest.fixture(autouse=True)
def _isolated_flower_home(tmp_path_factory, monkeypatch):
    """Nothing in the test suite touches ~/.flwr, checks for updates, installs dependencies or sends telemetry."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path_factory.getbasetemp() / "flwr-home"))
    monkeypatch.setenv("FLWR_DISABLE_UPDATE_CHECK", "1")
    monkeypatch.setenv("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "0")
