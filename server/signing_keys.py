"""The coordinator's signing keys: a key directory, its rotation, and the key a run signs its outputs with.

Key directory (``mammofl-coordinator signing-key generate --out DIR``)::

    DIR/signing.key   the current Ed25519 private key (PKCS8 PEM, mode 0600): never leaves the coordinator
    DIR/signing.pub   its public key
    DIR/trusted.pub   the public keys hospitals trust: the current one and the earlier ones kept at rotation

Hospitals receive ``trusted.pub`` out of band (with the federation's ``ca.crt``) and load models with
``mammofl-hospital screen --public-key trusted.pub``.

Rotation (``signing-key rotate DIR``): a new key replaces ``signing.key``; the old private key is deleted (nothing
can be signed with it any more) and its public key stays in ``trusted.pub``, so what it signed still verifies.
``--revoke-old`` leaves it out of ``trusted.pub`` instead (after a leak): everything it signed is then refused by
whoever uses the new file. Either way hospitals must be given the new ``trusted.pub``.

The key a run signs with is run config ``signing-key`` (the path of a ``signing.key``); resume verifies the run's
checkpoints against that directory's ``trusted.pub`` (or the key's own public key where there is none). With
``signing-key`` empty, a key directory is made inside the run directory (``<run dir>/signing/``, reused on
resume): fine for a simulation, whose outputs stay on one machine; a deployed coordinator is warned, since a
fresh key per run gives hospitals nothing stable to trust.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.run_config import RunConfig
from common.signing import (
    SignatureError,
    Signer,
    TrustedKeys,
    code_version,
    config_hash,
    fingerprint,
    generate_key,
    public_pem,
    read_private_key,
    write_private_key,
)

log = logging.getLogger(__name__)

PRIVATE_FILE = "signing.key"
PUBLIC_FILE = "signing.pub"
TRUSTED_FILE = "trusted.pub"
RUN_KEY_DIR = "signing"


@dataclass(frozen=True)
class KeyPaths:
    """The files of one key directory."""

    directory: Path

    @property
    def private(self) -> Path:
        return self.directory / PRIVATE_FILE

    @property
    def public(self) -> Path:
        return self.directory / PUBLIC_FILE

    @property
    def trusted(self) -> Path:
        return self.directory / TRUSTED_FILE


@dataclass(frozen=True)
class Rotation:
    """What `rotate_key_directory` did: the fingerprints of the old and new key, and which keys are trusted now."""

    paths: KeyPaths
    old: str
    new: str
    trusted: tuple[str, ...]


def generate_key_directory(directory: Path, *, force: bool = False) -> KeyPaths:
    """A new key directory (see the module doc); refuses to replace existing key files unless `force`."""
    paths = KeyPaths(Path(directory))
    existing = [p for p in (paths.private, paths.public, paths.trusted) if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{existing[0]} exists; use --force to replace the key (everything signed with the "
                              f"old one is then refused), or 'signing-key rotate' to keep trusting it")
    paths.directory.mkdir(parents=True, exist_ok=True)
    for path in existing:
        path.unlink()
    key = generate_key()
    write_private_key(paths.private, key)
    _write_atomic(paths.public, public_pem(key))
    _write_atomic(paths.trusted, public_pem(key))
    return paths


def rotate_key_directory(directory: Path, *, revoke_old: bool = False) -> Rotation:
    """Replace the directory's key with a new one; the old public key stays trusted unless `revoke_old`."""
    paths = KeyPaths(Path(directory))
    old = load_signing_key(paths.private)
    trusted = TrustedKeys.read(paths.trusted) if paths.trusted.is_file() else \
        TrustedKeys([old.public_key()], source=str(paths.trusted))
    new = generate_key()
    keep = [trusted.get(f) for f in trusted.fingerprints if not (revoke_old and f == fingerprint(old))]
    now_trusted = TrustedKeys([new.public_key(), *keep], source=str(paths.trusted))
    staged = paths.private.with_name(f".{PRIVATE_FILE}.new")
    staged.unlink(missing_ok=True)
    write_private_key(staged, new)
    _write_atomic(paths.trusted, now_trusted.to_pem())  # first, so no moment trusts neither key
    os.replace(staged, paths.private)
    _write_atomic(paths.public, public_pem(new))
    return Rotation(paths=paths, old=fingerprint(old), new=fingerprint(new), trusted=now_trusted.fingerprints)


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's private key; a warning when others than its owner may read the file."""
    path = Path(path)
    key = read_private_key(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("signing key %s is readable by others (mode %o): chmod 600 it", path, mode)
    return key


def trusted_keys_for(key_path: Path) -> TrustedKeys:
    """What the owner of `key_path` trusts: its directory's trusted.pub plus the key's own public key."""
    key_path = Path(key_path)
    own = load_signing_key(key_path).public_key()
    trusted_file = key_path.parent / TRUSTED_FILE
    if trusted_file.is_file():
        return TrustedKeys.read(trusted_file).with_keys([own])
    return TrustedKeys([own], source=str(key_path))


@dataclass(frozen=True)
class RunSigning:
    """How one run signs its checkpoints and bundle, and which keys its resume trusts."""

    signer: Signer
    trusted: TrustedKeys
    key_path: Path
    generated: bool  # the key was made for this run (run config signing-key empty)

    def describe(self) -> dict:
        """The ``signing`` section of ``metrics.json``."""
        public = self.key_path.parent / TRUSTED_FILE
        return {"key": self.signer.fingerprint, "public_key": str(public if public.is_file() else self.key_path),
                "generated": self.generated, "trusted": list(self.trusted.fingerprints)}


def run_signing(config: RunConfig, run_path: Path) -> RunSigning:
    """The signing of a run in `run_path`: run config ``signing-key``, else a key made in ``<run>/signing/``."""
    if config.signing_key:
        key_path = Path(config.signing_key).expanduser().resolve()
        if not key_path.is_file():
            raise SignatureError(f"run config 'signing-key': no such file {key_path} (make one with "
                                 f"'mammofl-coordinator signing-key generate --out DIR')")
        generated = False
    else:
        paths = KeyPaths(Path(run_path) / RUN_KEY_DIR)
        if not paths.private.is_file():
            generate_key_directory(paths.directory)
        key_path, generated = paths.private, True
        if config.sim_data_dir:
            log.info("run config 'signing-key' is empty: this simulation signs with a key made for it in %s "
                     "(public key %s)", paths.directory, paths.trusted)
        else:
            log.warning("run config 'signing-key' is empty: the model and checkpoints are signed with a key made "
                        "for this run only, in %s. Hospitals must be given %s to use the model. A federation "
                        "should sign every run with one key: 'mammofl-coordinator signing-key generate --out DIR',"
                        " then run config signing-key='DIR/%s'", paths.directory, paths.trusted, PRIVATE_FILE)
    key = load_signing_key(key_path)
    signer = Signer(key=key, config_hash=config_hash(config.to_flower()), code_version=code_version())
    return RunSigning(signer=signer, trusted=trusted_keys_for(key_path), key_path=key_path, generated=generated)


def run_trusted_keys(config: RunConfig, run_path: Path) -> TrustedKeys:
    """The keys a run's own outputs verify against (e.g. for the simulation's gallery)."""
    if config.signing_key:
        return trusted_keys_for(Path(config.signing_key).expanduser().resolve())
    return TrustedKeys.read(KeyPaths(Path(run_path) / RUN_KEY_DIR).trusted)


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
