"""Run a simulated federation, or one of its baselines, on one machine; every mode writes a run directory.

Modes (same virtual hospitals, same patient splits, same seed, same model, same privacy settings):

- ``federated``: Flower's Simulation Engine (Ray) runs the project's ServerApp and ClientApp in-process, one
  virtual SuperNode per hospital, 1 CPU / 0 GPU per client. Flower's in-process simulation hands the apps an
  empty run config, so the resolved config is passed to the app factories explicitly. Flower alone returns
  normally when rounds fail or replies are missing, so :func:`check_run_directory` reads the run directory back
  and raises :class:`SimulationError` unless every round is there and the run completed.
- ``centralised``: the hospitals' training splits pooled into one data set; the same model trained with the same
  plain functions (``client.training.train_local``), DP on or off as configured, for as many epochs as a
  hospital trains in the federation (``num-server-rounds`` x ``local-epochs``; one "round" = ``local-epochs``
  epochs). Evaluated each round on every hospital's validation split (aggregated as the coordinator aggregates
  federated evaluation) and on the held-out test set.
- ``local``: each hospital alone, trained like the centralised baseline on its own split; each gets a complete
  run directory under ``hospital-<k>/`` (metrics, checkpoints, bundle); the top-level ``metrics.json`` holds the
  per-round mean over hospitals and, in ``final``, the mean of the hospitals' held-out test metrics (plus each
  hospital's own under ``final["per_hospital"]``).

After training, the simulation audits the released model for membership inference and applies the release gate
(run config ``sim-max-attack-advantage``; ``simulations.membership_audit``): ``metrics.json`` gets a
``membership_inference`` section, and a model that fails the gate is moved to ``model.unreleased`` and the run
raises ``ReleaseWithheld`` (a SimulationError) after its report is written.

Every run directory also gets ``partitions.png`` (the split), ``simulation.json`` (preset, hospitals, mode, data
and state folders, per-hospital counts: what ``--resume`` needs) and, in ``metrics.json``, a ``simulation``
section (preset, ``num-hospitals``, mode; ``hospital`` in a local baseline's per-hospital directory). ``config``
holds the resolved run config (with the data, state and run paths), as in every run directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common.run_config import ConfigError, RunConfig
from server.run_directory import BUNDLE_FILE, METRICS_FILE, RunDirectory, load_metrics
from simulations.presets import MODES, NUM_HOSPITALS, SimulationConfig, parse_sets

log = logging.getLogger(__name__)

SIMULATION_FILE = "simulation.json"
PARTITION_PLOT = "partitions.png"
#: Resources of one virtual hospital in Flower's Ray backend: one CPU core, no GPU.
CLIENT_RESOURCES = {"num_cpus": 1, "num_gpus": 0.0}
_COORDINATOR = "coordinator"


class SimulationError(RuntimeError):
    """The simulation did not produce a complete run; the message says what is missing or what failed."""


@dataclass(frozen=True)
class SimulationRequest:
    """What to run and where: the resolved config, the mode, the data and the run directory."""

    config: SimulationConfig
    mode: str
    data_dir: Path
    run_dir: Path
    state_dir: Path | None = None  # the virtual hospitals' disks; default run_dir/hospitals
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser().resolve())
        object.__setattr__(self, "run_dir", Path(self.run_dir).expanduser().resolve())
        state = self.state_dir if self.state_dir is not None else self.run_dir / "hospitals"
        object.__setattr__(self, "state_dir", Path(state).expanduser().resolve())
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got '{self.mode}'")

    def check(self) -> None:
        """Refuse early what would fail later: no data, an occupied run directory, a baseline resume."""
        if not (self.data_dir / "Info.txt").is_file():
            raise FileNotFoundError(f"{self.data_dir} is not a mini-MIAS folder (no Info.txt); get it with "
                                    f"`python -m simulations.mias_download DEST`")
        if self.resume:
            if self.mode != "federated":
                raise ConfigError(f"--resume continues federated runs; this run directory holds a {self.mode} "
                                  f"run: start it again instead")
            if not (self.run_dir / METRICS_FILE).is_file():
                raise FileNotFoundError(f"cannot resume {self.run_dir}: no {METRICS_FILE}")
        elif (self.run_dir / METRICS_FILE).exists() or (self.run_dir / SIMULATION_FILE).exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: choose another --out, or --resume it")

    @property
    def run(self) -> RunConfig:
        """The run config with this request's paths filled in."""
        return self.config.run.updated(
            sim_data_dir=str(self.data_dir), sim_state_dir=str(self.state_dir), run_dir=str(self.run_dir),
            resume=str(self.run_dir) if self.resume else "")


@dataclass(frozen=True)
class SimulationResult:
    """A completed run: where its outputs are and its headline numbers."""

    mode: str
    run_dir: Path
    document: dict
    bundles: tuple[Path, ...]
    seconds: float
    sub_runs: tuple[Path, ...] = field(default=())

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / METRICS_FILE

    @property
    def final(self) -> dict:
        return self.document.get("final") or {}

    @property
    def epsilon_max(self) -> float | None:
        """Largest hospital epsilon of the noise the coordinator saw (the secure sum's, with distributed noise)."""
        return self._privacy_max("epsilon")

    @property
    def epsilon_own_noise_max(self) -> float | None:
        """Largest hospital epsilon of its own noise alone (what it spent if secure aggregation failed)."""
        return self._privacy_max("epsilon_own_noise")

    def _privacy_max(self, key: str) -> float | None:
        values = [p.get(key) for p in (self.document.get("privacy") or {}).values()]
        values = [v for v in values if isinstance(v, (int, float))]
        return max(values) if values else None


# ---------------------------------------------------------------- entry points
def run_mode(request: SimulationRequest, *, live: bool = False) -> SimulationResult:
    """Run `request` (any mode); with `live`, a Rich round table follows the run directory on stderr."""
    request.check()
    _prepare(request)
    started = time.monotonic()
    runner = {"federated": run_federated, "centralised": run_centralised, "local": run_local}[request.mode]
    total = request.config.run.num_server_rounds
    withheld = None
    with _live_display(request, total, enabled=live):  # the table stays below the gallery's and report's lines
        result = runner(request)
        from simulations.membership_audit import ReleaseWithheld, audit_release

        try:  # before the gallery: a withheld model is moved aside and gets none
            audit_release(request.run, result, num_hospitals=request.config.num_hospitals)
        except ReleaseWithheld as error:
            withheld = error
        write_outputs(request.run, result)
    if withheld is not None:
        raise withheld
    result = replace(result, seconds=time.monotonic() - started, document=load_metrics(result.run_dir))
    log.info("%s run completed in %.0f s: %s", request.mode, result.seconds, result.run_dir)
    return result


def resume_request(run_dir: Path, sets: Iterable[str] = ()) -> SimulationRequest:
    """A request continuing the federated run in `run_dir`; `sets` may change e.g. ``num-server-rounds``."""
    run_dir = Path(run_dir).expanduser().resolve()
    try:
        saved = json.loads((run_dir / SIMULATION_FILE).read_text())
        document = load_metrics(run_dir)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"cannot resume {run_dir}: {Path(error.filename).name} missing "
                                f"(not a mammofl-sim run directory)") from None
    overrides = parse_sets(sets)
    num_hospitals = overrides.pop(NUM_HOSPITALS, saved[NUM_HOSPITALS])
    if num_hospitals != saved[NUM_HOSPITALS]:
        raise ConfigError(f"cannot resume with {NUM_HOSPITALS}={num_hospitals}: the run has "
                          f"{saved[NUM_HOSPITALS]} hospitals")
    run = RunConfig.from_flower(document["config"], overrides)
    sim = SimulationConfig(preset=saved["preset"], num_hospitals=num_hospitals, run=run)
    return SimulationRequest(config=sim, mode=saved["mode"], data_dir=Path(saved["data-dir"]), run_dir=run_dir,
                             state_dir=Path(saved["state-dir"]), resume=True)


def run_federated(request: SimulationRequest) -> SimulationResult:
    """Flower Simulation Engine run of the project's apps; raises SimulationError unless the run completed."""
    flower_environment()
    from flwr.simulation import run_simulation

    from client.app import make_client_app
    from server.app import make_server_app
    from simulations.console import quiet_known_notices

    quiet_known_notices()

    run = request.run
    overrides = run.to_flower()
    server_app = make_server_app(overrides=overrides, central_evaluator=held_out_evaluator,
                                 write_report=False)  # write_outputs builds it once, after the gallery
    client_app = make_client_app(overrides=overrides)
    backend_config = {"client_resources": dict(CLIENT_RESOURCES), "init_args": {"num_cpus": _usable_cpus()}}
    started = time.monotonic()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=request.config.num_hospitals,
                       backend_config=backend_config)
    except (Exception, SystemExit) as error:  # flwr exits the process on some failures: keep control
        raise SimulationError(f"federated run failed: {_describe(error)} (see {request.run_dir / METRICS_FILE})"
                              ) from error
    finally:
        _annotate(request)
    document = check_run_directory(request.run_dir, rounds=run.num_server_rounds,
                                   hospitals=request.config.num_hospitals, dp=run.dp)
    return SimulationResult("federated", request.run_dir, document, (request.run_dir / BUNDLE_FILE,),
                            time.monotonic() - started)


def run_centralised(request: SimulationRequest) -> SimulationResult:
    """All hospitals' training splits pooled, one model; see the module doc."""
    from simulations.baselines import load_hospitals, pooled, train_baseline

    run = request.run
    started = time.monotonic()
    hospitals = load_hospitals(run, request.config.num_hospitals)
    test = held_out_test(run)
    run_dir = _create(request.run_dir, request)
    train_baseline(run_dir, run, train=pooled([h.train for h in hospitals]), vals=[h.val for h in hospitals],
                   test=test, privacy_name="pooled", info={"mode": "centralised"}, sites=len(hospitals))
    document = check_run_directory(request.run_dir, rounds=run.num_server_rounds, hospitals=None, dp=run.dp)
    return SimulationResult("centralised", request.run_dir, document, (request.run_dir / BUNDLE_FILE,),
                            time.monotonic() - started)


def run_local(request: SimulationRequest) -> SimulationResult:
    """Each hospital alone on its own split, all scored on the same held-out test set; see the module doc."""
    from simulations.baselines import load_hospitals, summarise_local, train_baseline

    run = request.run
    started = time.monotonic()
    hospitals = load_hospitals(run, request.config.num_hospitals)
    test = held_out_test(run)
    top = _create(request.run_dir, request)
    sub_dirs = []
    for k, hospital in enumerate(hospitals):
        path = request.run_dir / f"hospital-{k}"
        sub = _create(path, request, hospital=k)
        train_baseline(sub, run, train=hospital.train, vals=[hospital.val], test=test,
                       privacy_name=f"partition-{k}", info={"mode": "local", "hospital": k},
                       on_round=lambda _entry: summarise_local(top, [load_metrics(p) for p in sub_dirs + [path]],
                                                               final=False))
        sub_dirs.append(path)
        check_run_directory(path, rounds=run.num_server_rounds, hospitals=None, dp=run.dp)
    summarise_local(top, [load_metrics(p) for p in sub_dirs], final=True)
    document = check_run_directory(request.run_dir, rounds=run.num_server_rounds, hospitals=None, dp=run.dp,
                                   bundle=False)
    return SimulationResult("local", request.run_dir, document, tuple(p / BUNDLE_FILE for p in sub_dirs),
                            time.monotonic() - started, sub_runs=tuple(sub_dirs))


def flower_environment() -> None:
    """Flower defaults for an offline, reproducible simulation, unless the caller's environment says otherwise.

    No update check, no runtime dependency installation (it builds a fresh venv per run and resolves other
    versions), no telemetry. Flower reads some of these when it is first imported: call this before that.
    """
    for key, value in (("FLWR_DISABLE_UPDATE_CHECK", "1"), ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
                       ("FLWR_TELEMETRY_ENABLED", "0")):
        os.environ.setdefault(key, value)


# ---------------------------------------------------------------- held-out test set
def held_out_test(run: RunConfig):
    """The held-out test set as the model kind's dataset (preprocessing and features cached on the
    coordinator's disk under ``sim-state-dir``)."""
    from client.hospital_data import held_out_test_set

    return held_out_test_set(run, cache_dir=Path(run.sim_state_dir) / _COORDINATOR / "cache")


def held_out_evaluator(run: RunConfig) -> Callable[[Any], dict] | None:
    """The coordinator's centralised evaluation: scores a model on the held-out test set (None: no test set).

    The test set is prepared in a background thread, so its preprocessing and frozen features overlap with the
    hospitals' first round instead of delaying it; the first evaluation waits for it (and raises its error).
    """
    if run.sim_test_fraction <= 0:
        return None
    from simulations.baselines import test_entry

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="held-out-test")
    test = pool.submit(held_out_test, run)
    pool.shutdown(wait=False)
    return lambda model: test_entry(model, test.result())


# ---------------------------------------------------------------- checking what a run wrote
def check_run_directory(run_dir: Path, *, rounds: int, hospitals: int | None, dp: bool,
                        bundle: bool = True) -> dict:
    """The run's ``metrics.json`` if it is complete; else SimulationError naming the first gap."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise SimulationError(f"the run wrote no {path}")
    document = json.loads(path.read_text())
    problems = []
    if document.get("status") != "completed":
        problems.append(f"status is {document.get('status')!r}"
                        + (f": {document['error']}" if document.get("error") else ""))
    numbers = [r.get("round") for r in document.get("rounds") or []]
    if numbers != list(range(1, rounds + 1)):
        problems.append(f"rounds recorded {numbers}, expected 1..{rounds}")
    for entry in document.get("rounds") or []:
        secure = entry.get("secure_aggregation")  # distributed noise: no loss leaves a node, the sum counts
        if (secure or {}).get("contributors", 1) < 1 or (secure is None and entry.get("train_loss") is None):
            problems.append(f"round {entry.get('round')} has no train loss or secure sum (no hospital trained)")
            break
    final = document.get("final") or {}
    missing = [k for k in ("auc_malignant", "accuracy", "confusion_matrix") if k not in final]
    if missing:
        problems.append(f"final metrics lack {', '.join(missing)}")
    privacy = document.get("privacy") or {}
    if hospitals is not None:
        expected = {f"partition-{k}" for k in range(hospitals)}
        if not expected <= set(privacy):
            problems.append(f"privacy accounting missing for {', '.join(sorted(expected - set(privacy)))}")
    if dp and not any(isinstance(p.get("epsilon"), (int, float)) for p in privacy.values()):
        problems.append("DP is on but no epsilon was recorded")
    for key in ("config", "versions"):
        if not document.get(key):
            problems.append(f"no {key!r} section")
    if bundle and not (Path(run_dir) / BUNDLE_FILE).is_file():
        problems.append(f"no model bundle {BUNDLE_FILE}")
    if problems:
        raise SimulationError(f"run in {run_dir} is incomplete: " + "; ".join(problems))
    return document


def write_outputs(run: RunConfig, result: SimulationResult) -> None:
    """After a completed run: the gallery of explained test predictions and ``report.html`` (with its PNG
    figures) in the run directory, and in each local baseline hospital's directory. A failure here is logged,
    never raised: the run and its model are complete without them."""
    for run_dir, bundle in ((result.run_dir, result.run_dir / BUNDLE_FILE),
                            *((p, p / BUNDLE_FILE) for p in result.sub_runs)):
        if bundle.is_file() and not result.sub_runs:
            try:
                from simulations.gallery import write_gallery

                write_gallery(run_dir, run, bundle)
            except Exception as error:  # noqa: BLE001 - reported, the run stands
                log.warning("no gallery in %s: %s: %s", run_dir, type(error).__name__, error)
        try:
            from server.report import build_report

            log.info("report: %s", build_report(run_dir))
        except Exception as error:  # noqa: BLE001 - reported, the run stands
            log.warning("no report in %s: %s: %s", run_dir, type(error).__name__, error)


# ---------------------------------------------------------------- internals
def _prepare(request: SimulationRequest) -> None:
    """The run directory's side files: the partition plot and what a resume needs."""
    from simulations.hospitals import virtual_hospitals

    request.run_dir.mkdir(parents=True, exist_ok=True)
    if request.resume:
        return
    try:
        split = virtual_hospitals(request.data_dir, replace(request.config, run=request.run))
    except ValueError as error:
        raise ConfigError(f"cannot cut the data into {request.config.num_hospitals} hospitals: {error}") from None
    _check_evaluation(request.run, split.with_validation(), request.config.num_hospitals)
    split.plot(request.run_dir / PARTITION_PLOT)
    side = {"preset": request.config.preset, NUM_HOSPITALS: request.config.num_hospitals, "mode": request.mode,
            "data-dir": str(request.data_dir), "state-dir": str(request.state_dir), "partitions": split.summary()}
    (request.run_dir / SIMULATION_FILE).write_text(json.dumps(side, indent=2) + "\n")


def _check_evaluation(run: RunConfig, with_validation: int, hospitals: int) -> None:
    """Refuse, before any work, a federated evaluation that cannot get the replies it requires: hospitals of one
    or two patients (e.g. 100 hospitals cut from mini-MIAS's 161 patients) may have no validation split."""
    if run.fraction_evaluate > 0 and run.min_evaluate_replies > with_validation:
        raise ConfigError(
            f"only {with_validation} of {hospitals} hospitals get a validation split at val-fraction "
            f"{run.val_fraction:g} (the others have too few patients), but 'min-evaluate-replies' is "
            f"{run.min_evaluate_replies}: set min-evaluate-replies <= {with_validation} (a larger val-fraction, "
            f"e.g. 0.5, gives more hospitals one), or fraction-evaluate 0")


def simulation_section(request: SimulationRequest, *, hospital: int | None = None) -> dict[str, Any]:
    """The ``simulation`` section of a run's ``metrics.json``: what the run config does not say."""
    section = {"preset": request.config.preset, NUM_HOSPITALS: request.config.num_hospitals, "mode": request.mode}
    if hospital is not None:
        section["hospital"] = hospital
    return section


def _create(path: Path, request: SimulationRequest, *, hospital: int | None = None) -> RunDirectory:
    from server.signing_keys import run_signing

    run_dir = RunDirectory.create(path, config=request.run.to_flower())
    run_dir.document["simulation"] = simulation_section(request, hospital=hospital)
    run_dir.use_signing(run_signing(request.run, path))
    return run_dir


def _annotate(request: SimulationRequest) -> None:
    """Add the simulation section to a run directory the coordinator wrote (kept across resumes)."""
    if not (request.run_dir / METRICS_FILE).is_file():
        return
    try:
        run_dir = RunDirectory(request.run_dir, load_metrics(request.run_dir))
        run_dir.document["simulation"] = simulation_section(request)
        run_dir.flush()
    except (OSError, ValueError) as error:  # never hide the run's own outcome behind this
        log.warning("could not add the simulation section to %s: %s", request.run_dir / METRICS_FILE, error)


@contextlib.contextmanager
def _live_display(request: SimulationRequest, total: int, *, enabled: bool):
    if not enabled:
        yield
        return
    from simulations.progress import RoundTable, RoundWatcher

    title = f"{request.mode}: {request.config.preset}, {request.config.num_hospitals} hospitals"
    with RoundTable(title=title, total_rounds=total) as table, RoundWatcher(request.run_dir, table):
        yield


def _usable_cpus() -> int:
    """CPU cores this process may run on (Ray would otherwise count the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _describe(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None:
        cause = cause.__cause__
    text = f"{type(cause).__name__}: {cause}"
    return text if cause is error else f"{type(error).__name__}: {error} <- {text}"


__all__ = ["MODES", "SimulationError", "SimulationRequest", "SimulationResult", "check_run_directory",
           "flower_environment", "held_out_evaluator", "held_out_test", "resume_request", "run_centralised",
           "run_federated", "run_local", "run_mode"]
