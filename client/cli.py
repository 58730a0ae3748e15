"""`mammofl-hospital`: the hospital's command line. Thin: each command calls a plain function and prints.

Exit codes: 0 the command ran (a data check with skipped files included), 2 bad input (missing folder, bad
manifest or Info.txt).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from client.dataset_scan import ScanReport, scan_folder
from client.readers.manifest import ManifestError
from client.readers.mias import MiasError

app = typer.Typer(
    name="mammofl-hospital",
    help="MammoFL for hospitals: check data, run a node, watch the privacy budget.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_BAD_INPUT = 2


@app.callback()
def main() -> None:
    """MammoFL for hospitals: check data, run a node, watch the privacy budget."""


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
