"""Signed bundles and checkpoints: a round trip verifies; byte flips, metadata edits, a lowered epsilon re-saved,
an edited signature, another key's signature and unsigned files are refused by every loader; key rotation keeps
old files verifiable only while the old key stays trusted."""

from __future__ import annotations

import json
import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from client.cli import app as hospital_app
from common.bundle import BundleError, BundleMeta, load_bundle, save_bundle
from common.inference import Predictor
from common.models import ModelConfig, build_model
from common.preprocessing import PreprocessConfig
from common.run_config import RunConfig
from common.signing import (
    SignatureError,
    Signer,
    TrustedKeys,
    config_hash,
    fingerprint,
    generate_key,
    signature_path,
    verify_file,
)
from common.weights import exchanged_weights
from server.checkpoints import Checkpoint, CheckpointStore
from server.cli import app as coordinator_app
from server.signing_keys import (
    generate_key_directory,
    load_signing_key,
    rotate_key_directory,
    run_signing,
    trusted_keys_for,
)
from signed_files import KEY, SIGNER, TRUSTED

CONFIG = ModelConfig(kind="cnn", image_size=64)


def _bundle(path: Path, *, signer: Signer = SIGNER, epsilon: dict | None = None) -> Path:
    torch.manual_seed(0)
    meta = BundleMeta(model_config=CONFIG, preprocess_config=PreprocessConfig(size=64), info={"round": 2})
    return save_bundle(path, exchanged_weights(build_model(CONFIG)), meta,
                       sign=signer.for_file(kind="bundle", round=2, epsilon=epsilon or {"partition-0": 3.5}))


def _flip_byte(path: Path) -> Path:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return path


def _edit_metadata(path: Path) -> Path:
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["meta"])
    meta["info"]["operating_point"] = {"threshold": 0.99}
    payload["meta"] = json.dumps(meta)
    torch.save(payload, path)
    return path


def _edit_signature(path: Path) -> Path:
    sig = signature_path(path)
    document = json.loads(sig.read_text())
    document["provenance"]["epsilon"]["partition-0"] = 0.1
    sig.write_text(json.dumps(document))
    return path


def _other_key(path: Path) -> Path:
    Signer(key=generate_key(), config_hash="0" * 64).sign_bytes(path, path.read_bytes(), kind="bundle", round=2,
                                                                 epsilon={"partition-0": 3.5})
    return path


def _unsigned(path: Path) -> Path:
    signature_path(path).unlink()
    return path


#: tamper case -> (how, what the error says)
TAMPERS = {
    "byte flip": (_flip_byte, "bytes changed after signing"),
    "metadata edit": (_edit_metadata, "bytes changed after signing"),
    "signature edited (epsilon lowered)": (_edit_signature, "does not match its hash and provenance"),
    "signed by another key": (_other_key, "which is not a trusted key"),
    "unsigned": (_unsigned, "unsigned (no signature file model.mammofl.sig"),
}


def test_round_trip_verifies_and_carries_the_provenance(tmp_path):
    path = _bundle(tmp_path / "model.mammofl", epsilon={"partition-1": 2.0, "partition-0": 3.5})
    verified = verify_file(path, TRUSTED, kind="bundle")
    assert verified.data == path.read_bytes() and verified.key == fingerprint(KEY)
    provenance = verified.provenance
    assert (provenance.kind, provenance.round, provenance.hospitals) == ("bundle", 2, ("partition-0", "partition-1"))
    assert provenance.epsilon == {"partition-0": 3.5, "partition-1": 2.0}
    assert provenance.config_hash == "0" * 64 and provenance.code_version == {"mammo-fl": "test", "git": None}
    document = json.loads(signature_path(path).read_text())
    assert document["format"] == "mammofl-signature/1" and document["file"] == "model.mammofl"
    _, meta = load_bundle(path, trusted=TRUSTED)
    assert meta.provenance == provenance and meta.info == {"round": 2}
    with pytest.raises(SignatureError, match="signed as a bundle, expected a checkpoint"):
        verify_file(path, TRUSTED, kind="checkpoint")


def test_config_hash_is_canonical():
    assert config_hash({"b": 1, "a": "x"}) == config_hash({"a": "x", "b": 1})
    assert config_hash({"a": 1}) != config_hash({"a": 2})


@pytest.mark.parametrize("case", list(TAMPERS))
def test_each_bundle_loader_refuses_a_tampered_bundle(tmp_path, case):
    tamper, message = TAMPERS[case]
    path = tamper(_bundle(tmp_path / "model.mammofl"))
    with pytest.raises(BundleError) as load_error:
        load_bundle(path, trusted=TRUSTED)
    assert str(load_error.value).startswith(str(path)) and message in str(load_error.value)
    with pytest.raises(BundleError, match=message.replace("(", r"\(")):
        Predictor.from_bundle(path, trusted=TRUSTED)
    public = tmp_path / "trusted.pub"
    public.write_bytes(TRUSTED.to_pem())
    image = tmp_path / "image.png"
    image.write_bytes(b"")
    result = CliRunner().invoke(hospital_app, ["screen", "--model", str(path), "--public-key", str(public),
                                               str(image), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "cannot use the model" in result.stderr and message in " ".join(result.stderr.split())
    assert not (tmp_path / "out").exists()


def test_gallery_refuses_a_tampered_bundle(tmp_path):
    from simulations.gallery import write_gallery

    run = RunConfig(model="cnn", image_size=64)
    run_dir = tmp_path / "run"
    signing = run_signing(run, run_dir)  # the key a simulation makes for itself, in run_dir/signing
    bundle = _bundle(run_dir / "model.mammofl", signer=signing.signer)
    _flip_byte(bundle)
    with pytest.raises(BundleError, match="bytes changed after signing"):
        write_gallery(run_dir, run, bundle)
    assert not (run_dir / "gallery").exists()


def test_screen_cli_needs_a_readable_public_key(tmp_path):
    path = _bundle(tmp_path / "model.mammofl")
    bad = tmp_path / "bad.pub"
    bad.write_text("not a key")
    for key, message in ((bad, "no PEM public key"), (tmp_path / "none.pub", "cannot read it")):
        result = CliRunner().invoke(hospital_app, ["screen", "--model", str(path), "--public-key", str(key),
                                                   str(path), "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and message in result.stderr
    missing = CliRunner().invoke(hospital_app, ["screen", "--model", str(path), str(path), "--out", "o"])
    assert missing.exit_code == 2 and "--public-key" in missing.output


# ---------------------------------------------------------------- checkpoints and resume
def _checkpoint(epsilon: float) -> Checkpoint:
    return Checkpoint(round=2, arrays={"w": np.arange(6, dtype=np.float32).reshape(2, 3)},
                      meta={"privacy": {"partition-0": {"epsilon": epsilon, "delta": 1e-5}}})


def test_checkpoint_round_trip_and_a_lowered_epsilon_re_saved_is_refused(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", signer=SIGNER, trusted=TRUSTED)
    path = store.save(_checkpoint(7.5))
    loaded = store.load(2)
    assert loaded.meta["privacy"]["partition-0"]["epsilon"] == 7.5
    assert verify_file(path, TRUSTED).provenance.epsilon == {"partition-0": 7.5}
    CheckpointStore(tmp_path / "checkpoints").save(_checkpoint(1.0))  # re-saved by hand, lower epsilon
    with pytest.raises(SignatureError, match=f"{path}: its bytes changed after signing"):
        store.load(2)
    other = Signer(key=generate_key(), config_hash="0" * 64)
    CheckpointStore(tmp_path / "checkpoints", signer=other).save(_checkpoint(1.0))  # re-signed with a foreign key
    with pytest.raises(SignatureError, match="which is not a trusted key"):
        store.latest()
    with pytest.raises(SignatureError, match="no trusted public key configured"):
        CheckpointStore(tmp_path / "checkpoints").load(2)
    renamed = CheckpointStore(tmp_path / "renamed", signer=SIGNER, trusted=TRUSTED)
    renamed.save(_checkpoint(7.5))
    renamed.path_for(2).rename(renamed.path_for(5))
    signature_path(renamed.path_for(2)).rename(signature_path(renamed.path_for(5)))
    with pytest.raises(SignatureError, match="signed as round 2, found as round 5"):
        renamed.load(5)


def test_resume_refuses_a_checkpoint_re_saved_with_a_lower_epsilon(tmp_path):
    from server.app import open_run_directory, run_federation

    config = RunConfig(model="cnn", image_size=64, run_dir=str(tmp_path / "run"), sim_data_dir=str(tmp_path))
    run = open_run_directory(config)
    run.checkpoints.save(_checkpoint(7.5))
    assert (run.path / "checkpoints" / "round-0002.npz.sig").is_file()
    assert run.document["signing"]["generated"] is True
    CheckpointStore(run.path / "checkpoints").save(_checkpoint(1.0))
    resumed = config.updated(run_dir="", resume=str(run.path))
    with pytest.raises(SignatureError, match="round-0002.npz: its bytes changed after signing"):
        run_federation(None, resumed)  # fails at the checkpoint, before any node is asked for anything
    document = json.loads((run.path / "metrics.json").read_text())
    assert document["status"] == "failed" and "bytes changed after signing" in document["error"]


def test_a_deployed_coordinator_without_signing_key_is_warned(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="server.signing_keys"):
        signing = run_signing(RunConfig(), tmp_path / "run")
    assert signing.generated and "run config 'signing-key' is empty" in caplog.text
    assert "mammofl-coordinator signing-key generate" in caplog.text
    with caplog.at_level(logging.WARNING, logger="server.signing_keys"):
        caplog.clear()
        again = run_signing(RunConfig(), tmp_path / "run")  # a resume reuses the run's key
    assert again.signer.fingerprint == signing.signer.fingerprint
    with pytest.raises(SignatureError, match="run config 'signing-key': no such file"):
        run_signing(RunConfig(signing_key=str(tmp_path / "none.key")), tmp_path / "run2")


# ---------------------------------------------------------------- key generation and rotation
def test_generate_and_rotate_keep_old_bundles_verifiable_while_trusted(tmp_path):
    paths = generate_key_directory(tmp_path / "keys")
    assert stat.S_IMODE(paths.private.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError, match="signing.key exists"):
        generate_key_directory(tmp_path / "keys")
    config = RunConfig(signing_key=str(paths.private))
    old = _bundle(tmp_path / "old.mammofl", signer=run_signing(config, tmp_path / "run").signer)
    old_fingerprint = fingerprint(load_signing_key(paths.private))

    rotation = rotate_key_directory(paths.directory)
    assert rotation.old == old_fingerprint and rotation.new != rotation.old
    assert set(rotation.trusted) == {rotation.old, rotation.new}
    assert stat.S_IMODE(paths.private.stat().st_mode) == 0o600
    assert TrustedKeys.read(paths.public).fingerprints == (rotation.new,)
    new = _bundle(tmp_path / "new.mammofl", signer=run_signing(config, tmp_path / "run").signer)
    hospital = TrustedKeys.read(paths.trusted)  # what a hospital is given after the rotation
    assert verify_file(old, hospital).key == rotation.old
    assert verify_file(new, hospital).key == rotation.new
    assert set(trusted_keys_for(paths.private).fingerprints) == set(rotation.trusted)
    with pytest.raises(SignatureError, match="which is not a trusted key"):
        verify_file(old, TrustedKeys.read(paths.public))  # the old key alone is not trusted by the new public key

    revoked = rotate_key_directory(paths.directory, revoke_old=True)
    assert revoked.old == rotation.new and set(revoked.trusted) == {revoked.new, rotation.old}
    with pytest.raises(BundleError, match="which is not a trusted key"):
        load_bundle(new, trusted=TrustedKeys.read(paths.trusted))


def test_coordinator_cli_generates_and_rotates(tmp_path):
    runner = CliRunner()
    made = runner.invoke(coordinator_app, ["signing-key", "generate", "--out", str(tmp_path / "keys")])
    assert made.exit_code == 0, made.output
    private = tmp_path / "keys" / "signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and "trusted.pub" in made.output
    first = TrustedKeys.read(tmp_path / "keys" / "signing.pub").fingerprints[0]
    assert f"fingerprint   {first}" in made.output
    again = runner.invoke(coordinator_app, ["signing-key", "generate", "--out", str(tmp_path / "keys")])
    assert again.exit_code == 1 and "signing.key exists" in again.output
    rotated = runner.invoke(coordinator_app, ["signing-key", "rotate", str(tmp_path / "keys")])
    assert rotated.exit_code == 0, rotated.output
    assert f"old key       {first}  (still trusted" in rotated.output
    assert len(TrustedKeys.read(tmp_path / "keys" / "trusted.pub")) == 2
    missing = runner.invoke(coordinator_app, ["signing-key", "rotate", str(tmp_path / "none")])
    assert missing.exit_code == 1 and "cannot read it" in missing.output


def test_trusted_keys_file_is_checked():
    with pytest.raises(SignatureError, match="x.pub: no PEM public key"):
        TrustedKeys.from_pem(b"", source="x.pub")
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives import serialization

    ec_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(SignatureError, match="public key 2 is a .*, expected Ed25519"):
        TrustedKeys.from_pem(TRUSTED.to_pem() + ec_key, source="x.pub")
