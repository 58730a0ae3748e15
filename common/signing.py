"""Ed25519 signatures over released files (model bundles, checkpoints), with the provenance they vouch for.

A signed file ``F`` has a detached signature ``F.sig`` beside it (JSON)::

    {"format": "mammofl-signature/1", "file": "<F's name, informative>", "sha256": "<hex of F's bytes>",
     "provenance": {"kind": "bundle" | "checkpoint", "round": N, "hospitals": [...],
                    "epsilon": {hospital: epsilon | null}, "code_version": {"mammo-fl": ..., "git": ...},
                    "config_hash": "<sha256 of the resolved run config>", "signed_at": "<UTC time>"},
     "key": "<fingerprint of the signer's public key>", "signature": "<base64 Ed25519 signature>"}

The signature covers ``FORMAT + "\\n" + sha256 + "\\n" + canonical JSON of the provenance`` (sorted keys, no
spaces), so the file's exact bytes and every provenance field are bound together; the file itself is left as it
was written (a bundle stays a plain ``torch.load``-able file). Verification (:func:`verify_file`) reads the file
once, checks the signer is one of the trusted public keys, the bytes' hash and the signature, and hands back those
same bytes for parsing, so nothing is parsed before it is verified and nothing can change in between.

Fingerprint of a key: SHA-256 of its 32 raw public bytes, hex. Key files: private keys PKCS8 PEM (unencrypted,
mode 0600), public keys SubjectPublicKeyInfo PEM; a trusted-keys file holds one or more public PEM blocks.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

FORMAT = "mammofl-signature/1"
SIGNATURE_SUFFIX = ".sig"
KINDS = ("bundle", "checkpoint")
_PEM_PUBLIC = b"-----BEGIN PUBLIC KEY-----"


class SignatureError(ValueError):
    """A file whose signature is missing, unreadable, from an untrusted key or does not match (why: message)."""


@dataclass(frozen=True)
class Provenance:
    """What a signature vouches for besides the file's bytes."""

    kind: str  # one of KINDS
    round: int  # federated rounds completed when the file was written
    epsilon: dict[str, float | None]  # hospital -> epsilon spent so far (None where it reported none)
    code_version: dict[str, str | None]  # "mammo-fl" (package version), "git" (commit or None)
    config_hash: str  # common.signing.config_hash of the resolved run config
    signed_at: str = ""  # UTC, ISO 8601

    @property
    def hospitals(self) -> tuple[str, ...]:
        return tuple(sorted(self.epsilon))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hospitals": list(self.hospitals)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Provenance:
        values = {k: v for k, v in data.items() if k != "hospitals"}
        provenance = cls(**values)
        if list(data.get("hospitals", provenance.hospitals)) != list(provenance.hospitals):
            raise ValueError("hospitals differ from the keys of epsilon")
        return provenance


@dataclass(frozen=True)
class Verified:
    """A file that passed :func:`verify_file`: its bytes (parse these, not the file again) and provenance."""

    path: Path
    data: bytes
    provenance: Provenance
    key: str  # fingerprint of the key that signed it


# ---------------------------------------------------------------- keys
def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey) -> str:
    """SHA-256 (hex) of the raw public key."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_pem(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def write_private_key(path: Path, key: Ed25519PrivateKey) -> Path:
    """Write a private key readable by its owner only (mode 0600 from creation on; refuses to overwrite)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem(key))
    os.chmod(path, 0o600)  # whatever the umask
    return path


def read_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PKCS8 PEM file; errors name the file."""
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as error:
        raise SignatureError(f"signing key {path}: cannot read it ({error.strerror})") from None
    except (ValueError, TypeError) as error:
        raise SignatureError(f"signing key {path}: not an unencrypted PEM private key ({error})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path}: a {type(key).__name__}, expected an Ed25519 key")
    return key


class TrustedKeys:
    """The public keys a loader accepts signatures from, by fingerprint; `source` names where they came from."""

    def __init__(self, keys: Iterable[Ed25519PublicKey], *, source: str):
        self.source = source
        self._keys: dict[str, Ed25519PublicKey] = {}
        for key in keys:
            self._keys.setdefault(fingerprint(key), key)
        if not self._keys:
            raise SignatureError(f"{source}: no public key to trust")

    @classmethod
    def from_pem(cls, data: bytes, *, source: str) -> TrustedKeys:
        """Every public PEM block of `data` (a key file, or a trusted-keys file of several); all must be Ed25519."""
        blocks = [_PEM_PUBLIC + part for part in data.split(_PEM_PUBLIC)[1:]]
        if not blocks:
            raise SignatureError(f"{source}: no PEM public key in it ('{_PEM_PUBLIC.decode()}')")
        keys = []
        for number, block in enumerate(blocks, 1):
            try:
                key = serialization.load_pem_public_key(block)
            except ValueError as error:
                raise SignatureError(f"{source}: public key {number} is unreadable ({error})") from None
            if not isinstance(key, Ed25519PublicKey):
                raise SignatureError(f"{source}: public key {number} is a {type(key).__name__}, expected Ed25519")
            keys.append(key)
        return cls(keys, source=source)

    @classmethod
    def read(cls, path: Path) -> TrustedKeys:
        """The keys of a public-key or trusted-keys file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise SignatureError(f"public key file {path}: cannot read it ({error.strerror})") from None
        return cls.from_pem(data, source=str(path))

    def __contains__(self, key_fingerprint: str) -> bool:
        return key_fingerprint in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def fingerprints(self) -> tuple[str, ...]:
        return tuple(self._keys)

    def get(self, key_fingerprint: str) -> Ed25519PublicKey | None:
        return self._keys.get(key_fingerprint)

    def to_pem(self) -> bytes:
        return b"".join(public_pem(k) for k in self._keys.values())

    def with_keys(self, keys: Iterable[Ed25519PublicKey]) -> TrustedKeys:
        return TrustedKeys([*self._keys.values(), *keys], source=self.source)


# ---------------------------------------------------------------- provenance parts
def config_hash(config: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a resolved run config's canonical JSON (kebab-case keys, sorted)."""
    return hashlib.sha256(_canonical(dict(config))).hexdigest()


def code_version() -> dict[str, str | None]:
    """The installed ``mammo-fl`` version and, where this code is a git checkout, its commit."""
    try:
        version = importlib.metadata.version("mammo-fl")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        done = subprocess.run(["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "HEAD"],
                              capture_output=True, text=True, timeout=5, check=False)
        commit = done.stdout.strip() if done.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"mammo-fl": version, "git": commit or None}


def epsilon_by_hospital(privacy: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """hospital -> epsilon from a run's privacy section (``metrics.json`` / checkpoint meta)."""
    out: dict[str, float | None] = {}
    for hospital, entry in privacy.items():
        value = entry.get("epsilon") if isinstance(entry, Mapping) else None
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        out[str(hospital)] = float(value) if number else None
    return out


# ---------------------------------------------------------------- signing
@dataclass(frozen=True)
class Signer:
    """The coordinator's key plus what every provenance of its run shares (config hash, code version)."""

    key: Ed25519PrivateKey
    config_hash: str
    code_version: dict[str, str | None] = field(default_factory=code_version)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.key)

    def provenance(self, *, kind: str, round: int, epsilon: Mapping[str, float | None]) -> Provenance:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        return Provenance(kind=kind, round=int(round), epsilon=dict(sorted(epsilon.items())),
                          code_version=dict(self.code_version), config_hash=self.config_hash,
                          signed_at=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))

    def sign_bytes(self, path: Path, data: bytes, *, kind: str, round: int,
                   epsilon: Mapping[str, float | None]) -> Path:
        """Write ``path.sig`` for `data`, the bytes `path` holds (or is about to hold); returns the .sig path."""
        return write_signature(path, data, self.key, self.provenance(kind=kind, round=round, epsilon=epsilon))

    def for_file(self, *, kind: str, round: int,
                 epsilon: Mapping[str, float | None]) -> Callable[[Path, bytes], Path]:
        """``sign_bytes`` with the provenance fixed: the `sign` hook of ``common.bundle.save_bundle``."""
        return lambda path, data: self.sign_bytes(path, data, kind=kind, round=round, epsilon=epsilon)


def signature_path(path: Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIGNATURE_SUFFIX)


def write_signature(path: Path, data: bytes, key: Ed25519PrivateKey, provenance: Provenance) -> Path:
    """Sign `data` (the bytes of `path`) with `provenance`; the signature file is written atomically."""
    digest = hashlib.sha256(data).hexdigest()
    document = {"format": FORMAT, "file": Path(path).name, "sha256": digest,
                "provenance": provenance.to_json(), "key": fingerprint(key),
                "signature": base64.b64encode(key.sign(_message(digest, provenance.to_json()))).decode("ascii")}
    target = signature_path(path)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def sign_file(path: Path, key: Ed25519PrivateKey, provenance: Provenance) -> Path:
    """Sign the file as it is on disk."""
    return write_signature(path, Path(path).read_bytes(), key, provenance)


def verify_file(path: Path, trusted: TrustedKeys, *, kind: str | None = None) -> Verified:
    """Read `path` once and check its signature against `trusted`; SignatureError names the file and what failed."""
    path = Path(path)
    sig_path = signature_path(path)
    if trusted is None:
        raise SignatureError(f"{path}: no trusted public key configured to verify it")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SignatureError(f"{path}: cannot read it ({error.strerror})") from None
    if not sig_path.is_file():
        raise SignatureError(f"{path}: unsigned (no signature file {sig_path.name} beside it); only files "
                             f"signed by the coordinator are loaded")
    try:
        document = json.loads(sig_path.read_text())
        recorded = str(document["sha256"])
        provenance_json = document["provenance"]
        provenance = Provenance.from_json(provenance_json)
        signer = str(document["key"])
        signature = base64.b64decode(document["signature"], validate=True)
        if document.get("format") != FORMAT:
            raise ValueError(f"format {document.get('format')!r}, expected {FORMAT!r}")
    except (OSError, KeyError, TypeError, ValueError, binascii.Error, UnicodeDecodeError) as error:
        raise SignatureError(f"{path}: signature file {sig_path.name} is unreadable "
                             f"({type(error).__name__}: {error})") from None
    public = trusted.get(signer)
    if public is None:
        known = ", ".join(f[:16] for f in trusted.fingerprints)
        raise SignatureError(f"{path}: signed by key {signer[:16]}…, which is not a trusted key (trusted: {known} "
                             f"from {trusted.source})")
    actual = hashlib.sha256(data).hexdigest()
    if actual != recorded:
        raise SignatureError(f"{path}: its bytes changed after signing (sha256 {actual[:16]}…, signed "
                             f"{recorded[:16]}…): tampered or damaged")
    try:
        public.verify(signature, _message(recorded, provenance_json))
    except InvalidSignature:
        raise SignatureError(f"{path}: the signature in {sig_path.name} does not match its hash and provenance "
                             f"(the signature file was edited)") from None
    if kind is not None and provenance.kind != kind:
        raise SignatureError(f"{path}: signed as a {provenance.kind}, expected a {kind}")
    return Verified(path=path, data=data, provenance=provenance, key=signer)


def _message(digest: str, provenance: Mapping[str, Any]) -> bytes:
    return FORMAT.encode() + b"\n" + digest.encode() + b"\n" + _canonical(provenance)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False, default=str).encode()
