"""Baselines for a simulated federation: the same model trained without federation, on the same splits.

Plain training over the project's own functions (``client.hospital_data`` for the data, ``client.training`` for
(DP-)SGD and evaluation, ``server.run_directory`` for the output): no second training loop. One baseline "round"
is what a hospital does in one federated round (``local-epochs`` epochs with the round's training config), so
``num-server-rounds`` rounds give every example as many passes as in the federation. Under distributed noise a
federated round is one DP-SGD step of all sampled hospitals' batches with noise sigma in the sum, so a baseline
round is one step of ``sites`` x ``batch-size`` expected examples with noise sigma (:func:`baseline_round_config`). Validation is scored per
hospital and aggregated exactly as the coordinator aggregates federated evaluation; the held-out test set is
scored directly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, Dataset

from client.hospital_data import HospitalData, load_hospital
from client.node import local_train_config
from client.training import LocalTrainConfig, evaluate_local, train_local
from common.bundle import BundleMeta, save_bundle
from common.device import default_device
from common.models import build_model
from common.privacy import DEFAULT_MECHANISM
from common.records import CLASS_NAMES
from common.run_config import NodeConfig, RunConfig
from common.weights import exchanged_weights
from server.checkpoints import Checkpoint
from server.run_directory import (
    RunDirectory,
    eval_entry,
    outcome_entry,
    release_operating_point,
    with_operating_point,
)

log = logging.getLogger(__name__)

_SCORES = ("auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision", "recall", "specificity",
           "f1_macro")


def load_hospitals(run: RunConfig, num_hospitals: int) -> list[HospitalData]:
    """Every virtual hospital's data, exactly as its simulated node loads it (same split, same caches)."""
    out = []
    for k in range(num_hospitals):
        node = NodeConfig.from_flower({"partition-id": k, "num-partitions": num_hospitals}, run=run)
        out.append(load_hospital(node, run))
    return out


def pooled(datasets: Sequence[Dataset]) -> Dataset:
    """One data set holding all of `datasets` (tensors concatenated where they are in-memory cell data sets)."""
    from common.models import CellDataset

    if datasets and all(isinstance(d, CellDataset) for d in datasets):
        return CellDataset(torch.cat([d.inputs for d in datasets]), torch.cat([d.labels for d in datasets]),
                           torch.cat([d.cell_targets for d in datasets]))
    return ConcatDataset(list(datasets))


def test_entry(model: torch.nn.Module, test: Dataset) -> dict:
    """A run-directory eval entry of `model` on the held-out test set."""
    return outcome_entry(evaluate_local(model, test, device=default_device()))


def validation_entry(model: torch.nn.Module, vals: Sequence[Dataset], *,
                     score_histogram: bool = False) -> dict | None:
    """Validation over the hospitals' splits, aggregated as federated evaluation is (None: no validation data);
    with `score_histogram`, as in the federation's last round (the operating point is chosen on it). Exact counts:
    a baseline is the researcher's own computation on pooled data, not a release by a hospital."""
    from client.app import evaluation_reply_metrics
    from client.node import exact_release
    from server.strategy import aggregate_evaluation

    records = []
    for val in vals:
        if len(val):
            outcome = evaluate_local(model, val, device=default_device())
            records.append(evaluation_reply_metrics(exact_release(outcome, score_histogram=score_histogram)))
    if not records:
        return None
    return eval_entry(aggregate_evaluation(records))


def baseline_round_config(run: RunConfig, *, server_round: int, sites: int) -> LocalTrainConfig:
    """One baseline round on data pooled from `sites` hospitals: what one federated round does (see module doc)."""
    config = local_train_config(run, server_round=server_round)
    if run.distributed_dp:
        return replace(config, epochs=1, max_steps=1, batch_size=run.batch_size * sites)
    return config


def train_baseline(run_dir: RunDirectory, run: RunConfig, *, train: Dataset, vals: Sequence[Dataset],
                   test: Dataset, privacy_name: str, info: dict[str, Any], sites: int = 1,
                   on_round: Callable[[dict], None] | None = None) -> dict:
    """Train `run.num_server_rounds` rounds on `train` (pooled from `sites` hospitals), recording each round in
    `run_dir`; returns final metrics."""
    torch.manual_seed(run.seed)
    model = build_model(run.model_config())
    accountant_state = None
    steps = 0
    privacy: dict[str, Any] = {}
    final: dict = {}
    for rnd in range(1, run.num_server_rounds + 1):
        outcome = train_local(model, train, config=baseline_round_config(run, server_round=rnd, sites=sites),
                              accountant_state=accountant_state, device=default_device())
        accountant_state = outcome.accountant_state
        steps += outcome.steps
        entry: dict[str, Any] = {"round": rnd, "train_loss": _number(outcome.train_loss),
                                 "epsilon_max": outcome.epsilon}
        validation = validation_entry(model, vals, score_histogram=rnd == run.num_server_rounds)
        if validation is not None:
            entry["federated_eval"] = validation
        test_metrics = test_entry(model, test)
        entry["centralised_eval"] = {k: v for k, v in test_metrics.items() if k != "score_histogram"}
        final = {"source": "centralised-test", "class_names": list(CLASS_NAMES), "round": rnd, **test_metrics}
        privacy = {privacy_name: {"epsilon": outcome.epsilon, "delta": outcome.delta,
                                  "noise_multiplier": outcome.noise_multiplier,
                                  "max_grad_norm": outcome.max_grad_norm, "steps": steps,
                                  "accountant": outcome.accountant or DEFAULT_MECHANISM, "dp": run.dp,
                                  "last_round": rnd}}
        run_dir.checkpoints.save(Checkpoint(round=rnd, arrays=exchanged_weights(model),
                                            meta={"privacy": privacy}))
        run_dir.record_round(entry)
        run_dir.set_privacy(privacy)
        log.info("%s round %d: train loss %s, test AUC malignant %s, epsilon %s", info.get("mode"), rnd,
                 _fmt(outcome.train_loss), _fmt(entry["centralised_eval"].get("auc_malignant")),
                 _fmt(outcome.epsilon))
        if on_round is not None:
            on_round(entry)
    point = release_operating_point(run_dir.rounds, rule=run.operating_point, target=run.target_sensitivity)
    final = with_operating_point(final, point)
    save_bundle(run_dir.bundle_path, exchanged_weights(model), BundleMeta(
        model_config=run.model_config(), preprocess_config=run.preprocess_config(), class_names=CLASS_NAMES,
        info={**info, "run_dir": str(run_dir.path), "round": run.num_server_rounds,
              "operating_point": point.to_json() if point is not None else None,
              "final": {k: v for k, v in final.items() if k != "score_histogram"},
              "versions": run_dir.document["versions"]}),
        sign=run_dir.bundle_signature(round=run.num_server_rounds))
    run_dir.finish(final)
    return final


def summarise_local(top: RunDirectory, documents: Sequence[dict], *, final: bool) -> None:
    """The local baseline's top-level document: per round and at the end, the mean over hospitals."""
    by_round: dict[int, list[dict]] = {}
    for document in documents:
        for entry in document["rounds"]:
            by_round.setdefault(entry["round"], []).append(entry)
    rounds = []
    for rnd in sorted(by_round):
        entries = by_round[rnd]
        if len(entries) < len(documents) and final:
            continue
        row: dict[str, Any] = {"round": rnd,
                               "train_loss": _mean([e.get("train_loss") for e in entries]),
                               "epsilon_max": _max([e.get("epsilon_max") for e in entries]),
                               "hospitals_done": len(entries)}
        row["centralised_eval"] = _mean_entry([e["centralised_eval"] for e in entries])
        vals = [e["federated_eval"] for e in entries if "federated_eval" in e]
        if vals:
            row["federated_eval"] = _mean_entry(vals)
        rounds.append(row)
    top.document["rounds"] = rounds
    privacy = {}
    for document in documents:
        privacy.update(document.get("privacy") or {})
    top.set_privacy(privacy)
    if final:
        finals = [d["final"] for d in documents]
        summary = _mean_entry(finals)
        summary.update(source="centralised-test, mean over hospitals' local models", class_names=list(CLASS_NAMES),
                       round=max(f.get("round", 0) for f in finals),
                       confusion_matrix_note="sum over the local models, each scored on the whole test set",
                       per_hospital={f"partition-{k}": {key: f.get(key) for key in (*_SCORES, "confusion_matrix")}
                                     for k, f in enumerate(finals)})
        top.finish(summary)
    else:
        top.flush()


def _mean_entry(entries: Sequence[dict]) -> dict:
    """Scalar metrics averaged (ignoring undefined ones), confusion matrices summed."""
    out: dict[str, Any] = {}
    for key in (*_SCORES, "eval_loss"):
        values = [e.get(key) for e in entries if key in e]
        if values:
            out[key] = _mean(values)
    matrices = [np.asarray(e["confusion_matrix"]) for e in entries if e.get("confusion_matrix") is not None]
    if matrices:
        out["confusion_matrix"] = np.sum(matrices, axis=0).astype(int).tolist()
    out["num_examples"] = sum(int(e.get("num_examples") or 0) for e in entries)
    return out


def _mean(values: Sequence) -> float | None:
    numbers = [float(v) for v in values if _finite(v)]
    return sum(numbers) / len(numbers) if numbers else None


def _max(values: Sequence) -> float | None:
    numbers = [float(v) for v in values if _finite(v)]
    return max(numbers) if numbers else None


def _number(value: float) -> float | None:
    return value if _finite(value) else None


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if _finite(value) else "n/a"


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
