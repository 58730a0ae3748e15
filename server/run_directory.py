"""The run directory every federation writes: the contract read by reports, notebooks and `mammofl-sim`.

Layout::

    <run dir>/
      metrics.json        rewritten atomically after every round and at the end (below)
      checkpoints/        round-NNNN.npz (+ .sig), one per completed round (server.checkpoints)
      started-rounds/     started-NNNN, an empty marker per round whose training instructions went out
      model.mammofl       the final model bundle (common.bundle; loadable without Flower)
      model.mammofl.sig   its signature (common.signing): provenance and the coordinator's Ed25519 signature
      signing/            only where run config signing-key is empty: the key made for this run
                          (server.signing_keys; signing/trusted.pub verifies the bundle)

``metrics.json``::

    {
      "format": "mammofl-run/1",
      "status": "running" | "completed" | "failed",
      "error": null | "<why the run failed>",
      "rounds": [ {"round": 1, "train_loss": 0.71, "epsilon_max": 1.9,
                   "replies": {"train": {sampled, valid, refused, rejected, failed, duplicate,
                                         missing, notes},
                               "evaluate": {...}},
                   "federated_eval": {"num_examples": ..., "eval_loss": ..., "<metric>": ...,
                                      "confusion_matrix": [[...]], "score_histogram"?: {...} (last round)},
                   "centralised_eval": {... same keys, only where a held-out test set is configured}}, ...],
      "final": {"source": "centralised-test" | "federated", "round": N, "class_names": [...],
                "auc_malignant", "auc_benign_vs_malignant", "accuracy", "precision", "recall", "specificity",
                "f1_macro", "confusion_matrix": [[...]] (rows = true class, columns = arg-max class, class_names
                order), "score_histogram": {bins, class_names, counts} (common.operating_point.ScoreHistogram),
                "operating_point": null | {threshold, rule, target, sensitivity, specificity, source} (chosen on
                the hospitals' validation histograms of the last round), "at_operating_point": {threshold,
                confusion_matrix, accuracy, precision, recall, sensitivity, specificity, f1_macro}: the decisions
                the released model makes},
      "privacy": {"<hospital>": {"epsilon", "delta", "noise_multiplier", "max_grad_norm", "steps",
                                 "accountant", "dp", "last_round", "refusals"?, "max_epsilon"?}},
      "explanations": {"methods", "images", "hospitals": {name: {"images"} | {"error"}}, "per_method": {method:
                       {"pointing_game", "mass_inside", "random_baseline"}}, "notes", "asked"}
                      (server.federated_explanations; only where run config explain-methods is set),
      "membership_inference": {"advantage", "auc", "members", "non_members", "seed", "chance_advantage_95",
                               "attack_names", "attacks": {name: {advantage, auc, threshold, tpr, fpr, ...}},
                               "gate": {"max_attack_advantage", "enabled", "passed", "model"?}} | {"error", "gate"}
                              (simulations only: common.membership_inference on the released model, members vs
                              held-out; a local baseline's top level: "per_hospital", largest advantage and auc),
      "config": {<resolved run config, kebab-case keys>},
      "versions": {"python", "torch", "flwr", "opacus", "mammo-fl"},
      "resumed": [{"from_round": k, "at": "<UTC time>", "lost_rounds"?: [...]}],
      "run_key": "<32 hex digits>",
      "signing": {"key": "<fingerprint>", "public_key": "<trusted.pub hospitals verify with>",
                  "generated": true | false, "trusted": ["<fingerprint>", ...]}
    }

``run_key`` names the run across coordinator restarts (a Flower run id does not survive them: a resumed run is a
new Flower run). It is sent with every training instruction; a node records it with each round in its privacy
ledger and never trains the same (run key, round) twice. A round entry of a round lost to an interruption
(``server.checkpoints``) reads ``{"round": k, "lost": true, "note": ...}``.

Metric names use snake_case (``eval_loss``, ``auc_malignant``); numbers that are NaN or infinite are written as
null (JSON has no NaN). Hospitals are named ``partition-<k>`` (simulation) or ``node-<flower node id>``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import json
import logging
import math
import os
import platform
import tempfile
import uuid
from pathlib import Path
from collections.abc import Mapping
from typing import Any

import numpy as np

from common import wire
from common.metrics import classification_metrics
from common.operating_point import (
    BINS,
    OperatingPoint,
    ScoreHistogram,
    choose_operating_point,
    confusion_at,
    counts_at,
)
from common.operating_point import auc as histogram_auc
from common.records import CLASS_NAMES
from server.checkpoints import CheckpointStore

log = logging.getLogger(__name__)

FORMAT = "mammofl-run/1"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
BUNDLE_FILE = "model.mammofl"


class RunDirectoryError(RuntimeError):
    """The run directory cannot be created or resumed as asked."""


class RunDirectory:
    """One run's folder and its ``metrics.json`` document, kept in memory and flushed atomically."""

    def __init__(self, path: Path, document: dict):
        self.path = Path(path)
        self.document = document
        self.checkpoints = CheckpointStore(self.path / CHECKPOINT_DIR)
        self.signing = None  # server.signing_keys.RunSigning, set by use_signing

    def use_signing(self, signing) -> None:
        """Sign checkpoints (and, through :attr:`signing`, the bundle) with `signing`
        (``server.signing_keys.RunSigning``); checkpoints load only when signed by its trusted keys."""
        self.signing = signing
        self.checkpoints.signer, self.checkpoints.trusted = signing.signer, signing.trusted
        self.document["signing"] = signing.describe()
        self.flush()

    def bundle_signature(self, *, round: int):
        """The `sign` hook of ``common.bundle.save_bundle`` for this run's bundle: a run releases signed models
        only."""
        if self.signing is None:
            raise RunDirectoryError(f"{self.path}: no signing key set (RunDirectory.use_signing): a model is "
                                    f"released signed or not at all")
        from common.signing import epsilon_by_hospital

        return self.signing.signer.for_file(kind="bundle", round=round,
                                            epsilon=epsilon_by_hospital(self.document.get("privacy") or {}))

    # ------------------------------------------------------------ opening
    @classmethod
    def create(cls, path: Path, *, config: dict[str, Any]) -> RunDirectory:
        """A new run directory; refuses to overwrite a directory that already holds a run."""
        path = Path(path)
        if (path / METRICS_FILE).exists() or (path / CHECKPOINT_DIR).exists():
            raise RunDirectoryError(f"{path} already holds a run; choose another run-dir or resume it "
                                    f"(run config resume='{path}')")
        path.mkdir(parents=True, exist_ok=True)
        document = {"format": FORMAT, "status": "running", "error": None, "rounds": [], "final": None,
                    "privacy": {}, "config": dict(config), "versions": versions(), "resumed": [],
                    "run_key": uuid.uuid4().hex}
        run = cls(path, document)
        run.flush()
        return run

    @classmethod
    def resume(cls, path: Path, *, config: dict[str, Any], must_match: tuple[str, ...] = ()) -> RunDirectory:
        """Reopen an interrupted run: rounds after its last checkpoint are dropped (they will be run again).

        `must_match`: config keys that cannot change across a resume (e.g. the model); a difference raises.
        """
        path = Path(path)
        metrics = path / METRICS_FILE
        if not metrics.exists():
            raise RunDirectoryError(f"cannot resume {path}: no {METRICS_FILE} (is this a run directory?)")
        document = json.loads(metrics.read_text())
        if document.get("format") != FORMAT:
            raise RunDirectoryError(f"cannot resume {path}: format {document.get('format')!r}, expected {FORMAT}")
        run = cls(path, document)
        last = run.checkpoints.rounds()
        if not last:
            raise RunDirectoryError(f"cannot resume {path}: it has no checkpoint yet (start it again instead)")
        changed = [k for k in must_match if document["config"].get(k) != config.get(k)]
        if changed:
            k = changed[0]
            raise RunDirectoryError(f"cannot resume {path} with run config '{k}' = {config.get(k)!r}: the run "
                                    f"was made with {document['config'].get(k)!r}")
        document["rounds"] = [r for r in document["rounds"] if r["round"] <= last[-1]]
        document["resumed"].append({"from_round": last[-1], "at": _now()})
        document.setdefault("run_key", uuid.uuid4().hex)  # a run written before run keys existed
        document.update(status="running", error=None, final=None, config=dict(config), versions=versions())
        run.flush()
        return run

    # ------------------------------------------------------------ updating
    @property
    def rounds(self) -> list[dict]:
        return self.document["rounds"]

    def record_round(self, entry: dict) -> None:
        """Add or replace the entry of `entry["round"]` and flush."""
        rounds = [r for r in self.rounds if r["round"] != entry["round"]]
        rounds.append(entry)
        self.document["rounds"] = sorted(rounds, key=lambda r: r["round"])
        self.flush()

    def set_privacy(self, privacy: dict[str, dict]) -> None:
        self.document["privacy"] = {k: dict(v) for k, v in sorted(privacy.items())}
        self.flush()

    def set_membership_inference(self, section: dict) -> None:
        """The ``membership_inference`` section (aggregates only: never a per-example loss)."""
        self.document["membership_inference"] = dict(section)
        self.flush()

    def finish(self, final: dict) -> None:
        self.document.update(status="completed", final=final, error=None)
        self.flush()

    def fail(self, error: BaseException) -> None:
        self.document.update(status="failed", error=f"{type(error).__name__}: {error}")
        self.flush()

    @property
    def run_key(self) -> str:
        return str(self.document["run_key"])

    @property
    def bundle_path(self) -> Path:
        return self.path / BUNDLE_FILE

    def flush(self) -> None:
        """Write ``metrics.json`` atomically."""
        text = json.dumps(_jsonable(self.document), indent=2, allow_nan=False)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".metrics.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path / METRICS_FILE)
        finally:
            Path(tmp).unlink(missing_ok=True)


def eval_entry(metrics: Mapping[str, Any]) -> dict:
    """A run-directory eval entry from aggregated wire metrics: snake_case names, counts as a confusion matrix."""
    entry: dict[str, Any] = {}
    n = len(CLASS_NAMES)
    matrix = [[0] * n for _ in range(n)]
    has_matrix = False
    for key, value in metrics.items():
        cell = wire.confusion_cell(key)
        if cell is not None:
            matrix[cell[0]][cell[1]] = int(value)
            has_matrix = True
        elif key == wire.NUM_EXAMPLES:
            entry["num_examples"] = int(value)
        elif key == wire.SCORE_HISTOGRAM:
            entry["score_histogram"] = ScoreHistogram.from_flat(value).to_json()
        else:
            entry[key.replace("-", "_")] = value
    if has_matrix:
        entry["confusion_matrix"] = matrix
    return entry


def outcome_entry(outcome) -> dict:
    """A run-directory eval entry from a `common.evaluation.EvalOutcome` (e.g. a held-out test evaluation)."""
    metrics = {k: v for k, v in outcome.metrics.items() if k not in ("class_order", "n")}
    return {"num_examples": outcome.num_examples, "eval_loss": outcome.loss, **metrics,
            "score_histogram": outcome.score_histogram.to_json()}


def final_from_federated(entry: Mapping[str, Any]) -> dict:
    """Final metrics from a federated eval entry: exact ones from the pooled confusion matrix, AUCs as the
    example-weighted mean of the hospitals' AUCs (per-image scores never leave a hospital, so no pooled AUC)."""
    out = {k: entry.get(k) for k in ("auc_malignant", "auc_benign_vs_malignant")}
    if entry.get("confusion_matrix") is not None:
        out.update(metrics_from_confusion(entry["confusion_matrix"]))
    else:
        out.update({k: entry.get(k) for k in ("accuracy", "precision", "recall", "specificity", "f1_macro")},
                   confusion_matrix=None)
    out["auc_source"] = "mean of hospitals' AUCs weighted by their validation images"
    if entry.get("score_histogram") is not None:  # the pooled histogram gives the pooled malignancy AUC
        out["score_histogram"] = entry["score_histogram"]
        out["auc_malignant"] = histogram_auc(ScoreHistogram.from_json(entry["score_histogram"]))
        out["auc_source"] = ("auc_malignant from the pooled validation score histogram (ties within a bin of "
                             f"{1 / BINS:g} count one half); auc_benign_vs_malignant: mean of hospitals' AUCs "
                             "weighted by their validation images")
    return out


def release_operating_point(rounds: list[dict], *, rule: str, target: float) -> OperatingPoint | None:
    """The operating point chosen on the latest validation score histogram of `rounds` (the hospitals' pooled
    validation splits; never the test set), or None when there is none or it cannot choose (one class only)."""
    for entry in reversed(rounds):
        data = (entry.get("federated_eval") or {}).get("score_histogram")
        if data is None:
            continue
        histogram = ScoreHistogram.from_json(data)
        try:
            return choose_operating_point(histogram, rule=rule, target=target,
                                          source=f"validation splits of the hospitals, round {entry['round']} "
                                                 f"({histogram.total} images)")
        except ValueError as error:
            log.warning("no operating point: %s", error)
            return None
    return None


def with_operating_point(final: dict, point: OperatingPoint | None) -> dict:
    """`final` plus ``operating_point`` and, where it has a score histogram, ``at_operating_point``: the decision
    metrics at the threshold (confusion matrix, accuracy, precision, recall = sensitivity, specificity, f1)."""
    out = dict(final)
    out["operating_point"] = point.to_json() if point is not None else None
    data = final.get("score_histogram")
    if point is not None and data is not None:
        histogram = ScoreHistogram.from_json(data)
        counts = counts_at(histogram, point.threshold)
        out["at_operating_point"] = {"threshold": point.threshold,
                                     **metrics_from_confusion(confusion_at(histogram, point.threshold)),
                                     "sensitivity": counts.sensitivity}
    return out


def metrics_from_confusion(matrix: list[list[int]]) -> dict:
    """accuracy, precision, recall, specificity, f1_macro of a confusion matrix, as `common.metrics` defines them.

    The matrix is expanded back into (true, predicted) pairs and scored with one-hot probabilities, so every
    definition is exactly the one used everywhere else (AUCs need scores and are not derived here).
    """
    counts = np.asarray(matrix, dtype=np.int64)
    true = np.repeat(np.repeat(np.arange(len(CLASS_NAMES)), len(CLASS_NAMES)), counts.reshape(-1))
    predicted = np.repeat(np.tile(np.arange(len(CLASS_NAMES)), len(CLASS_NAMES)), counts.reshape(-1))
    scored = classification_metrics(true, np.eye(len(CLASS_NAMES))[predicted])
    return {k: scored[k] for k in ("accuracy", "precision", "recall", "specificity", "f1_macro",
                                   "confusion_matrix")}


def load_metrics(path: Path) -> dict:
    """The ``metrics.json`` of a run directory."""
    return json.loads((Path(path) / METRICS_FILE).read_text())


def default_run_dir(root: Path = Path("runs")) -> Path:
    """``runs/<UTC time>``: the run directory when run config ``run-dir`` is empty."""
    return (root / dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")).resolve()


def versions() -> dict[str, str]:
    """Versions that decide a run's numbers."""
    out = {"python": platform.python_version()}
    for dist in ("torch", "flwr", "opacus", "mammo-fl"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
