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
) -> None:
    """Scan DIR: images usable, files skipped and why, classes, patients, views, bit depths."""
    errors = Console(stderr=True)
    try:
        # Libraries must not write into the JSON: anything they print goes to stderr while scanning.
        with contextlib.redirect_stdout(sys.stderr):
            report = scan_folder(folder, manifest)
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


@app.command("screen")
def screen_command(
    inputs: Annotated[list[Path], typer.Argument(metavar="INPUT...", help="DICOM/PNG/PGM files or folders.")],
    model: Annotated[Path, typer.Option("--model", metavar="BUNDLE", help="Released model bundle.")],
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
        with contextlib.redirect_stdout(sys.stderr):
            predictor = Predictor.from_bundle(model)
    except BundleError as exc:
        fail(f"cannot use the model: {exc}")
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
