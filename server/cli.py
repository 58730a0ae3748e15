"""`mammofl-coordinator`: the coordinator's command line (a thin layer over `server.certs` and
`server.signing_keys`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from rich.console import Console
from rich.markup import escape

from common.signing import SignatureError, fingerprint
from server import certs, signing_keys

app = typer.Typer(
    name="mammofl-coordinator",
    help="Coordinate a MammoFL federation: certificates, node keys, model signing keys, runs.",
    no_args_is_help=True,
    add_completion=False,
)
_console = Console(soft_wrap=True, highlight=False, markup=False)
_errors = Console(stderr=True, soft_wrap=True, highlight=False)


@app.callback()
def _main() -> None:
    """Coordinate a MammoFL federation: certificates, node keys, model signing keys, runs."""


@app.command("certs")
def certs_command(
    directory: Annotated[Path, typer.Argument(help="Folder for ca.crt, ca.key, server.pem, server.key.")],
    san: Annotated[
        list[str] | None,
        typer.Option(
            "--san",
            help="Extra host name or IP the SuperLink is reached at (repeatable), e.g. superlink or link.example.org.",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
    server_days: Annotated[
        int, typer.Option("--server-days", min=1, help="Validity of the SuperLink certificate in days.")
    ] = certs.SERVER_VALID_DAYS,
    ca_days: Annotated[int, typer.Option("--ca-days", min=1, help="Validity of the CA in days.")] = certs.CA_VALID_DAYS,
) -> None:
    """Make the federation CA and the SuperLink TLS certificate."""
    try:
        paths = certs.write_certificates(
            directory, extra_sans=san or (), force=force, ca_valid_days=ca_days, server_valid_days=server_days
        )
    except (FileExistsError, ValueError) as err:
        _errors.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from err
    server_cert = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    ca_cert = x509.load_pem_x509_certificate(paths.ca_cert.read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    shown = [str(n.value) for n in names]
    _console.print(f"CA certificate      {paths.ca_cert}  (give to every hospital and to flwr CLI users)")
    _console.print(f"CA key              {paths.ca_key}  (keep offline; not needed by the SuperLink)")
    _console.print(f"SuperLink cert/key  {paths.server_cert}, {paths.server_key}")
    _console.print(f"SuperLink names     {', '.join(shown)}")
    _console.print(f"CA SHA-256          {certs.fingerprint(ca_cert)}")


@app.command("node-keys")
def node_keys_command(
    directory: Annotated[Path, typer.Argument(help="Folder for the key pairs.")],
    names: Annotated[list[str], typer.Argument(help="One name per hospital node, e.g. hospital-a.")],
    curve: Annotated[
        str, typer.Option("--curve", help=f"EC curve: {', '.join(certs.NODE_KEY_CURVES)}.")
    ] = certs.DEFAULT_NODE_KEY_CURVE,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Make SuperNode authentication key pairs (OpenSSH EC keys): NAME stays at the hospital, NAME.pub is registered."""
    try:
        made = certs.write_node_key_pairs(directory, names, curve=curve, force=force)
    except (FileExistsError, ValueError) as err:
        _errors.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from err
    for paths in made:
        _console.print(f"{paths.private.name:<20} private {paths.private}  public {paths.public}")
    _console.print("Register each public key with: flwr supernode register NAME.pub CONNECTION")


signing_key_app = typer.Typer(help="The Ed25519 key that signs released models and checkpoints.",
                              no_args_is_help=True)
app.add_typer(signing_key_app, name="signing-key")


@signing_key_app.command("generate")
def signing_key_generate(
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Folder for signing.key, signing.pub, "
                                                                   "trusted.pub.")],
    force: Annotated[bool, typer.Option("--force", help="Replace an existing key (what it signed is then "
                                                        "refused).")] = False,
) -> None:
    """Make the coordinator's signing key: signing.key (mode 0600) stays here, trusted.pub goes to hospitals."""
    try:
        paths = signing_keys.generate_key_directory(out, force=force)
        key = signing_keys.load_signing_key(paths.private)
    except (FileExistsError, SignatureError, OSError) as err:
        _errors.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from err
    _console.print(f"private key   {paths.private}  (mode 600; keep on the coordinator, never share)")
    _console.print(f"public key    {paths.public}")
    _console.print(f"trusted keys  {paths.trusted}  (give to every hospital: screen --public-key)")
    _console.print(f"fingerprint   {fingerprint(key)}")
    _console.print(f"Sign runs with: flwr run ... --run-config \"signing-key='{paths.private}'\"")


@signing_key_app.command("rotate")
def signing_key_rotate(
    directory: Annotated[Path, typer.Argument(help="Key folder made by 'signing-key generate'.")],
    revoke_old: Annotated[bool, typer.Option("--revoke-old", help="Stop trusting the old key (after a leak): "
                                                                  "what it signed is then refused.")] = False,
) -> None:
    """Replace the signing key; old models still verify with the new trusted.pub unless --revoke-old.

    The old private key is deleted; hospitals need the new trusted.pub.
    """
    try:
        rotation = signing_keys.rotate_key_directory(directory, revoke_old=revoke_old)
    except (SignatureError, OSError) as err:
        _errors.print(f"[red]error:[/red] {escape(str(err))}")
        raise typer.Exit(1) from err
    _console.print(f"old key       {rotation.old}  ({'revoked' if revoke_old else 'still trusted'}; its private "
                   f"key is deleted)")
    _console.print(f"new key       {rotation.new}")
    _console.print(f"trusted keys  {rotation.paths.trusted}: {len(rotation.trusted)} key(s); give it to every "
                   f"hospital")


if __name__ == "__main__":
    app()


@app.command("run")
def run_command(
    app_dir: Annotated[Path, typer.Argument(help="the MammoFL app folder (with pyproject.toml)")],
    connection: Annotated[str, typer.Argument(help="SuperLink connection name in $FLWR_HOME/config.toml")],
    run_config: Annotated[list[str] | None, typer.Option(
        "--run-config", help="run config overrides, as for flwr run (repeatable)")] = None,
    federation_config: Annotated[list[str] | None, typer.Option(
        "--federation-config", help="federation config overrides, as for flwr run (repeatable)")] = None,
    wait: Annotated[float, typer.Option(help="seconds to wait for the final status after the logs end")] = 120.0,
) -> None:
    """Start a run, stream its logs, and exit with its outcome: 0 completed, 1 failed, 2 stopped, 3 unknown.

    (`flwr run --stream` alone exits 0 even when the run failed.)"""
    from server.flower_run import FlowerCliError, follow_run

    try:
        outcome = follow_run(app_dir, connection, run_config=run_config or (),
                             federation_config=federation_config or (), wait_s=wait)
    except FlowerCliError as error:
        _errors.print(f"error: {escape(str(error))}")
        raise typer.Exit(1) from None
    status = outcome.status or "unknown"
    line = f"run {outcome.run_id}: {status}" + (f": {outcome.details}" if outcome.exit_status else "")
    (_errors if outcome.exit_status else _console).print(line, markup=False)
    raise typer.Exit(outcome.exit_status)
