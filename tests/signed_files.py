"""The tests' coordinator key: sign bundles and checkpoints as a coordinator would, and the keys that trust it."""

from __future__ import annotations

from pathlib import Path

from common.signing import Signer, TrustedKeys, generate_key

KEY = generate_key()
TRUSTED = TrustedKeys([KEY.public_key()], source="the tests' key")
SIGNER = Signer(key=KEY, config_hash="0" * 64, code_version={"mammo-fl": "test", "git": None})


def bundle_signature(*, round: int = 1, epsilon: dict | None = None):
    """The `sign` hook of `save_bundle` with the tests' key."""
    return SIGNER.for_file(kind="bundle", round=round, epsilon=epsilon or {})


def resign(path: Path, *, kind: str = "bundle", round: int = 1) -> Path:
    """Sign a file as it now is (a file the coordinator itself wrote that way)."""
    SIGNER.sign_bytes(Path(path), Path(path).read_bytes(), kind=kind, round=round, epsilon={})
    return Path(path)
