"""Which Flower apps a hospital approved: the FAB hash, computed as Flower computes it, and the node's allow-list.

The hash is Flower's own FAB hash (``Fab.hash_str``, ``Run.fab_hash``): the SHA-256 of the FAB file's bytes.
``flwr run APP_DIR`` builds that file with ``flwr.cli.build.build_fab_from_disk``, deterministically (files sorted,
a fixed zip timestamp), so the hash is a function of the app's source tree alone, and :func:`app_hash` rebuilds
the same bytes from a folder. What it covers, exactly as Flower 1.42 selects it:

- every file under APP_DIR matching ``**/*.py``, ``**/*.toml``, ``**/*.md``, ``**/*.yaml``, ``**/*.yml``,
  ``**/*.json``, ``**/*.jsonl`` or ``/LICENSE`` (``FAB_INCLUDE_PATTERNS``), minus what ``.gitignore`` ignores and
  Flower's own exclusions (``__pycache__``, ``.flwr/``, ``test_*.py``, ``*_test.py``, build/venv folders);
- ``pyproject.toml`` re-serialised without its ``[tool.flwr.federations]`` table (so the run config defaults,
  the components and the dependencies are covered, the coordinator's connection settings are not);
- the FAB's ``.info/CONTENT`` manifest (path, SHA-256 and size of each file above).

It does not cover files of other types (``.sh``, ``.csv``, ``.txt``, ``.lock``), tests named ``test_*.py``, nor the
installed dependencies (torch, Opacus, Flower): those are the node's own environment. A run config override
(``flwr run --run-config``) is not part of the FAB either; the node's own policy judges it.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AllowList", "AllowListError", "app_hash", "fab_hash", "read_allow_list"]

_HASH = re.compile(r"[0-9a-f]{64}")


class AllowListError(ValueError):
    """An allow-list entry that is not a SHA-256 hex digest, or an unreadable allow-list file."""


def fab_hash(fab_bytes: bytes) -> str:
    """Flower's FAB hash: the SHA-256 hex digest of the FAB file."""
    return hashlib.sha256(fab_bytes).hexdigest()


def app_hash(app_dir: Path) -> str:
    """The FAB hash `flwr run app_dir` would submit: the FAB rebuilt from the folder with Flower's own builder."""
    from flwr.cli.build import build_fab_from_disk

    if not (app_dir / "pyproject.toml").is_file():
        raise FileNotFoundError(f"{app_dir}: no pyproject.toml (not a Flower app folder)")
    return fab_hash(build_fab_from_disk(app_dir))


@dataclass(frozen=True)
class AllowList:
    """The FAB hashes a hospital approved (its steward's decision, in the node's own configuration)."""

    hashes: frozenset[str]

    @classmethod
    def of(cls, hashes: list[str] | tuple[str, ...], *, source: str = "--approved-app") -> AllowList:
        cleaned = []
        for value in hashes:
            value = value.strip().lower()
            if not _HASH.fullmatch(value):
                raise AllowListError(f"{source}: '{value[:80]}' is not a SHA-256 hex digest (64 hex characters; "
                                     f"`mammofl-hospital app-hash APP_DIR` prints one)")
            cleaned.append(value)
        return cls(frozenset(cleaned))

    def __or__(self, other: AllowList) -> AllowList:
        return AllowList(self.hashes | other.hashes)

    def refusal(self, *, declared_hash: str, fab_bytes: bytes) -> str | None:
        """Why a FAB may not run here (None if approved). The hash is recomputed from the bytes received: the
        hash the SuperLink declares is not trusted on its own."""
        actual = fab_hash(fab_bytes)
        if declared_hash and actual != declared_hash:
            return (f"refused: the app's declared hash {declared_hash} does not match its content "
                    f"(sha256 {actual})")
        if actual not in self.hashes:
            return (f"refused: app sha256 {actual} is not approved by this hospital "
                    f"({len(self.hashes)} approved app(s); `mammofl-hospital app-hash` prints an app's hash)")
        return None


def read_allow_list(path: Path) -> AllowList:
    """An allow-list file: one SHA-256 hex digest per line; blank lines and `#` comments ignored."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise AllowListError(f"{path}: cannot read the allow-list ({error})") from None
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        value = line.split("#", 1)[0].strip()
        if value:
            entries.append((number, value))
    lists = [AllowList.of([value], source=f"{path}, line {number}") for number, value in entries]
    return AllowList(frozenset().union(*(allowed.hashes for allowed in lists)))
