"""`make demo`: the `demo` preset on mini-MIAS, three virtual hospitals, DP on, into ``runs/demo-<time>/``.

Data: the folder in ``MINI_MIAS_DIR`` when it holds mini-MIAS; otherwise the official archive is fetched and
verified into ``data/mini-mias`` under the repository (``MINI_MIAS_URL`` overrides the download address). Ends with
the round table, where the metrics and the model bundle are, the final metrics at the released model's operating
point and the path of ``report.html``. Exit code 0 on success, 1 when the run
failed, 2 when the data could not be obtained.

Run as ``python -m simulations.demo`` (``--no-live`` for plain output; ``--set KEY=VALUE`` as in ``mammofl-sim``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
from pathlib import Path

from rich.console import Console

from common.run_config import ConfigError
from simulations.cli import print_result, setup_logging
from simulations.presets import resolve

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO_ROOT / "data" / "mini-mias"
PRESET = "demo"


def data_folder(console: Console) -> Path:
    """MINI_MIAS_DIR if it holds mini-MIAS, else a verified download into data/mini-mias."""
    configured = os.environ.get("MINI_MIAS_DIR", "").strip()
    if configured and (Path(configured) / "Info.txt").is_file():
        return Path(configured).expanduser().resolve()
    from simulations.mias_download import DEFAULT_URL, ensure_mini_mias

    url = os.environ.get("MINI_MIAS_URL", "").strip() or DEFAULT_URL
    reason = f"MINI_MIAS_DIR={configured} holds no mini-MIAS" if configured else "MINI_MIAS_DIR is not set"
    console.print(f"{reason}: using {DEFAULT_DATA} (fetched from {url} and verified if missing)", highlight=False)
    return ensure_mini_mias(DEFAULT_DATA, url=url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default runs/demo-<UTC time>)")
    parser.add_argument("--no-live", dest="live", action="store_false", help="no live round table")
    args = parser.parse_args(argv)
    setup_logging(live=args.live)
    console = Console()
    try:
        sim = resolve(PRESET, args.sets)
    except ConfigError as error:
        console.print(f"[bold red]error:[/] {error}", highlight=False)
        return 2
    try:
        data_dir = data_folder(console)
    except Exception as error:  # download or verification failed: say why, exit non-zero
        console.print(f"[bold red]error:[/] cannot obtain mini-MIAS: {error}", highlight=False)
        return 2
    out = args.out or Path("runs") / f"demo-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}"

    from simulations.run import SimulationError, SimulationRequest, flower_environment, run_mode

    flower_environment()

    request = SimulationRequest(config=sim, mode="federated", data_dir=data_dir, run_dir=out)
    console.print(f"demo: {sim.num_hospitals} hospitals, {sim.run.num_server_rounds} rounds, model "
                  f"{sim.run.model}, DP {'on' if sim.run.dp else 'off'}, data {data_dir} -> {request.run_dir}",
                  highlight=False)
    try:
        result = run_mode(request, live=args.live)
    except (SimulationError, ConfigError, FileNotFoundError, FileExistsError) as error:
        console.print(f"[bold red]demo failed:[/] {error}", highlight=False)
        return 1
    console.print(f"partition plot: {request.run_dir / 'partitions.png'}", highlight=False)
    console.print(f"wall time: {result.seconds:.0f} s", highlight=False)
    print_result(result, console)  # ends with the final metrics and the path of the report
    return 0


if __name__ == "__main__":
    sys.exit(main())
