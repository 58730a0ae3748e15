"""`mammofl-sim`: simulate a federation of virtual hospitals on one machine, and its baselines.

Thin: each command resolves a typed config (``simulations.presets``) and calls a plain function
(``simulations.run``, ``simulations.partition_plot``, ``server.report``). Heavy imports (torch, Flower, Ray)
happen only inside the commands that need them, so ``--help`` and config errors are instant.

Exit codes: 0 the run completed and wrote its run directory; 1 the run failed (the run directory says why) or its
model failed the release gate (run config ``sim-max-attack-advantage``: the model is then ``model.unreleased``);
2 bad input (unknown preset or key, bad value, missing data folder, a folder that is no run directory).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console, Group
from rich.markup import escape
from rich.table import Table

from common.operating_point import threshold_text
from common.run_config import ConfigError, RunConfig
from simulations.presets import MODES, NUM_HOSPITALS, PRESETS, resolve

#: The run report a completed simulation writes into its run directory (when the report module is present).
REPORT_FILE = "report.html"

app = typer.Typer(
    name="mammofl-sim",
    help="MammoFL for researchers: federations of virtual hospitals cut from a public data set, with baselines.",
    no_args_is_help=True,
    add_completion=False,
)

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_console = Console()
_errors = Console(stderr=True)


@app.callback()
def main() -> None:
    """MammoFL for researchers: federations of virtual hospitals cut from a public data set, with baselines."""


@app.command("run")
def run_command(
    preset: Annotated[str, typer.Option("--preset", "-p", help=f"One of: {', '.join(PRESETS)}.")] = "smoke",
    data_dir: Annotated[Path | None, typer.Option("--data-dir", metavar="DIR",
                                                  help="mini-MIAS folder (Info.txt + images).")] = None,
    out: Annotated[Path | None, typer.Option("--out", metavar="DIR",
                                             help="Run directory to create (must not hold a run).")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="Override a run-config key or num-hospitals; "
                                                        "repeatable. `mammofl-sim keys` lists them.")] = None,
    mode: Annotated[str, typer.Option("--mode", help="federated | centralised (pooled data) | local "
                                                     "(each hospital alone).")] = "federated",
    resume: Annotated[Path | None, typer.Option("--resume", metavar="RUN_DIR",
                                                help="Continue an interrupted federated run from its last "
                                                     "checkpoint (--set may raise num-server-rounds).")] = None,
    state_dir: Annotated[Path | None, typer.Option("--state-dir", metavar="DIR",
                                                   help="Virtual hospitals' disks (ledgers, caches); "
                                                        "default RUN_DIR/hospitals.")] = None,
    live: Annotated[bool, typer.Option("--live/--no-live", help="Live round table.")] = True,
) -> None:
    """Run PRESET in MODE on the data in DIR, writing the run-directory contract to --out."""
    try:
        if resume is not None:
            if out is not None or data_dir is not None:
                raise ConfigError("--resume continues a run in its own directory with its own data: leave out "
                                  "--out and --data-dir")
            from simulations.run import resume_request

            request = resume_request(resume, sets or [])
        else:
            if mode not in MODES:
                raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got '{mode}'")
            if data_dir is None or out is None:
                raise ConfigError("--data-dir and --out are required (or --resume RUN_DIR)")
            config = resolve(preset, sets or [])  # config errors before any heavy import
            from simulations.run import SimulationRequest

            request = SimulationRequest(config=config, mode=mode, data_dir=data_dir, run_dir=out,
                                        state_dir=state_dir)
        request.check()
    except (ConfigError, FileNotFoundError, FileExistsError) as error:
        _fail(EXIT_BAD_INPUT, str(error))
    sim = request.config
    _errors.print(f"[bold]{request.mode}[/] run, preset [bold]{sim.preset}[/], {sim.num_hospitals} hospitals, "
                  f"model {sim.run.model}, DP {'on' if sim.run.dp else 'off'} -> {escape(str(request.run_dir))}",
                  highlight=False)
    from simulations.run import SimulationError, flower_environment, run_mode

    flower_environment()
    setup_logging(live=live)
    try:
        result = run_mode(request, live=live)
    except ConfigError as error:  # e.g. more hospitals than patients
        _fail(EXIT_BAD_INPUT, str(error))
    except SimulationError as error:
        _fail(EXIT_FAILED, str(error))
    print_result(result, _console)


@app.command("partitions")
def partitions_command(
    data_dir: Annotated[Path, typer.Option("--data-dir", metavar="DIR", help="mini-MIAS folder.")],
    out: Annotated[Path, typer.Option("--out", metavar="PNG", help="Where to write the plot.")],
    preset: Annotated[str, typer.Option("--preset", "-p", help=f"One of: {', '.join(PRESETS)}.")] = "demo",
    scheme: Annotated[str | None, typer.Option("--scheme", help="iid | dirichlet | tissue (overrides the "
                                                                 "preset's sim-partition).")] = None,
    hospitals: Annotated[int | None, typer.Option("--hospitals", min=1, help="Number of hospitals.")] = None,
    sets: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE",
                                                   help="As for `run` (seed, sim-dirichlet-alpha, ...).")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="Also print the per-hospital counts as JSON.")]
    = False,
) -> None:
    """Plot how PRESET (or --scheme) cuts the data in DIR into hospitals: classes and tissue per hospital."""
    from simulations.hospitals import virtual_hospitals

    assignments = list(sets or [])
    if scheme is not None:
        assignments.append(f"sim-partition={scheme}")
    if hospitals is not None:
        assignments.append(f"{NUM_HOSPITALS}={hospitals}")
    try:
        sim = resolve(preset, assignments)
        if not (data_dir / "Info.txt").is_file():
            raise FileNotFoundError(f"{data_dir} is not a mini-MIAS folder (no Info.txt)")
        split = virtual_hospitals(data_dir, sim)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        _fail(EXIT_BAD_INPUT, str(error))
    path = split.plot(out)
    if json_output:
        sys.stdout.write(json.dumps(split.summary(), indent=2) + "\n")
    _errors.print(f"partition plot: {escape(str(path))}", highlight=False)


@app.command("report")
def report_command(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory (holds metrics.json).")],
) -> None:
    """(Re)build RUN_DIR/report.html and RUN_DIR/figures/*.png from the run directory; prints the page's path."""
    from server.report import ReportError, build_report

    try:
        path = build_report(run_dir)
    except ReportError as error:
        _fail(EXIT_BAD_INPUT, str(error))
    _console.print(str(path), highlight=False, soft_wrap=True)


@app.command("presets")
def presets_command() -> None:
    """List the presets and what they change."""
    table = Table(title="presets")
    for column in ("name", "hospitals", "description", "overrides"):
        table.add_column(column)
    for preset in PRESETS.values():
        table.add_row(preset.name, str(preset.num_hospitals), preset.description,
                      ", ".join(f"{k}={v}" for k, v in preset.overrides.items()))
    _console.print(table)


@app.command("keys")
def keys_command() -> None:
    """List the keys `--set` accepts, with defaults."""
    table = Table(title="--set keys")
    for column in ("key", "default", "meaning"):
        table.add_column(column)
    table.add_row(NUM_HOSPITALS, "(preset)", "virtual hospitals (Flower SuperNodes)")
    defaults = RunConfig.defaults()
    for key, text in RunConfig.describe().items():
        table.add_row(key, repr(defaults[key]), text)
    _console.print(table)


def setup_logging(*, live: bool) -> None:
    """One root handler on stderr (before any library installs its own): INFO from MammoFL, warnings from the
    rest. Flower keeps its own handler; known third-party notices are handled (``simulations.console``).

    With the live table, Flower's per-round INFO lines are left out: the table shows the rounds.
    """
    import logging

    from rich.logging import RichHandler

    from simulations.console import quiet_known_notices
    from simulations.run import flower_environment

    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=_errors, show_path=False)])
    for package in ("simulations", "server", "client", "common"):
        logging.getLogger(package).setLevel(logging.INFO)
    flower_environment()  # Flower reads it when first imported, which is now:
    import flwr.common.logger  # noqa: F401 - it sets Flower's logger level when imported: set ours after that

    quiet_known_notices()  # also: Flower prints through its own console handler only
    if live:
        logging.getLogger("flwr").setLevel(logging.WARNING)


def print_result(result, console: Console) -> None:
    """Where the run wrote its outputs, its privacy cost, the final metrics (at the released model's operating
    point when the run chose one, else at arg-max) and, last, the path of its report."""
    final = result.final or {}
    console.print(f"run directory: {result.run_dir}", highlight=False, soft_wrap=True)
    console.print(f"metrics:       {result.metrics_path}", highlight=False, soft_wrap=True)
    for bundle in result.bundles:
        console.print(f"model bundle:  {bundle}", highlight=False, soft_wrap=True)
        public = bundle.parent / "signing" / "trusted.pub"  # server.signing_keys: the key the run made
        if public.is_file():
            console.print(f"public key:    {public}  (screen --public-key)", highlight=False, soft_wrap=True)
    epsilon = f"epsilon max: {_number(result.epsilon_max, 2)}"
    own = result.epsilon_own_noise_max
    if own is not None and result.epsilon_max is not None and own > result.epsilon_max:
        epsilon += f" (of the secure sum; each hospital's own noise alone: {own:.2f})"
    console.print(epsilon, highlight=False)
    audit = (result.document or {}).get("membership_inference") or {}
    if audit.get("advantage") is not None:
        chance = audit.get("chance_advantage_95")
        console.print(f"membership inference: attack advantage {audit['advantage']:.3f}"
                      + (f" (a model that leaks nothing: up to {chance:.3f} at 95 %)" if chance is not None else "")
                      + f", attack AUC {audit['auc']:.3f}", highlight=False)
    console.print(final_metrics_view(final), highlight=False)
    report = Path(result.run_dir) / REPORT_FILE
    if report.is_file():
        console.print(f"report:        {report}", highlight=False, soft_wrap=True)


def final_metrics_view(final: dict) -> Group:
    """A heading, the final metrics table and confusion matrix, then one line saying how decisions were made: at the
    operating point when ``final`` has one (threshold, rule, where it was chosen), else at arg-max. AUCs need no
    threshold."""
    point = final.get("operating_point")
    at_point = final.get("at_operating_point")
    source = {"centralised-test": "held-out test set", "federated": "hospitals' validation splits"}.get(
        final.get("source"), final.get("source", "?"))
    heading = f"final metrics, round {final.get('round', '?')}, {source}"
    table = Table()
    table.add_column("metric")
    table.add_column("value", justify="right")
    if point and at_point:
        target = (f"sensitivity >= {point['target']:.2f}" if point.get("rule") == "sensitivity"
                  else str(point.get("rule")))
        decided = (f"decisions at the operating point: malignant when P(malignant) >= {threshold_text(at_point['threshold'])} "
                   f"({target}, chosen on {point.get('source') or '?'})")
        decisions = at_point
        sensitivity = at_point.get("sensitivity", at_point.get("recall"))
    else:
        decided = "decisions at arg-max (this run recorded no operating point)"
        decisions = final
        sensitivity = final.get("recall")
    for name, value in (("AUC malignant vs rest", final.get("auc_malignant")),
                        ("AUC benign vs malignant", final.get("auc_benign_vs_malignant")),
                        ("sensitivity (malignant)", sensitivity),
                        ("specificity", decisions.get("specificity")),
                        ("precision (malignant)", decisions.get("precision")),
                        ("accuracy", decisions.get("accuracy")),
                        ("F1 (macro)", decisions.get("f1_macro"))):
        table.add_row(name, _number(value))
    matrix = decisions.get("confusion_matrix")
    if not matrix:
        return Group(heading, table, decided)
    names = final.get("class_names") or ["normal", "benign", "malignant"]
    confusion = Table(title="confusion matrix\n(rows: true class)", title_justify="left")
    confusion.add_column("")
    for name in names:
        confusion.add_column(name, justify="right")
    for name, row in zip(names, matrix):
        confusion.add_row(name, *(str(int(n)) for n in row))
    return Group(heading, table, confusion, decided)


def _number(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _fail(code: int, message: str) -> None:
    _errors.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


if __name__ == "__main__":
    app()
