"""TLS certificates for the SuperLink and key pairs for SuperNode authentication.

Everything is made with `cryptography`; no shell `openssl`. Files written here:

- `ca.crt` / `ca.key`: the federation's own certificate authority (self-signed, EC P-384). The CA key signs the
  SuperLink certificate and nothing else: keep it off the SuperLink host once the certificate is made.
- `server.pem` / `server.key`: the SuperLink's certificate (signed by the CA, `serverAuth`, SANs for localhost,
  127.0.0.1, ::1 and any service names given) and its key. Flower loads them with `--ssl-ca-certfile ca.crt
  --ssl-certfile server.pem --ssl-keyfile server.key`; SuperNodes and the `flwr` CLI trust `ca.crt`.
- `NAME` / `NAME.pub`: a SuperNode's authentication key pair, EC (NIST curve) in OpenSSH format, the only kind
  Flower 1.42 accepts (Ed25519 and PKCS8 PEM keys are refused). The public half is registered at the SuperLink with
  `flwr supernode register NAME.pub`; the private half stays at the hospital.

Private keys are written with mode 0600, every file atomically (temporary file + rename), and an existing file is
never replaced unless `force=True`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_SANS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825
NODE_KEY_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
DEFAULT_NODE_KEY_CURVE = "P-384"

_PRIVATE_MODE = 0o600
_PUBLIC_MODE = 0o644
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_DNS_LABEL_RE = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
# Backdate validity a little so that nodes with slightly slow clocks accept a fresh certificate.
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertPaths:
    """Where `write_certificates` put the files."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyPaths:
    """A SuperNode key pair on disk: `private` stays at the node, `public` is registered at the SuperLink."""

    private: Path
    public: Path


def cert_paths(directory: Path) -> CertPaths:
    """The file names used for the CA and SuperLink certificate in `directory`."""
    directory = Path(directory)
    return CertPaths(
        ca_cert=directory / "ca.crt",
        ca_key=directory / "ca.key",
        server_cert=directory / "server.pem",
        server_key=directory / "server.key",
    )


def make_ca(
    *, common_name: str = "MammoFL federation CA", valid_days: int = CA_VALID_DAYS
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A new CA key (EC P-384) and its self-signed certificate (CA:TRUE, pathlen 0, keyCertSign + cRLSign)."""
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_certificate(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    sans: Sequence[str],
    common_name: str = "MammoFL SuperLink",
    valid_days: int = SERVER_VALID_DAYS,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A SuperLink key (EC P-384) and certificate signed by the CA, valid for the host names / IPs in `sans`."""
    if not sans:
        raise ValueError("a server certificate needs at least one subject alternative name")
    key = ec.generate_private_key(ec.SECP384R1())
    public = key.public_key()
    now = dt.datetime.now(dt.timezone.utc)
    ca_not_after = ca_cert.not_valid_after_utc
    not_after = min(now + dt.timedelta(days=valid_days), ca_not_after)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(parse_sans(sans)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def parse_sans(names: Iterable[str]) -> list[x509.GeneralName]:
    """Turn host names and IP literals into SAN entries (IPs as IPAddress, the rest as DNSName); duplicates dropped."""
    entries: list[x509.GeneralName] = []
    for raw in names:
        name = raw.strip()
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name.strip("[]")))
        except ValueError:
            if not _is_dns_name(name):
                raise ValueError(f"not a host name or IP address: {raw!r}") from None
            entry = x509.DNSName(name.lower())
        if entry not in entries:
            entries.append(entry)
    return entries


def write_certificates(
    directory: Path,
    *,
    extra_sans: Sequence[str] = (),
    force: bool = False,
    ca_valid_days: int = CA_VALID_DAYS,
    server_valid_days: int = SERVER_VALID_DAYS,
) -> CertPaths:
    """Make a CA and a SuperLink certificate in `directory` (created 0700 if missing).

    SANs are `DEFAULT_SANS` plus `extra_sans` (e.g. the compose service name `superlink` or the host's public name).
    Raises FileExistsError naming the files already there unless `force` is set; nothing is written in that case.
    """
    paths = cert_paths(directory)
    targets = [paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key]
    _refuse_existing(targets, force=force)
    sans = [*DEFAULT_SANS, *extra_sans]
    parse_sans(sans)  # validate before generating anything
    ca_key, ca_cert = make_ca(valid_days=ca_valid_days)
    server_key, server_cert = make_server_certificate(
        ca_key, ca_cert, sans=sans, valid_days=server_valid_days
    )
    _ensure_directory(Path(directory))
    _write_atomic(paths.ca_key, _private_pem(ca_key), mode=_PRIVATE_MODE)
    _write_atomic(paths.server_key, _private_pem(server_key), mode=_PRIVATE_MODE)
    _write_atomic(paths.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM), mode=_PUBLIC_MODE)
    _write_atomic(paths.server_cert, server_cert.public_bytes(serialization.Encoding.PEM), mode=_PUBLIC_MODE)
    return paths


def node_key_paths(directory: Path, name: str) -> NodeKeyPaths:
    """The file names of node `name`'s key pair in `directory`; raises ValueError for a name unfit for a file."""
    if not _NAME_RE.match(name):
        raise ValueError(
            f"node name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
        )
    return NodeKeyPaths(private=Path(directory) / name, public=Path(directory) / f"{name}.pub")


def write_node_key_pairs(
    directory: Path, names: Sequence[str], *, curve: str = DEFAULT_NODE_KEY_CURVE, force: bool = False
) -> list[NodeKeyPaths]:
    """Make one SuperNode authentication key pair per name: `directory/NAME` (private, 0600) and `NAME.pub`.

    Both halves are in OpenSSH format (`ecdsa-sha2-nistp384 AAAA... NAME`), as `flwr supernode register` and
    `flower-supernode --auth-supernode-private-key` expect. All names are checked first: a bad or repeated name, or
    an existing file without `force`, raises (ValueError / FileExistsError) before anything is written.
    """
    if curve not in NODE_KEY_CURVES:
        raise ValueError(f"curve {curve!r}: choose one of {', '.join(NODE_KEY_CURVES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"node names must be distinct: {', '.join(names)}")
    all_paths = [node_key_paths(directory, name) for name in names]
    _refuse_existing([p for paths in all_paths for p in (paths.private, paths.public)], force=force)
    _ensure_directory(Path(directory))
    for name, paths in zip(names, all_paths, strict=True):
        key = ec.generate_private_key(NODE_KEY_CURVES[curve]())
        private = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        _write_atomic(paths.private, private, mode=_PRIVATE_MODE)
        _write_atomic(paths.public, public + f" {name}\n".encode(), mode=_PUBLIC_MODE)
    return all_paths


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 fingerprint of a certificate as colon-separated hex, for comparing copies out of band."""
    return ":".join(f"{b:02X}" for b in cert.fingerprint(hashes.SHA256()))


def _is_dns_name(name: str) -> bool:
    if not name or len(name) > 253:
        return False
    labels = name[:-1].split(".") if name.endswith(".") else name.split(".")
    return all(_DNS_LABEL_RE.match(label) for label in labels)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _refuse_existing(paths: Sequence[Path], *, force: bool) -> None:
    if force:
        return
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing:
        raise FileExistsError(
            f"refusing to overwrite {', '.join(existing)} (force=True, or --force on the command line, replaces them)"
        )


def _ensure_directory(directory: Path) -> None:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)


def _write_atomic(path: Path, data: bytes, *, mode: int) -> None:
    """Write `data` to a temporary file beside `path` with `mode`, fsync it, then rename it over `path`."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
