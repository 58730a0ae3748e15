"""`mammofl-hospital`: the hospital's command line. Thin: each command calls a plain function and prints.

Exit codes: 0 the command ran (a data check or a screening with skipped files included), 2 bad input (missing
folder or file, bad manifest or Info.txt, a model bundle this version cannot use, a non-empty output folder).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from client.dataset_scan import ScanReport, scan_folder
from client.readers.base import MAX_IMAGE_BYTES
from client.readers.manifest import ManifestError
from client.readers.mias import MiasError

app = typer.Typer(
    name="mammofl-hospital",
    help="MammoFL for hospitals: check data, run a node, watch the privacy budget, screen images.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_BAD_INPUT = 2


@app.callback()
def main() -> None:
    """MammoFL for hospitals: check data, run a node, watch the privacy budget, screen images."""


@app.command("check-data")
def check_data(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Folder of DICOM/PNG/PGM files or mini-MIAS.")],
    manifest: Annotated[
        Path | None, typer.Option("--manifest", metavar="CSV", help="file,label,patient_id[,...] manifest.")
    ] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON report on stdout.")] = False,
    max_image_mb: Annotated[
        float, typer.Option("--max-image-mb", min=0.001, metavar="MB",
                            help="Skip images whose header declares more pixel data than this (MiB), undecoded.")
    ] = MAX_IMAGE_BYTES / 2**20,
) -> None:
    """Scan DIR: images usable, files skipped and why, classes, patients, views, bit depths."""
    errors = Console(stderr=True)
    try:
        # Libraries must not write into the JSON: anything they print goes to stderr while scanning.
        with contextlib.redirect_stdout(sys.stderr):
            report = scan_folder(folder, manifest, max_image_bytes=int(max_image_mb * 2**20))
    except (FileNotFoundError, ManifestError, MiasError) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if json_output:
        sys.stdout.write(report.to_json() + "\n")
    else:
        print_summary(report, Console())


def print_summary(report: ScanReport, console: Console) -> None:
    """The readable form of a scan report."""
    summary = report.to_dict()
    title = "mini-MIAS" if report.dataset == "mini-mias" else "folder"
    console.print(f"[bold]{title}[/] {report.folder}" + (f"  manifest {report.manifest}" if report.manifest else ""))
    console.print(
        f"images ok: [bold green]{report.n_ok}[/] of {report.n_files} files, "
        f"skipped: [bold {'yellow' if report.skipped else 'green'}]{len(report.skipped)}[/]"
    )
    patients = summary["n_patients"]
    console.print(f"patients: {patients if patients is not None else 'unknown (no manifest)'}")
    counts = Table(title="usable images", show_header=True)
    counts.add_column("")
    counts.add_column("values")
    for key in ("class_counts", "views", "lateralities", "bit_depths", "formats", "background_tissue"):
        if summary[key]:
            counts.add_row(key.replace("_", " "), ", ".join(f"{k}: {v}" for k, v in summary[key].items()))
    counts.add_row("lesion circles", f"{summary['n_lesion_circles']} on {summary['n_images_with_lesions']} images")
    console.print(counts)
    if report.skipped:
        skipped = Table(title="skipped files", show_header=True)
        skipped.add_column("reason", overflow="fold")
        skipped.add_column("n", justify="right")
        skipped.add_column("files", overflow="fold")
        by_reason: dict[str, list[str]] = {}
        for item in report.skipped:
            by_reason.setdefault(item.reason, []).append(item.file)
        for reason, files in sorted(by_reason.items(), key=lambda pair: -len(pair[1])):
            shown = ", ".join(files[:5]) + (f", ... (+{len(files) - 5})" if len(files) > 5 else "")
            skipped.add_row(reason, str(len(files)), shown)
        console.print(skipped)
    for item in report.missing_files:
        console.print(f"[yellow]listed but missing:[/] {item.file}: {item.reason}", highlight=False)
    if report.metadata_files:
        console.print(f"metadata files: {', '.join(report.metadata_files)}", highlight=False)


@app.command("ledger")
def ledger_command(
    state_dir: Annotated[Path, typer.Option("--state-dir", metavar="DIR", help="The node's state-dir.")],
    json_output: Annotated[bool, typer.Option("--json", help="Print only JSON on stdout.")] = False,
    max_epsilon: Annotated[
        float | None, typer.Option("--max-epsilon", min=0.0, help="The node's budget: show what is left of it.")
    ] = None,
    delta: Annotated[
        float | None, typer.Option("--delta", help="Delta of every epsilon shown (default: the latest entry's).")
    ] = None,
) -> None:
    """Privacy releases this node recorded: per round its DP-SGD steps and the epsilon spent up to it; totals."""
    # imported here: the ledger computes epsilon with Opacus, which loads torch
    from client.privacy_ledger import LEDGER_FILE_NAME, LedgerError, PrivacyLedger, ledger_statement

    errors = Console(stderr=True)
    try:
        if not state_dir.is_dir():
            raise FileNotFoundError(f"{state_dir}: no such state-dir")
        if delta is not None and not 0 < delta < 1:
            raise ValueError(f"--delta must be in (0, 1), got {delta:g}")
        statement = ledger_statement(PrivacyLedger(state_dir / LEDGER_FILE_NAME), delta=delta,
                                     max_epsilon=max_epsilon)
    except (FileNotFoundError, ValueError, LedgerError) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if json_output:
        sys.stdout.write(json.dumps(statement, indent=2) + "\n")
    else:
        print_ledger(statement, Console())


def print_ledger(statement: dict, console: Console) -> None:
    """The readable form of a ledger statement (`client.privacy_ledger.ledger_statement`)."""
    console.print(f"[bold]privacy ledger[/] {escape(statement['ledger'])}", highlight=False)
    if not statement["releases"] and not statement["totals"]["steps"]:
        console.print("no releases recorded: nothing spent")
    both = statement["distributed"]
    delta = statement["delta"]
    if statement["releases"]:
        table = Table(title=f"releases (epsilon at delta {delta:g}, accountant {statement['mechanism']})")
        for name in ("time", "run", "round", "steps", "sample rate", "noise"):
            table.add_column(name, justify="left" if name in ("time", "run") else "right")
        if both:
            table.add_column("noise of sum", justify="right")
        table.add_column("epsilon (own noise)" if both else "epsilon", justify="right")
        if both:
            table.add_column("epsilon (sum)", justify="right")
        for release in statement["releases"]:
            round_ = release["server_round"]
            row = [release["time"] or "", escape(str(release["run_id"] or "")), "" if round_ is None else str(round_),
                   str(release["steps"]), f"{release['sample_rate']:.4g}", f"{release['noise_multiplier']:.4g}"]
            if both:
                row.append(f"{release['aggregate_noise_multiplier']:.4g}")
            row.append(f"{release['epsilon']:.3f}")
            if both:
                row.append(f"{release['epsilon_aggregate']:.3f}")
            table.add_row(*row)
        console.print(table)
    totals = statement["totals"]
    line = f"total: {totals['releases']} releases, {totals['steps']} steps"
    if delta is not None:
        line += f", epsilon {totals['epsilon']:.3f}"
        if both:
            line += f" (own noise), {totals['epsilon_aggregate']:.3f} (sum)"
        line += f" at delta {delta:g}"
    console.print(line, highlight=False)
    if totals["unlisted_steps"]:
        console.print(f"[yellow]{totals['unlisted_steps']} steps in the history have no entry[/] "
                      "(recorded by an older version)", highlight=False)
    budget = statement["budget"]
    if budget is not None:
        line = f"budget: max-epsilon {budget['max_epsilon']:g}, left {budget['remaining']:.3f}"
        if both:
            line += f" (own noise), {budget['remaining_aggregate']:.3f} (sum)"
        console.print(line, highlight=False)


@app.command("screen")
def screen_command(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="DICOM/PNG/PGM files or folders.")],
    model: Annotated[Path, typer.Option("--model", metavar="BUNDLE", help="Released model bundle.")],
    public_key: Annotated[Path, typer.Option(
        "--public-key", metavar="PEM",
        help="The coordinator's trusted public key(s) (trusted.pub): the model must carry a valid signature from "
             "one of them (MODEL.sig beside it).")],
    out: Annotated[Path, typer.Option("--out", metavar="DIR", help="Output folder (created).")],
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON summary on stdout.")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per model call.")] = 8,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output folder.")] = False,
    heatmaps: Annotated[bool, typer.Option("--heatmaps/--no-heatmaps", help="Draw one overlay per image.")] = True,
) -> None:
    """Screen images with a model: predictions.csv, heatmaps/ and report.html in DIR (files stay here)."""
    # imported here: they load torch, which `check-data` does not need
    from client.screening import OutputExists, check_output, count_files, missing_inputs, screen
    from common.bundle import BundleError
    from common.inference import Predictor
    from common.signing import SignatureError, TrustedKeys

    errors = Console(stderr=True)

    def fail(message: str) -> None:
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT)

    missing = missing_inputs(inputs)
    if missing:
        fail("no such file or folder: " + ", ".join(str(p) for p in missing))
    if not model.is_file():
        fail(f"{model}: no such model bundle")
    try:
        check_output(out, overwrite)
    except OutputExists as exc:
        fail(str(exc))
    try:
        trusted = TrustedKeys.read(public_key)
    except SignatureError as exc:
        fail(str(exc))
    try:
        with contextlib.redirect_stdout(sys.stderr):
            predictor = Predictor.from_bundle(model, trusted=trusted)
    except BundleError as exc:
        fail(f"cannot use the model: {exc}")
    provenance = predictor.meta.provenance
    errors.print(f"model signature verified ({public_key.name}): round {provenance.round}, "
                 f"{len(provenance.hospitals)} hospital(s), signed {provenance.signed_at}", highlight=False,
                 soft_wrap=True)
    with Progress(TextColumn("screening"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=errors, transient=json_output) as progress:
        task = progress.add_task("screen", total=count_files(inputs))
        try:
            with contextlib.redirect_stdout(sys.stderr):
                summary = screen(predictor, inputs, out, batch_size=batch_size, heatmaps=heatmaps,
                                 overwrite=overwrite, progress=lambda n: progress.advance(task, n),
                                 model_name=model.name)
        except (OutputExists, FileNotFoundError, ManifestError, MiasError) as exc:
            fail(str(exc))
    if json_output:
        sys.stdout.write(json.dumps(summary.to_dict(), indent=2) + "\n")
    else:
        print_screen_summary(summary.to_dict(), Console())


def print_screen_summary(summary: dict, console: Console) -> None:
    """The readable form of a screening summary."""
    console.print(f"scored: [bold green]{summary['n_scored']}[/] of {summary['n_files']} files, "
                  f"skipped: [bold {'yellow' if summary['n_skipped'] else 'green'}]{summary['n_skipped']}[/]  "
                  f"(decision rule {summary['decision_rule']})", highlight=False)
    decisions = Table(title="decisions", show_header=True)
    for name in summary["decisions"]:
        decisions.add_column(name, justify="right")
    decisions.add_row(*(str(n) for n in summary["decisions"].values()))
    console.print(decisions)
    if summary["skipped"]:
        skipped = Table(title="files not scored", show_header=True)
        skipped.add_column("file", overflow="fold")
        skipped.add_column("reason", overflow="fold")
        for item in summary["skipped"]:
            skipped.add_row(escape(item["file"]), escape(item["reason"]))
        console.print(skipped)
    rate = summary["images_per_second"]
    console.print(f"{summary['seconds']:.1f} s" + (f", {rate:.2f} images/s" if rate else ""), highlight=False)
    console.print(f"predictions: {summary['predictions']}\nreport: {summary['report']}", highlight=False)


@app.command("app-hash")
def app_hash_command(
    app_dir: Annotated[Path, typer.Argument(metavar="APP_DIR", help="Flower app folder (with pyproject.toml).")] = Path(),
) -> None:
    """Print the hash a steward approves: Flower's FAB hash of APP_DIR, as `flwr run APP_DIR` would submit it."""
    from client.app_approval import app_hash

    try:
        digest = app_hash(app_dir.resolve())
    except (FileNotFoundError, ValueError) as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    sys.stdout.write(digest + "\n")


@app.command("node")
def node_command(
    superlink: Annotated[str, typer.Option("--superlink", metavar="HOST:PORT", help="The SuperLink's Fleet API.")],
    node_config: Annotated[str, typer.Option("--node-config", metavar="TEXT",
                                             help='Node config, e.g. \'data-dir="..." state-dir="..."\'.')],
    root_certificates: Annotated[Path | None, typer.Option("--root-certificates", metavar="PEM",
                                                           help="CA certificate of the SuperLink (TLS).")] = None,
    auth_key: Annotated[Path | None, typer.Option("--auth-supernode-private-key", metavar="KEY",
                                                  help="The node's registered private key.")] = None,
    approved_app: Annotated[list[str] | None, typer.Option("--approved-app", metavar="HASH",
                                                           help="An approved app's hash (repeatable).")] = None,
    approved_apps: Annotated[Path | None, typer.Option("--approved-apps", metavar="FILE",
                                                       help="Allow-list file: one hash per line.")] = None,
    runtime_port: Annotated[int, typer.Option("--runtime-port", help="Loopback port of the SuperNode's "
                                              "Runtime API.")] = 9094,
    max_retries: Annotated[int | None, typer.Option("--max-retries", help="SuperLink connection retries.")] = None,
    insecure_test_only: Annotated[bool, typer.Option("--insecure-test-only",
                                                     help="Allow no TLS / no node key (loopback tests only).")] = False,
) -> None:
    """Run this hospital's node: its SuperNode plus one warm process that runs only approved apps."""
    import logging

    from client.app_approval import AllowList, AllowListError, read_allow_list
    from client.hospital_node import NodeOptions, NodeStartError, run_node

    errors = Console(stderr=True)
    try:
        allowed = AllowList.of(approved_app or [])
        if approved_apps is not None:
            allowed = allowed | read_allow_list(approved_apps)
        options = NodeOptions(superlink=superlink, node_config=node_config, allowed=allowed,
                              root_certificates=root_certificates, auth_key=auth_key,
                              insecure_test_only=insecure_test_only, runtime_port=runtime_port,
                              max_retries=max_retries)
        options.check()
    except (AllowListError, NodeStartError) as exc:
        errors.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    raise typer.Exit(run_node(options))


@app.command("preflight")
def preflight_command(
    node_config: Annotated[str, typer.Option(
        "--node-config", metavar="'KEY=VALUE ...'",
        help="The node's config, as given to flower-supernode (data-dir, state-dir, manifest, policy keys).")],
    run_config: Annotated[str, typer.Option(
        "--run-config", metavar="'KEY=VALUE ...'",
        help="The run config the coordinator announces (keys not given take the app's defaults).")] = "",
    json_output: Annotated[bool, typer.Option("--json", help="Print only a JSON report on stdout.")] = False,
) -> None:
    """What a run would send from this node and cost it, and whether the node's policy allows it (exit 1 if not)."""
    import click
    from flwr.common.config import parse_config_args

    from client.preflight import preflight
    from common.run_config import ConfigError, NodeConfig, RunConfig

    errors = Console(stderr=True)
    try:
        run = RunConfig.from_flower(parse_config_args([run_config]) if run_config.strip() else {})
        node = NodeConfig.from_flower(parse_config_args([node_config]), run=run)
        with contextlib.redirect_stdout(sys.stderr):
            plan = preflight(run, node)
    except (ConfigError, FileNotFoundError, ManifestError, MiasError, ValueError, click.ClickException) as exc:
        message = exc.format_message() if isinstance(exc, click.ClickException) else str(exc)
        errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
        raise typer.Exit(EXIT_BAD_INPUT) from exc
    if json_output:
        sys.stdout.write(json.dumps(plan.to_json(), indent=2) + "\n")
    else:
        print_preflight(plan.to_json(), Console())
    if not plan.allowed:
        raise typer.Exit(1)


def print_preflight(plan: dict, console: Console) -> None:
    """The readable form of a preflight report."""
    verdict = "[bold green]allowed[/]" if plan["allowed"] else "[bold red]refused[/]"
    console.print(f"policy: {verdict}; epsilon {plan['epsilon_now']:.3f} now, {plan['epsilon_after']:.3f} after "
                  f"this run (budget {plan['max_epsilon']:g}, on {plan['budget_basis']})", highlight=False)
    for reason in plan["refusals"]:
        console.print(f"  {escape(reason)}", highlight=False)
    facts = Table(title="the run at this node", show_header=False)
    facts.add_column("what")
    facts.add_column("value", overflow="fold")
    facts.add_row("images", f"{plan['train_images']} training, {plan['validation_images']} validation")
    facts.add_row("model", f"{plan['model']['kind']}: {plan['model']['parameters']:,} parameters, "
                           f"{plan['model']['bytes_per_update_float32']:,} bytes per update (float32)")
    facts.add_row("DP", ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                  for k, v in plan["dp"].items()))
    facts.add_row("releases", ", ".join(f"{k} {v}" for k, v in plan["releases"].items()))
    for kind, keys in plan["sends"].items():
        facts.add_row(f"sends ({kind})", ", ".join(keys))
    console.print(facts)
