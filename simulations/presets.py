"""Named simulation presets: a number of virtual hospitals plus overrides of the run config.

A preset is data, not code: :class:`Preset` holds kebab-case run-config overrides (keys of
:class:`common.run_config.RunConfig`) and the number of hospitals. :func:`resolve` applies a preset, then the
researcher's ``--set key=value`` overrides, and returns a validated :class:`SimulationConfig`. Keys accepted by
``--set``: every run-config key plus ``num-hospitals``; an unknown key or a bad value raises
:class:`~common.run_config.ConfigError` naming the key.

Unless set explicitly, ``min-nodes`` and ``min-train-replies`` are the number of hospitals (every virtual
hospital is alive, so a missing reply is a failure), and ``min-evaluate-replies`` too when federated evaluation
is on.

Presets:

- ``smoke``: seconds of work (plus Flower's start-up). 2 hospitals, 1 round, the small CNN on 64-px images of
  16 patients, DP on.
- ``demo``: what ``make demo`` runs. 3 hospitals, all of mini-MIAS, DP on, the lesion-aware frozen-feature model
  ``effnet_head`` with the run config's model defaults (EfficientNet-Lite0 block-14 features, 192 channels per
  32-px cell, standardised per image, classwise top-2 pooling); distributed noise over SecAgg+ (FedSGD): 80 rounds
  of one DP-SGD step, batch 20 per hospital, lr 1, noise multiplier 1.75 in the sum: epsilon 7.51 at delta 1e-5 per
  hospital for the sum. Simulated hospitals do not drop out, so the sum waits for all three shares (threshold 3,
  ``secagg-dropouts`` 0: each adds 1.75 / sqrt(3)); a share alone gives epsilon 17.6. The virtual hospitals opt
  in to the secure-aggregation assumption (``sim-budget-on-aggregate``), so the default budget of 10 holds.
- ``full``: the demo's settings for 160 rounds at noise multiplier 2.4 (epsilon about 7.2 for the sum).
- ``walkthrough``: what ``notebooks/mammofl_walkthrough.ipynb`` runs: the demo's settings on 64 patients (a
  quarter held out for testing) for 12 rounds; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from common.run_config import ConfigError, RunConfig

#: How a simulation trains: a federation, or one of its two baselines (see ``simulations.run``).
MODES = ("federated", "centralised", "local")
#: Simulation-only key accepted by ``--set`` besides the run-config keys.
NUM_HOSPITALS = "num-hospitals"
#: Run-config keys filled from the command line (data, output, resume), never from a preset.
RESERVED_KEYS = ("sim-data-dir", "sim-state-dir", "run-dir", "resume")
_DERIVED_MINIMUMS = ("min-nodes", "min-train-replies", "min-evaluate-replies")


@dataclass(frozen=True)
class Preset:
    """A named starting point: how many hospitals, and which run-config values differ from the defaults."""

    name: str
    description: str
    num_hospitals: int
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "overrides", MappingProxyType(dict(self.overrides)))


@dataclass(frozen=True)
class SimulationConfig:
    """Everything a simulation needs besides paths: the hospitals and the resolved run config."""

    preset: str
    num_hospitals: int
    run: RunConfig

    def to_dict(self) -> dict[str, Any]:
        """Flat, JSON-friendly view (run-config keys plus ``num-hospitals`` and ``preset``)."""
        return {"preset": self.preset, NUM_HOSPITALS: self.num_hospitals, **self.run.to_flower()}


#: The demo's model, privacy and data settings; `full` runs them for longer.
_DEMO_OVERRIDES: Mapping[str, Any] = MappingProxyType({
    "num-server-rounds": 80,
    "model": "effnet_head",
    "image-size": 512,
    "local-epochs": 1,
    "lr": 1.0,
    "batch-size": 20,
    "dp": True,
    "dp-mode": "distributed",
    "secagg-dropouts": 0,
    "noise-multiplier": 1.75,
    "sim-budget-on-aggregate": True,
    "max-grad-norm": 1.0,
    "sim-partition": "iid",
    "sim-test-fraction": 0.2,
    "val-fraction": 0.2,
    "round-timeout": 600.0,
    "evaluate-every": 10,
})

PRESETS: Mapping[str, Preset] = MappingProxyType({p.name: p for p in (
    Preset(
        name="smoke",
        description="seconds: 2 hospitals, 1 round, small CNN on 64-px images of 16 patients, DP on",
        num_hospitals=2,
        overrides={
            "num-server-rounds": 1,
            "model": "cnn",
            "image-size": 64,
            "sim-max-patients": 16,
            "sim-test-fraction": 0.25,
            "val-fraction": 0.25,
            "batch-size": 4,
            "local-epochs": 1,
            "dp": True,
            "noise-multiplier": 1.0,
            "round-timeout": 300.0,
        },
    ),
    Preset(
        name="demo",
        description="make demo: 3 hospitals, DP on, lesion-aware frozen EfficientNet-Lite0 features + DP head, "
                    "all of mini-MIAS, under 10 minutes on 2 CPU cores",
        num_hospitals=3,
        overrides=_DEMO_OVERRIDES,
    ),
    Preset(
        name="full",
        description="the demo's model and privacy settings for twice as long: 160 rounds, noise multiplier 2.4 "
                    "(epsilon about 7.2)",
        num_hospitals=3,
        overrides={**_DEMO_OVERRIDES, "num-server-rounds": 160, "noise-multiplier": 2.4, "round-timeout": 1800.0},
    ),
    Preset(
        name="walkthrough",
        description="the walkthrough notebook: the demo's model and privacy settings on 64 patients for 12 rounds, "
                    "minutes on 2 CPU cores",
        num_hospitals=3,
        overrides={**_DEMO_OVERRIDES, "num-server-rounds": 12, "sim-max-patients": 64, "sim-test-fraction": 0.25,
                   "round-timeout": 300.0},
    ),
)})


def preset(name: str) -> Preset:
    """The preset called `name`; an unknown name raises ConfigError listing the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'{_suggest(name, PRESETS)}; known presets: "
                          f"{', '.join(PRESETS)}") from None


def parse_sets(assignments: Iterable[str]) -> dict[str, Any]:
    """Typed overrides from ``key=value`` strings: run-config keys and ``num-hospitals`` (errors name the key)."""
    assignments = list(assignments)
    out: dict[str, Any] = {}
    run_texts = []
    for text in assignments:
        key, sep, raw = text.partition("=")
        if sep and key.strip() == NUM_HOSPITALS:
            try:
                out[NUM_HOSPITALS] = int(raw.strip())
            except ValueError:
                raise ConfigError(f"'{NUM_HOSPITALS}': expected an integer, got '{raw.strip()}'") from None
        elif sep and key.strip() not in RunConfig.defaults():
            known = [*RunConfig.defaults(), NUM_HOSPITALS]
            raise ConfigError(f"unknown key '{key.strip()}'{_suggest(key.strip(), known)}: --set takes run "
                              f"config keys or '{NUM_HOSPITALS}' (see `mammofl-sim keys`)")
        else:
            run_texts.append(text)
    out.update(RunConfig.parse_assignments(run_texts))
    return out


def resolve(name: str, sets: Iterable[str] | Mapping[str, Any] = (), *,
            paths: Mapping[str, str] | None = None) -> SimulationConfig:
    """Preset `name`, then `sets` (``key=value`` strings or an already-typed mapping), then `paths`.

    `paths` holds the reserved keys (``sim-data-dir``, ``sim-state-dir``, ``run-dir``, ``resume``) that come from
    command-line options; `sets` may not touch them.
    """
    base = preset(name)
    overrides = dict(sets) if isinstance(sets, Mapping) else parse_sets(sets)
    reserved = sorted(set(overrides) & set(RESERVED_KEYS))
    if reserved:
        raise ConfigError(f"'{reserved[0]}' is set from the command line (--data-dir, --out, --resume), "
                          f"not with --set")
    num_hospitals = overrides.pop(NUM_HOSPITALS, base.num_hospitals)
    if isinstance(num_hospitals, bool) or not isinstance(num_hospitals, int) or num_hospitals < 1:
        raise ConfigError(f"'{NUM_HOSPITALS}': must be an integer >= 1, got {num_hospitals!r}")
    values: dict[str, Any] = dict(base.overrides)
    values.update(overrides)
    fraction_evaluate = values.get("fraction-evaluate", RunConfig.defaults()["fraction-evaluate"])
    for key in _DERIVED_MINIMUMS:
        if key not in values:
            values[key] = 0 if key == "min-evaluate-replies" and fraction_evaluate == 0 else num_hospitals
    values.update(paths or {})
    run = RunConfig.from_flower({}, values)
    if run.min_nodes > num_hospitals:
        raise ConfigError(f"run config 'min-nodes' ({run.min_nodes}) exceeds '{NUM_HOSPITALS}' "
                          f"({num_hospitals}): the federation would wait forever for hospitals that do not exist")
    return SimulationConfig(preset=base.name, num_hospitals=num_hospitals, run=run)


def _suggest(key: str, known: Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
