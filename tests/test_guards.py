"""Architecture guards (DESIGN §2): cheap, run first.

The package names are generic (PyPI has distributions that install `common` or `server`), so check that each
resolves to this repository, that only `mammo-fl` claims them, and that the import rules hold.
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
from pathlib import Path

import pytest

from conftest import REPO_ROOT

PACKAGES = ("server", "client", "common", "simulations")
# package -> packages it must never import
FORBIDDEN = {
    "common": {"flwr", "client", "server", "simulations"},
    "client": {"server", "simulations"},
    "server": {"client", "simulations"},
    "simulations": set(),
}


@pytest.mark.parametrize("name", PACKAGES)
def test_package_resolves_inside_repo(name):
    module = importlib.import_module(name)
    origin = Path(module.__file__).resolve()
    assert origin.is_relative_to(REPO_ROOT), f"{name} imports from {origin}, not from {REPO_ROOT}"


@pytest.mark.parametrize("name", PACKAGES)
def test_only_mammo_fl_distribution_claims_package(name):
    owners = importlib.metadata.packages_distributions().get(name)
    assert owners == ["mammo-fl"], f"{name} is claimed by {owners}"


def _imported_top_levels(source: Path) -> set[str]:
    tree = ast.parse(source.read_text(), filename=str(source))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _modules(package: str) -> list[Path]:
    return sorted((REPO_ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_import_rules(package):
    modules = _modules(package)
    assert modules, f"no modules under {package}/"
    violations = [
        f"{path.relative_to(REPO_ROOT)} imports {bad}"
        for path in modules
        for bad in sorted(_imported_top_levels(path) & FORBIDDEN[package])
    ]
    assert not violations, "\n".join(violations)


def test_guard_sees_a_violation(tmp_path):
    """The AST walk itself finds both import forms (a guard that cannot fail guards nothing)."""
    bad = tmp_path / "bad.py"
    bad.write_text("import flwr.serverapp\nfrom server.app import app\nfrom . import sibling\n")
    assert _imported_top_levels(bad) == {"flwr", "server"}
