"""The coordinator's Flower ServerApp: rounds of DP training across hospitals, evaluation, checkpoints, report.

``app`` (declared in pyproject as ``server.app:app``) reads the run config once, builds the global model, runs the
strategy (``server.strategy``) with per-round federated evaluation and, where configured, centralised evaluation
on a held-out test set, and writes the run directory (``server.run_directory``): ``metrics.json`` after every
round, a checkpoint per round, and the final model bundle. With run config ``resume`` pointing at a run directory,
the run continues from that directory's last checkpoint (round numbers continue; hospitals' epsilon keeps growing
because their ledgers live on their own disks).

A coordinator killed mid-run (SIGKILL, power loss) is resumed this way, as a new Flower run on the restarted
SuperLink. Every training instruction carries the run directory's ``run_key``, the same before and after the
restart, and a hospital refuses a (run key, round) its ledger already holds, so no budget is spent twice. A round
that was started but not checkpointed when the coordinator died is not asked again: hospitals may have trained
it (their spend was real and is recorded; their updates may have reached the coordinator), so it is recorded in
``metrics.json`` as lost and the resumed run continues at the next round number, still ending at
``num-server-rounds``. A coordinator stopped between rounds (after a checkpoint, before the next round's
instructions) loses no round.

In-process simulation hands the app an empty run config: :func:`make_server_app` takes the overrides, and the
centralised evaluator (which reads images, so it is built on the hospital side of the code and injected here).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from common.bundle import BundleMeta, save_bundle
from common.models import build_model
from common.records import CLASS_NAMES
from common import wire
from common.run_config import ConfigError, RunConfig
from common.weights import exchanged_weights, load_weights
from server.run_directory import (
    RunDirectory,
    default_run_dir,
    eval_entry,
    final_from_federated,
    release_operating_point,
    with_operating_point,
)
from server.federated_explanations import request_explanations
from server.report import build_report
from server.signing_keys import run_signing
from server.strategy import MammoStrategyMixin, build_strategy

log = logging.getLogger(__name__)

#: Given the run config, a function scoring a model on the held-out test set (or None: no test set).
#: It returns a run-directory eval entry (``server.run_directory.eval_entry`` layout).
CentralEvaluatorFactory = Callable[[RunConfig], Callable[[torch.nn.Module], dict] | None]

FINAL_METRICS = ("auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision", "recall", "specificity",
                 "f1_macro", "confusion_matrix")

#: Run config keys a resumed run must share with the run it continues.
RESUME_MUST_MATCH = ("model", "image-size")


def make_server_app(*, overrides: Mapping[str, Any] | None = None,
                    central_evaluator: CentralEvaluatorFactory | None = None,
                    write_report: bool = True) -> ServerApp:
    """A ServerApp; `overrides` win over Flower's run config (in-process simulation passes them here);
    `write_report` False leaves ``report.html`` to the caller (a simulation writes it after its gallery)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        config = RunConfig.from_flower(context.run_config, overrides)
        run_federation(grid, config, central_evaluator=central_evaluator, write_report=write_report)

    return server_app


def run_federation(grid: Grid, config: RunConfig, *, central_evaluator: CentralEvaluatorFactory | None = None,
                   write_report: bool = True) -> RunDirectory:
    """Run (or resume) a federation to `config.num_server_rounds` rounds; returns its run directory, with
    ``report.html`` unless `write_report` is False.

    Any failure (too few replies, a bad config, an interrupted strategy) is written to ``metrics.json`` as
    ``status: failed`` and raised again, so the process exits non-zero.
    """
    run = open_run_directory(config)
    try:
        _run(grid, config, run, central_evaluator)
    except BaseException as error:
        run.fail(error)
        raise
    if write_report:
        try:
            log.info("report: %s", build_report(run.path))
        except Exception as error:  # noqa: BLE001 - the run and its model stand without the report
            log.warning("no report in %s: %s: %s", run.path, type(error).__name__, error)
    log.info("run directory: %s", run.path)
    return run


def open_run_directory(config: RunConfig) -> RunDirectory:
    """Create the run directory, or reopen the one named by run config `resume`; either signs its checkpoints and
    bundle with the coordinator's key (``server.signing_keys.run_signing``) and resumes only from checkpoints
    that key (or one it trusts) signed."""
    if config.resume:
        resume = Path(config.resume).expanduser().resolve()
        if config.run_dir and Path(config.run_dir).expanduser().resolve() != resume:
            raise ConfigError(f"run config 'run-dir' ({config.run_dir}) and 'resume' ({config.resume}) differ: a "
                              f"resumed run continues in its own directory; leave 'run-dir' empty")
        run = RunDirectory.resume(resume, config=config.to_flower(), must_match=RESUME_MUST_MATCH)
    else:
        path = Path(config.run_dir).expanduser().resolve() if config.run_dir else default_run_dir()
        run = RunDirectory.create(path, config=config.to_flower())
    try:
        run.use_signing(run_signing(config, run.path))
    except BaseException as error:
        run.fail(error)
        raise
    return run


class RoundRecorder:
    """Flower's `evaluate_fn`: called after each round; adds centralised evaluation and writes the round entry."""

    def __init__(self, run: RunDirectory, strategy: MammoStrategyMixin, model: torch.nn.Module,
                 evaluator: Callable[[torch.nn.Module], dict] | None):
        self.run, self.strategy, self.model, self.evaluator = run, strategy, model, evaluator
        self.last_central: dict | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:  # Flower's call before the first round: nothing trained yet
            return None
        rnd = server_round + self.strategy.round_offset
        train = self.strategy.train_metrics.get(rnd)
        entry = {
            "round": rnd,
            "train_loss": _number(train, "train-loss"),
            "epsilon_max": _number(train, "epsilon-max"),
            "replies": {kind: reports[rnd].to_json() for kind, reports in
                        (("train", self.strategy.train_reports), ("evaluate", self.strategy.evaluate_reports))
                        if rnd in reports},
        }
        secure = getattr(self.strategy, "secure_rounds", {}).get(rnd)
        if secure is not None:
            entry["secure_aggregation"] = secure
        federated = self.strategy.evaluate_metrics.get(rnd)
        if federated is not None:
            entry["federated_eval"] = eval_entry(federated)
        central = None
        if self.evaluator is not None:
            load_weights(self.model, {k: v.numpy() for k, v in arrays.items()}, source=f"round {rnd}")
            central = self.evaluator(self.model.eval())
            entry["centralised_eval"] = _summary(central)  # the histogram is kept for the final entry only
            self.last_central = {**central, "round": rnd}
        self.run.record_round(entry)
        self.run.set_privacy(self.strategy.privacy)  # each hospital's numbers, by its own policy's accountant
        if secure is not None:  # no per-hospital loss leaves a node under distributed noise
            log.info("round %d: secure sum of %d hospitals (noise multiplier %.3g), epsilon max %s", rnd,
                     secure["contributors"], secure["noise_multiplier_of_sum"], entry["epsilon_max"])
        else:
            log.info("round %d: train loss %s, epsilon max %s", rnd, entry["train_loss"], entry["epsilon_max"])
        if central is None:
            return None
        return MetricRecord({k: float(v) for k, v in central.items()
                             if isinstance(v, (int, float)) and not isinstance(v, bool)})


def _run(grid: Grid, config: RunConfig, run: RunDirectory,
         central_evaluator: CentralEvaluatorFactory | None) -> None:
    torch.manual_seed(config.seed)
    model = build_model(config.model_config())
    strategy = build_strategy(config, checkpoints=run.checkpoints)
    weights = exchanged_weights(model)
    done = 0
    if config.resume:
        checkpoint = run.checkpoints.latest()
        strategy.restore(checkpoint)
        load_weights(model, checkpoint.arrays, source=f"checkpoint round {checkpoint.round}")
        weights, done = checkpoint.arrays, checkpoint.round
        if not any(r["round"] == done for r in run.rounds):  # interrupted between aggregation and evaluation
            run.record_round(_entry_from_checkpoint(checkpoint))
        lost = run.checkpoints.lost_rounds()
        for rnd in lost:
            run.record_round(lost_round_entry(rnd))
        if lost:
            run.document["resumed"][-1]["lost_rounds"] = lost
            done = strategy.round_offset = lost[-1]
            log.warning("round(s) %s were interrupted before their checkpoint; hospitals may have spent budget on "
                        "them, so they are not trained again: continuing at round %d", lost, done + 1)
        log.info("resuming %s after round %d", run.path, done)
    evaluator = central_evaluator(config) if central_evaluator and config.sim_central_eval else None
    recorder = RoundRecorder(run, strategy, model, evaluator)
    remaining = config.num_server_rounds - done
    if remaining > 0:
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
            num_rounds=remaining,
            timeout=config.round_timeout,
            train_config=ConfigRecord({wire.RUN_KEY: run.run_key}),
            evaluate_config=ConfigRecord(),
            evaluate_fn=recorder,
        )
        weights = {k: v.numpy() for k, v in result.arrays.items()}
    else:
        log.warning("run already has %d rounds (num-server-rounds = %d): nothing to train",
                    done, config.num_server_rounds)
    load_weights(model, weights, source="final global model")
    if config.explain_method_names:
        run.document["explanations"] = _explanations(grid, weights, config)
        run.flush()
    point = release_operating_point(run.rounds, rule=config.operating_point, target=config.target_sensitivity)
    final = with_operating_point(_final(run, recorder, model, evaluator, config.num_server_rounds), point)
    last_round = max(done, config.num_server_rounds)
    save_bundle(run.bundle_path, exchanged_weights(model), BundleMeta(
        model_config=config.model_config(), preprocess_config=config.preprocess_config(), class_names=CLASS_NAMES,
        info={"run_dir": str(run.path), "round": last_round,
              "operating_point": point.to_json() if point is not None else None,
              "final": _summary(final), "versions": run.document["versions"]}),
        sign=run.bundle_signature(round=last_round))
    run.finish(final)


def _final(run: RunDirectory, recorder: RoundRecorder, model: torch.nn.Module,
           evaluator: Callable[[torch.nn.Module], dict] | None, last_round: int) -> dict:
    """The final metrics: held-out test set where there is one, else the last federated evaluation."""
    if recorder.last_central is not None:
        return {"source": "centralised-test", "class_names": list(CLASS_NAMES), **recorder.last_central}
    if evaluator is not None:
        return {"source": "centralised-test", "class_names": list(CLASS_NAMES), "round": last_round,
                **evaluator(model.eval())}
    for entry in reversed(run.rounds):
        if "federated_eval" in entry:
            return {"source": "federated", "class_names": list(CLASS_NAMES), "round": entry["round"],
                    **final_from_federated(entry["federated_eval"])}
    log.warning("the final model was not evaluated: no held-out test set and no federated evaluation")
    return {"source": "none", "class_names": list(CLASS_NAMES), "round": last_round,
            **{key: None for key in FINAL_METRICS},
            "note": "no held-out test set and no federated evaluation (fraction-evaluate = 0)"}


def _explanations(grid: Grid, weights: dict[str, np.ndarray], config: RunConfig) -> dict:
    """Federated explanations of the final model (``server.federated_explanations``); a failure is recorded,
    not raised: the trained model and its evaluation stand without them."""
    try:
        summary = request_explanations(grid, weights, config.explain_method_names, timeout=config.round_timeout)
    except Exception as error:  # noqa: BLE001 - recorded in the run directory and the log
        log.warning("federated explanations failed: %s: %s", type(error).__name__, error)
        return {"methods": list(config.explain_method_names), "error": f"{type(error).__name__}: {error}"}
    for method, rates in summary["per_method"].items():
        log.info("explanations (%d images): %s pointing game %s, mass inside %s, random baseline %s",
                 summary["images"], method, _fmt(rates["pointing_game"]), _fmt(rates["mass_inside"]),
                 _fmt(rates["random_baseline"]))
    return summary


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _summary(final: dict) -> dict:
    """An eval entry without its score histogram (600 counts: kept once, in the final metrics)."""
    return {k: v for k, v in final.items() if k != "score_histogram"}


def _entry_from_checkpoint(checkpoint) -> dict:
    """The round entry of a checkpointed round whose evaluation was interrupted (training numbers only)."""
    metrics = checkpoint.meta.get("train_metrics", {})
    report = checkpoint.meta.get("train_reports", {}).get(str(checkpoint.round))
    return {"round": checkpoint.round, "train_loss": metrics.get("train-loss"),
            "epsilon_max": metrics.get("epsilon-max"), "replies": {"train": report} if report else {},
            "note": "the run stopped before this round was evaluated"}


def lost_round_entry(rnd: int) -> dict:
    """The round entry of a round interrupted before its checkpoint (``CheckpointStore.lost_rounds``)."""
    return {"round": rnd, "lost": True, "train_loss": None, "epsilon_max": None, "replies": {},
            "note": "the coordinator stopped during this round, before its checkpoint: hospitals may have trained "
                    "it and spent budget on it, so it was not trained again"}


def _number(record: MetricRecord | None, key: str) -> float | None:
    if record is None or key not in record:
        return None
    return float(record[key])


app = make_server_app()
