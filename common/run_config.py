"""The typed run configuration of a federation and the typed node configuration of a hospital.

Flower hands every app a flat dict of kebab-case keys: the run config (experiment-wide; defaults in
``[tool.flwr.app.config]`` of ``pyproject.toml``, overridable with ``flwr run --run-config``) and the node config
(who a node is, where its data lives and its privacy policy: ``flower-supernode --node-config``; in simulation
Flower sets ``partition-id`` and ``num-partitions``). Each entry point reads them ONCE into the frozen objects
below and passes those down. Unknown keys and bad values raise :class:`ConfigError` naming the key.

Who owns which value:

- :class:`CoordinatorSettings`: how the coordinator runs the federation (rounds, sampling, aggregation, release);
- :class:`TrainingSettings`: the model and the local training every hospital is asked to do;
- :class:`SimulationSettings` (``sim-*``): how virtual hospitals are cut from mini-MIAS, and their policy;
- :class:`common.node_policy.NodePolicy`: the hospital's own privacy policy (budget, delta, accountant, limits),
  in its node config only. A run config can ask for less privacy than a node's policy allows; the node then
  refuses, naming the key. Keys that belong to the policy are refused in a run config.

:class:`RunConfig` is the run config as Flower hands it over: the three run sections together. Field ``foo_bar``
is run-config key ``foo-bar``; every default is declared once, here (``pyproject.toml`` repeats them for Flower, a
test keeps the two identical; the model, preprocessing and training dataclasses take theirs from here).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.node_policy import POLICY_KEYS, NodePolicy, PolicyError
from common.operating_point import RULES as OPERATING_POINT_RULES

MODEL_KINDS = ("cnn", "effnet_head", "effnet_finetune")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
AGGREGATIONS = ("mean", "trimmed-mean", "median", "krum")
PARTITION_SCHEMES = ("iid", "dirichlet", "tissue")
POOLINGS = ("classwise", "abnormal")
DP_MODES = ("auto", "local", "distributed")
#: ``common.update_encoding.ENCODINGS`` (a test keeps the two equal).
UPDATE_ENCODINGS = ("float32", "float16", "int8")
#: Explanation methods of ``common.explanations.METHODS`` (a test keeps the two equal; captum is not imported here).
EXPLANATION_METHODS = ("cell_scores", "grad_cam", "integrated_gradients", "occlusion")


class ConfigError(ValueError):
    """A run or node configuration value that cannot be used; the message names the key."""


def _opt(default: Any, doc: str, *, choices: tuple[str, ...] = (), low: float | None = None,
         high: float | None = None, low_open: bool = False, high_open: bool = False) -> Any:
    """A config field: default, one-line help, allowed values (choices or a numeric range)."""
    return field(default=default, metadata={"help": doc, "choices": choices, "low": low, "high": high,
                                            "low_open": low_open, "high_open": high_open})


@dataclass(frozen=True)
class CoordinatorSettings:
    """How the coordinator runs the federation: rounds, sampling, aggregation, what it releases and where."""

    num_server_rounds: int = _opt(3, "federated rounds in total (a resumed run continues up to this number)", low=1)
    strategy: str = _opt("fedavg", "server aggregation", choices=STRATEGIES)
    proximal_mu: float = _opt(0.01, "FedProx proximal term weight (strategy fedprox)", low=0.0)
    fedadam_eta: float = _opt(0.01, "FedAdam server learning rate", low=0.0, low_open=True)
    fedadam_beta_1: float = _opt(0.9, "FedAdam first-moment decay", low=0.0, high=1.0)
    fedadam_beta_2: float = _opt(0.99, "FedAdam second-moment decay", low=0.0, high=1.0)
    fedadam_tau: float = _opt(0.001, "FedAdam adaptivity (epsilon in the denominator)", low=0.0, low_open=True)
    fraction_train: float = _opt(1.0, "fraction of connected nodes asked to train each round", low=0.0,
                                 high=1.0, low_open=True)
    fraction_evaluate: float = _opt(1.0, "fraction of connected nodes asked to evaluate (0 = no federated "
                                    "evaluation)", low=0.0, high=1.0)
    min_nodes: int = _opt(2, "nodes that must be connected before a round starts (and the least sampled)", low=1)
    min_train_replies: int = _opt(2, "valid training replies a round needs, else the run fails", low=1)
    min_evaluate_replies: int = _opt(1, "evaluation replies a round needs, else the run fails", low=0)
    round_timeout: float = _opt(600.0, "seconds to wait for replies in each train/evaluate step",
                                low=0.0, low_open=True)
    max_update_norm: float = _opt(0.0, "reject a reply whose L2 distance to the global model exceeds this (0 = "
                                  "auto: what local DP-SGD can move, from lr, max-grad-norm, noise-multiplier, "
                                  "local-epochs, batch-size and the reply's num-examples; no bound with dp off)",
                                  low=0.0)
    aggregation: str = _opt("mean", "how valid updates are combined: mean (example-weighted, FedAvg), "
                            "trimmed-mean, median (per coordinate) or krum (the update closest to its "
                            "neighbours); all but mean ignore num-examples; dp-mode distributed needs mean",
                            choices=AGGREGATIONS)
    byzantine_nodes: int = _opt(1, "robust aggregation: hostile hospitals to tolerate per round (trimmed-mean "
                                "drops this many values at each end; krum's f)", low=0)
    seed: int = _opt(42, "seed for sampling, splits and partitions", low=0)
    operating_point: str = _opt("sensitivity", "how the released model's malignancy threshold is chosen on the "
                                "hospitals' validation data: sensitivity (highest threshold reaching "
                                "target-sensitivity) or youden", choices=OPERATING_POINT_RULES)
    target_sensitivity: float = _opt(0.9, "operating-point sensitivity: the malignancy sensitivity to reach",
                                     low=0.0, high=1.0, low_open=True)
    explain_methods: str = _opt("cell_scores,grad_cam", "after the last round every hospital explains the global "
                                "model on its validation images with these methods (comma-separated: cell_scores, "
                                "grad_cam, integrated_gradients, occlusion; empty = none); only localisation "
                                "counts return")
    dp_mode: str = _opt("auto", "where DP noise is added: local (each hospital noises its own update), distributed "
                        "(each adds a share, only the SecAgg+ sum carries noise-multiplier; one step per round), "
                        "auto (distributed when min-nodes >= 3, strategy is fedavg and aggregation mean)",
                        choices=DP_MODES)
    secagg_dropouts: int = _opt(1, "distributed mode: hospitals that may drop out of a round with the sum still "
                                "revealed (SecAgg+ threshold = sampled - this, at least 2)", low=0)
    evaluate_every: int = _opt(1, "federated evaluation every this many rounds (and always after the last "
                               "round); each one costs the hospitals privacy budget", low=1)
    run_dir: str = _opt("", "where the coordinator writes metrics, checkpoints and the model (empty = "
                        "runs/<UTC time>)")
    resume: str = _opt("", "run directory of an interrupted run to continue from its last checkpoint")
    signing_key: str = _opt("", "the coordinator's Ed25519 private key that signs checkpoints and the model "
                            "(mammofl-coordinator signing-key generate; empty = a key made in <run dir>/signing/)")


@dataclass(frozen=True)
class TrainingSettings:
    """The model and the local training every hospital is asked to do (a node's policy may refuse it)."""

    model: str = _opt("effnet_head", "model kind: cnn (trained end to end), effnet_head (frozen pretrained "
                      "features per cell + DP head), effnet_finetune (last blocks trainable)", choices=MODEL_KINDS)
    image_size: int = _opt(512, "preprocessed image side in pixels (a multiple of 32)", low=32, high=2048)
    top_k: int = _opt(2, "cells pooled into the image score (see pooling)", low=1)
    pooling: str = _opt("classwise", "cell scores -> image score: classwise (each class by its own top-k cells) "
                        "or abnormal (the top-k most abnormal cells)", choices=POOLINGS)
    feature_layer: str = _opt("block14", "effnet_head: frozen layer used as cell features (head or "
                              "block0..block15)")
    input_norm: bool = _opt(True, "effnet_head: standardise each image's feature map (per image, DP-safe)")
    finetune_from: int = _opt(15, "effnet_finetune: first trainable block", low=1, high=15)
    head_hidden: int = _opt(0, "cell head hidden channels (0 = linear head)", low=0)
    local_epochs: int = _opt(1, "local epochs per round", low=1)
    lr: float = _opt(0.05, "local SGD learning rate", low=0.0, low_open=True)
    cell_loss_weight: float = _opt(10.0, "weight of the per-cell lesion term of the loss (0 = image labels only)",
                                   low=0.0)
    batch_size: int = _opt(16, "expected batch size (Poisson sample rate = batch-size / train images)", low=1)
    val_fraction: float = _opt(0.2, "share of a hospital's patients kept for its validation split",
                               low=0.0, high=0.9)
    update_encoding: str = _opt("float32", "how trained weights travel to the coordinator: float32 (the weights), "
                                "float16 or int8 (the update, quantised; common.update_encoding); dp-mode local "
                                "only", choices=UPDATE_ENCODINGS)
    # ------------------------------------------------------------ differential privacy
    dp: bool = _opt(True, "train with DP-SGD (Opacus); false = plain SGD, no privacy guarantee")
    noise_multiplier: float = _opt(1.0, "DP-SGD noise multiplier (sigma)", low=0.0, low_open=True)
    max_grad_norm: float = _opt(1.0, "DP-SGD per-sample clipping norm", low=0.0, low_open=True)
    delta: float = _opt(1e-5, "DP delta the run asks epsilon to be reported at; each hospital accounts at the "
                        "smaller of this and its own policy's delta", low=0.0, high=1.0, low_open=True,
                        high_open=True)


@dataclass(frozen=True)
class SimulationSettings:
    """Virtual hospitals cut from mini-MIAS (``mammofl-sim``): their data, their disks and their policy."""

    sim_data_dir: str = _opt("", "mini-MIAS folder the virtual hospitals are cut from")
    sim_state_dir: str = _opt("", "root of the virtual hospitals' own disks (ledgers, caches)")
    sim_partition: str = _opt("iid", "how patients are spread over hospitals", choices=PARTITION_SCHEMES)
    sim_dirichlet_alpha: float = _opt(0.5, "label skew of the dirichlet scheme (small = more skewed)",
                                      low=0.0, low_open=True)
    sim_test_fraction: float = _opt(0.2, "share of patients held out for the centralised test set",
                                    low=0.0, high=0.9)
    sim_max_patients: int = _opt(0, "use only this many patients (0 = all; for quick runs)", low=0)
    sim_central_eval: bool = _opt(True, "evaluate the global model on the held-out test set every round")
    sim_budget_on_aggregate: bool = _opt(False, "virtual hospitals check their budget on the epsilon of the secure "
                                         "sum (trusting SecAgg+) instead of their own noise")
    sim_max_epsilon: float = _opt(10.0, "virtual hospitals' lifetime privacy budget (their policy's max-epsilon)",
                                  low=0.0, low_open=True)
    sim_max_attack_advantage: float = _opt(0.0, "release gate of a simulation: withhold the model "
                                           "(model.unreleased, exit 1) when a membership-inference attack's "
                                           "advantage exceeds this (0 = off)", low=0.0, high=1.0)


@dataclass(frozen=True)
class RunConfig(CoordinatorSettings, TrainingSettings, SimulationSettings):
    """The run config of one federation, identical for the coordinator and every hospital of one run."""

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_value(f.name, getattr(self, f.name), f)
        unknown = [m for m in self.explain_method_names if m not in EXPLANATION_METHODS]
        if unknown:
            raise ConfigError(f"run config 'explain-methods': unknown method(s) {unknown}; known: "
                              f"{', '.join(EXPLANATION_METHODS)}")
        if self.image_size % 32:
            raise ConfigError(f"run config 'image-size': must be a multiple of 32, got {self.image_size}")
        if self.feature_layer != "head" and not (self.feature_layer.startswith("block")
                                                  and self.feature_layer[5:].isdigit()
                                                  and 0 <= int(self.feature_layer[5:]) <= 15):
            raise ConfigError(f"run config 'feature-layer': must be head or block0..block15, "
                              f"got {self.feature_layer!r}")
        if self.min_train_replies > self.min_nodes:
            raise ConfigError(
                f"run config 'min-train-replies' ({self.min_train_replies}) exceeds 'min-nodes' "
                f"({self.min_nodes}): a round could start with fewer nodes than it needs replies")
        if self.min_evaluate_replies > self.min_nodes:
            raise ConfigError(
                f"run config 'min-evaluate-replies' ({self.min_evaluate_replies}) exceeds 'min-nodes' "
                f"({self.min_nodes})")
        if self.dp_mode == "distributed" and self.strategy != "fedavg":
            raise ConfigError(f"run config 'dp-mode' distributed trains by FedSGD over secure aggregation; "
                              f"'strategy' {self.strategy} is not available with it (use fedavg, or dp-mode local)")
        if self.aggregation != "mean":
            if self.dp_mode == "distributed":
                raise ConfigError(f"run config 'aggregation' {self.aggregation}: dp-mode distributed reveals only "
                                  f"the sum of the updates, so only mean is possible (use dp-mode local)")
            needed = 2 * self.byzantine_nodes + (3 if self.aggregation == "krum" else 1)
            if self.min_train_replies < needed:
                raise ConfigError(f"run config 'aggregation' {self.aggregation} with 'byzantine-nodes' "
                                  f"{self.byzantine_nodes} needs 'min-train-replies' >= {needed}, got "
                                  f"{self.min_train_replies}")
        if self.update_encoding != "float32" and self.distributed_dp:
            raise ConfigError(f"run config 'update-encoding' {self.update_encoding} applies to dp-mode local only: "
                              f"distributed noise travels as SecAgg+'s own quantised sum (set dp-mode local, or "
                              f"update-encoding float32)")
        if self.fraction_evaluate == 0.0 and self.min_evaluate_replies > 0:
            raise ConfigError("run config 'min-evaluate-replies' must be 0 when 'fraction-evaluate' is 0")

    # ------------------------------------------------------------ reading and writing
    @classmethod
    def from_flower(cls, values: Mapping[str, Any],
                    overrides: Mapping[str, Any] | None = None) -> RunConfig:
        """Read Flower's run config dict (kebab-case keys); missing keys take the defaults.

        `overrides` (same keys) win over `values`: in-process simulation hands the apps an empty run config.
        """
        merged = dict(values)
        merged.update(overrides or {})
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        kwargs = {}
        for key, value in merged.items():
            if key not in known:
                raise ConfigError(_unknown_key(key, known))
            kwargs[known[key].name] = _coerce("run config", key, value, known[key])
        return cls(**kwargs)

    def to_flower(self) -> dict[str, Any]:
        """The resolved config as Flower's flat dict (kebab-case keys)."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """Default value per kebab-case key (what `[tool.flwr.app.config]` holds)."""
        return {f.name.replace("_", "-"): f.default for f in fields(cls)}

    @classmethod
    def describe(cls) -> dict[str, str]:
        """One line of help per kebab-case key."""
        return {f.name.replace("_", "-"): f.metadata["help"] for f in fields(cls)}

    @classmethod
    def parse_assignments(cls, assignments: Iterable[str]) -> dict[str, Any]:
        """Turn command-line `key=value` strings into typed run-config overrides (errors name the key)."""
        known = {f.name.replace("_", "-"): f for f in fields(cls)}
        out: dict[str, Any] = {}
        for text in assignments:
            key, sep, raw = text.partition("=")
            key = key.strip()
            if not sep:
                raise ConfigError(f"expected key=value, got '{text}'")
            if key not in known:
                raise ConfigError(_unknown_key(key, known))
            out[key] = _parse_text(key, raw.strip(), known[key])
        return out

    def preprocess_config(self):
        """The preprocessing every site applies (common.preprocessing.PreprocessConfig)."""
        from common.preprocessing import PreprocessConfig

        return PreprocessConfig(size=self.image_size)

    def model_config(self):
        """The global model's configuration (common.models.ModelConfig)."""
        from common.models import ModelConfig

        return ModelConfig(kind=self.model, image_size=self.image_size, top_k=self.top_k, pooling=self.pooling,
                           feature_layer=self.feature_layer, input_norm=self.input_norm,
                           finetune_from=self.finetune_from, head_hidden=self.head_hidden)

    @property
    def explain_method_names(self) -> tuple[str, ...]:
        """`explain-methods` as a tuple of names (empty: no federated explanations)."""
        return tuple(m.strip() for m in self.explain_methods.split(",") if m.strip())

    @property
    def distributed_dp(self) -> bool:
        """Whether rounds use distributed noise over secure aggregation (``dp-mode``; auto: min-nodes >= 3,
        fedavg, mean aggregation)."""
        if not self.dp:
            return False
        return self.dp_mode == "distributed" or (self.dp_mode == "auto" and self.min_nodes >= 3
                                                 and self.strategy == "fedavg" and self.aggregation == "mean")

    def updated(self, **changes: Any) -> RunConfig:
        """A copy with some fields (python names) changed, validated again."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return RunConfig(**values)


@dataclass(frozen=True)
class NodeConfig:
    """Who a hospital node is, where its data and its own state live (resolved, absolute paths), and its policy.

    Node config keys: ``data-dir`` (images), ``manifest`` (CSV; absent for a mini-MIAS folder), ``state-dir``
    (privacy ledger and caches; must survive restarts) and the keys of the node's privacy policy
    (:class:`common.node_policy.NodePolicy`; ``max-epsilon`` is required on a deployed node). In simulation Flower
    adds ``partition-id`` and ``num-partitions``; the data is then run config ``sim-data-dir`` cut by patient, the
    state lives under ``sim-state-dir``, and the policy defaults come from the simulation's keys
    (``sim-max-epsilon``, ``sim-budget-on-aggregate``, ``secagg-dropouts``; TLS not required).
    """

    data_dir: Path
    state_dir: Path
    policy: NodePolicy
    manifest: Path | None = None
    partition_id: int | None = None
    num_partitions: int | None = None

    KEYS = ("data-dir", "manifest", "state-dir", "partition-id", "num-partitions", *POLICY_KEYS)

    @property
    def is_simulation(self) -> bool:
        return self.partition_id is not None

    @property
    def ledger_path(self) -> Path:
        return self.state_dir / "privacy-ledger.json"

    @property
    def cache_dir(self) -> Path:
        return self.state_dir / "cache"

    @classmethod
    def from_flower(cls, values: Mapping[str, Any], *, run: RunConfig) -> NodeConfig:
        """Read Flower's node config dict; a virtual hospital's policy defaults come from `run`'s sim-* keys."""
        unknown = [k for k in values if k not in cls.KEYS]
        if unknown:
            raise ConfigError(f"unknown node config key '{unknown[0]}'{_suggest(unknown[0], cls.KEYS)}")
        partition_id = _node_int(values, "partition-id")
        num_partitions = _node_int(values, "num-partitions")
        if (partition_id is None) != (num_partitions is None):
            raise ConfigError("node config 'partition-id' and 'num-partitions' go together")
        if partition_id is not None and not 0 <= partition_id < num_partitions:
            raise ConfigError(f"node config 'partition-id' must be in [0, {num_partitions}), got {partition_id}")
        if partition_id is None:
            data_dir = _node_path(values, "data-dir", required=True)
            state_dir = _node_path(values, "state-dir", required=True)
            policy_defaults = None
        else:
            data_dir = _node_path(values, "data-dir") or _run_path(run.sim_data_dir, "sim-data-dir")
            state_dir = _node_path(values, "state-dir") or (
                _run_path(run.sim_state_dir, "sim-state-dir") / f"hospital-{partition_id}")
            policy_defaults = {"max-epsilon": run.sim_max_epsilon, "require-tls": False,
                               "budget-on-aggregate": run.sim_budget_on_aggregate,
                               "secagg-max-dropouts": run.secagg_dropouts}
        try:
            policy = NodePolicy.from_node_config(values, defaults=policy_defaults)
        except PolicyError as error:
            raise ConfigError(str(error)) from None
        return cls(data_dir=data_dir, state_dir=state_dir, policy=policy, manifest=_node_path(values, "manifest"),
                   partition_id=partition_id, num_partitions=num_partitions)


# ---------------------------------------------------------------- checks
def _unknown_key(key: str, known: Iterable[str]) -> str:
    if key in POLICY_KEYS:
        return (f"run config '{key}' belongs to each hospital's own privacy policy (its node config), not to the "
                f"run; in a simulation set the virtual hospitals' policy with the sim-* keys")
    return f"unknown run config key '{key}'{_suggest(key, known)}"


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_of(f) -> type:
    default = f.default if f.default is not MISSING else None
    return type(default)


def _coerce(channel: str, key: str, value: Any, f) -> Any:
    kind = _type_of(f)
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{channel} '{key}': expected true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{channel} '{key}': expected an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{channel} '{key}': expected a number, got {value!r}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{channel} '{key}': {str(value)[:20]}... is out of range") from None
    if not isinstance(value, str):
        raise ConfigError(f"{channel} '{key}': expected a string, got {value!r}")
    return value


def _parse_text(key: str, raw: str, f) -> Any:
    kind = _type_of(f)
    try:
        if kind is bool:
            lowered = raw.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                raise ValueError
            return lowered in ("true", "1", "yes", "on")
        if kind is int:
            return int(raw)
        if kind is float:
            return float(raw)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise ConfigError(f"run config '{key}': expected {expected}, got '{raw}'") from None
    return raw.strip("'\"")


def _check_value(name: str, value: Any, f) -> None:
    key = name.replace("_", "-")
    _coerce("run config", key, value, f)
    meta = f.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"run config '{key}': must be one of {', '.join(meta['choices'])}; got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not _finite(value):
            raise ConfigError(f"run config '{key}': must be finite, got {str(value)[:20]!r}")
        low, high = meta["low"], meta["high"]
        if low is not None and (value < low or (meta["low_open"] and value == low)):
            bound = ">" if meta["low_open"] else ">="
            raise ConfigError(f"run config '{key}': must be {bound} {low}, got {value!r}")
        if high is not None and (value > high or (meta["high_open"] and value == high)):
            bound = "<" if meta["high_open"] else "<="
            raise ConfigError(f"run config '{key}': must be {bound} {high}, got {value!r}")


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int beyond float range
        return False


def _node_int(values: Mapping[str, Any], key: str) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"node config '{key}': expected an integer, got {value!r}")
    return value


def _node_path(values: Mapping[str, Any], key: str, *, required: bool = False) -> Path | None:
    value = values.get(key)
    if value is None or value == "":
        if required:
            raise ConfigError(f"node config '{key}' is required for a hospital node "
                              f"(flower-supernode --node-config \"{key}='/path'\")")
        return None
    if not isinstance(value, str):
        raise ConfigError(f"node config '{key}': expected a path string, got {value!r}")
    return _resolved("node config", key, value)


def _resolved(channel: str, key: str, value: str) -> Path:
    """An absolute path; a NUL byte or an unknown ``~user`` is a config error naming the key."""
    if "\0" in value:
        raise ConfigError(f"{channel} '{key}': a path cannot contain a NUL byte")
    try:
        return Path(value).expanduser().resolve()
    except (RuntimeError, OSError, ValueError) as error:
        raise ConfigError(f"{channel} '{key}': cannot resolve path {value[:60]!r} ({error})") from None


def _run_path(value: str, key: str) -> Path:
    if not value:
        raise ConfigError(f"run config '{key}' is required in simulation")
    return _resolved("run config", key, value)
