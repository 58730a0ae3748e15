"""Certificates and node keys made by `server.certs` (and the `mammofl-coordinator` commands over it)."""

from __future__ import annotations

import datetime as dt
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from server import certs
from server.cli import app


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def cert_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("certs") / "federation"
    certs.write_certificates(directory, extra_sans=["superlink", "link.example.org", "10.1.2.3"])
    return directory


def test_files_and_permissions(cert_dir):
    paths = certs.cert_paths(cert_dir)
    assert sorted(p.name for p in cert_dir.iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    assert _mode(paths.ca_key) == 0o600
    assert _mode(paths.server_key) == 0o600
    assert _mode(paths.ca_cert) == 0o644
    assert _mode(paths.server_cert) == 0o644
    assert _mode(cert_dir) == 0o700


def test_ca_is_a_self_signed_ca(cert_dir):
    ca = _load(cert_dir / "ca.crt")
    assert ca.issuer == ca.subject
    ca.verify_directly_issued_by(ca)
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is True and constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp384r1"
    key = serialization.load_pem_private_key((cert_dir / "ca.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == ca.public_key().public_numbers()


def test_server_certificate_chain_and_extensions(cert_dir):
    ca = _load(cert_dir / "ca.crt")
    server = _load(cert_dir / "server.pem")
    server.verify_directly_issued_by(ca)  # signature, issuer name and algorithm
    assert server.issuer == ca.subject
    constraints = server.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    usage = server.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "superlink", "link.example.org"]
    assert sans.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    aki = server.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    key = serialization.load_pem_private_key((cert_dir / "server.key").read_bytes(), password=None)
    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_validity_periods(cert_dir):
    now = dt.datetime.now(dt.timezone.utc)
    ca = _load(cert_dir / "ca.crt")
    server = _load(cert_dir / "server.pem")
    assert ca.not_valid_before_utc <= now and server.not_valid_before_utc <= now
    assert abs((server.not_valid_after_utc - now) - dt.timedelta(days=certs.SERVER_VALID_DAYS)) < dt.timedelta(
        minutes=5
    )
    assert abs((ca.not_valid_after_utc - now) - dt.timedelta(days=certs.CA_VALID_DAYS)) < dt.timedelta(minutes=5)
    assert server.not_valid_after_utc <= ca.not_valid_after_utc


def test_python_ssl_accepts_the_chain_strictly(cert_dir):
    """OpenSSL (via the ssl module, strict X.509 checks) loads the pair and trusts the CA."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert_dir / "server.pem", cert_dir / "server.key")
    client_ctx = ssl.create_default_context(cafile=str(cert_dir / "ca.crt"))
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx.load_verify_locations(cafile=str(cert_dir / "ca.crt"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(incoming, outgoing, server_hostname="superlink")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, server):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(outgoing.read())
        incoming.write(s_out.read())
    client.do_handshake()
    assert client.getpeercert()["subject"] == ((("commonName", "MammoFL SuperLink"),),)


def test_refuses_to_overwrite_unless_forced(tmp_path):
    first = certs.write_certificates(tmp_path / "c")
    before = first.ca_cert.read_bytes()
    with pytest.raises(FileExistsError, match="ca.crt"):
        certs.write_certificates(tmp_path / "c")
    assert first.ca_cert.read_bytes() == before
    certs.write_certificates(tmp_path / "c", force=True)
    assert first.ca_cert.read_bytes() != before
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]


def test_one_existing_file_blocks_the_whole_set(tmp_path):
    (tmp_path / "server.key").write_text("keep me")
    with pytest.raises(FileExistsError, match="server.key"):
        certs.write_certificates(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]
    assert (tmp_path / "server.key").read_text() == "keep me"


@pytest.mark.parametrize("bad", ["has space", "under_score.example", "-lead", "", "a..b"])
def test_bad_san_is_refused_before_writing(tmp_path, bad):
    with pytest.raises(ValueError, match="not a host name or IP"):
        certs.write_certificates(tmp_path / "c", extra_sans=[bad])
    assert not (tmp_path / "c").exists()


def test_node_key_pairs_are_openssh_ec(tmp_path):
    made = certs.write_node_key_pairs(tmp_path / "keys", ["hospital-a", "hospital-b"])
    assert [p.private.name for p in made] == ["hospital-a", "hospital-b"]
    for paths in made:
        assert _mode(paths.private) == 0o600
        assert _mode(paths.public) == 0o644
        private_bytes = paths.private.read_bytes()
        assert private_bytes.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----\n")
        private = serialization.load_ssh_private_key(private_bytes, password=None)
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert private.curve.name == "secp384r1"
        public_text = paths.public.read_text()
        assert public_text.startswith("ecdsa-sha2-nistp384 ")
        assert public_text.endswith(f" {paths.private.name}\n")
        public = serialization.load_ssh_public_key(public_text.encode())
        assert public.public_numbers() == private.public_key().public_numbers()
        # the proof a SuperNode gives: a signature by the private key the registered public key verifies
        signature = private.sign(b"challenge", ec.ECDSA(hashes.SHA256()))
        public.verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))
    assert made[0].public.read_bytes() != made[1].public.read_bytes()


def test_node_keys_curve_choice_and_refusals(tmp_path):
    (paths,) = certs.write_node_key_pairs(tmp_path, ["n1"], curve="P-256")
    assert paths.public.read_text().startswith("ecdsa-sha2-nistp256 ")
    with pytest.raises(FileExistsError, match="n1"):
        certs.write_node_key_pairs(tmp_path, ["n2", "n1"])
    assert not (tmp_path / "n2").exists()  # checked before anything is written
    with pytest.raises(ValueError, match="curve"):
        certs.write_node_key_pairs(tmp_path, ["n3"], curve="ed25519")
    with pytest.raises(ValueError, match="node name"):
        certs.write_node_key_pairs(tmp_path, ["../escape"])
    with pytest.raises(ValueError, match="distinct"):
        certs.write_node_key_pairs(tmp_path, ["n4", "n4"])
    old = paths.private.read_bytes()
    certs.write_node_key_pairs(tmp_path, ["n1"], force=True)
    assert paths.private.read_bytes() != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["n1", "n1.pub"]  # no temporary files left


def test_cli_certs_and_node_keys(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["certs", str(tmp_path / "c"), "--san", "superlink", "--san", "192.168.7.7"])
    assert result.exit_code == 0, result.output
    assert "superlink" in result.output and "192.168.7.7" in result.output
    server = _load(tmp_path / "c" / "server.pem")
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "superlink" in sans.get_values_for_type(x509.DNSName)
    again = runner.invoke(app, ["certs", str(tmp_path / "c")])
    assert again.exit_code == 1
    assert "refusing to overwrite" in again.output
    assert runner.invoke(app, ["certs", str(tmp_path / "c"), "--force"]).exit_code == 0

    result = runner.invoke(app, ["node-keys", str(tmp_path / "k"), "hospital-a", "hospital-b", "hospital-c"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == [
        "hospital-a", "hospital-a.pub", "hospital-b", "hospital-b.pub", "hospital-c", "hospital-c.pub",
    ]
    again = runner.invoke(app, ["node-keys", str(tmp_path / "k"), "hospital-a"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
