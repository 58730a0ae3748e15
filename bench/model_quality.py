"""How well does the model learn malignancy on mini-MIAS with DP, centralised and federated? Seeds x CV folds.

Protocol (that of the independent reference in the federated-training issue): patient-level k-fold CV
(`common.splits.kfold_patients`, stratified by worst label), every patient tested exactly once per training
seed; the test predictions of all folds are pooled into one malignancy AUC per seed; a row gives the mean ±
standard ERROR over seeds. The folds depend on the training seed (each seed re-draws them, so the spread over
seeds includes the choice of folds); every row uses the same folds for a given seed. Inside a seed, every fold
has its own seed ``fold_seed(seed, fold) = seed * 1000 + fold``: it seeds the model's initial weights, the cut
into hospitals and all sampling and noise, and it is the same for every row, so rows are paired by seed
(the "Δ" column is the mean ± s.e. of the per-seed differences to the centralised row at the same epsilon).

Rows (model: the `demo` preset's, `--set` overrides it; all DP rows: clip 1, RDP accountant, delta 1e-5):

- ``logreg``: global-average-pooled frozen EfficientNet-Lite0 head features + logistic regression (the
  reference's "pooled features do not see lesions" baseline);
- ``no DP``: the cell model trained centrally with `client.training.train_local`, DP off, same schedule;
- ``centralised``: one site holds all training folds: DP-SGD with `train_local` for ``--rounds`` steps at
  Poisson rate q = 1 / ``--steps-per-epoch`` (expected batch about N q: 65 of 258 training images at q 1/4);
- ``local noise``: FedSGD (`bench.fedsgd`) over n IID hospitals cut by patient from the training folds
  (`common.partitioning.partition_patients`), one DP-SGD step per hospital per round at the same rate q, each
  adding the full sigma (`dp-mode` local);
- ``distributed noise``: the same, each hospital adding sigma / sqrt(n), so that only the sum carries sigma
  (secure aggregation, no dropouts);
- ``FedSGD, no DP``: the same FedSGD without noise and without clipping (the federated reference);
- ``each hospital alone``: the n hospitals never federate: each trains its own model on its own share with
  `train_local` (DP-SGD at the same rate q and sigma, or DP off), each model scores every test image; the row's
  AUC for a seed is the mean over hospitals of each hospital's pooled AUC (what a hospital gets without the
  federation).

Every row at epsilon e uses the same sigma: the noise multiplier for which (sigma, q, rounds) gives epsilon e
(`calibrate_noise`). For centralised and local noise that is each hospital's own epsilon; for distributed noise it
is the epsilon of the revealed sum, and the column "ε share" gives what one hospital's share alone would give. The
federated rows have the centralised row's number of steps, sample rate, total expected batch (n hospitals x
N q / n) and sigma, so at the same epsilon distributed noise is, in distribution, the centralised step with per-site
Poisson sampling. The centralised row does not depend on n. Federated rows run `bench.fedsgd`'s ``fast`` engine
by default (the same computation as `train_local` per hospital and round, checked in the tests); ``--engine
train_local`` runs the project's code itself (about 0.2 s per hospital and round).

Frozen features and preprocessed images are cached under ``--cache-dir``. ``--out DIR`` writes
``model_quality.json`` (settings and per-seed AUCs, rewritten after every row) and ``model_quality.png``
(AUC against epsilon, one line per mode and hospital count, error bars one standard error).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from opacus.accountants.utils import get_noise_multiplier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Subset

from bench.fedsgd import ENGINES, FedSGDConfig, constant_epsilon, fedsgd, site_batch_size
from client.feature_cache import FeatureCache
from client.hospital_data import PreparedImage, labelled_image, preprocess_records
from client.preprocess_cache import PreprocessCache
from client.readers.mias import read_mias_records
from client.training import DPConfig, LocalTrainConfig, train_local
from common.evaluation import predict_proba
from common.models import CellDataset, ModelConfig, build_dataset, build_model
from common.partitioning import partition_patients
from common.preprocessing import PreprocessConfig
from common.records import CLASS_NAMES
from common.run_config import UPDATE_ENCODINGS, ConfigError
from common.splits import kfold_patients
from simulations.presets import resolve

MALIGNANT = CLASS_NAMES.index("malignant")
MODES = ("logreg", "nodp", "centralised", "local", "distributed", "fednodp", "isolated")
MODE_NAMES = {"logreg": "pooled head features + logreg", "nodp": "centralised, no DP",
              "centralised": "centralised DP-SGD", "local": "FedSGD, local noise",
              "distributed": "FedSGD, distributed noise", "fednodp": "FedSGD, no DP",
              "isolated": "each hospital alone"}
DELTA = 1e-5
ACCOUNTANT = "rdp"


@dataclass(frozen=True)
class Schedule:
    """What every trained row shares: steps (= FedSGD rounds), Poisson rate 1 / steps_per_epoch, SGD lr, clip."""

    rounds: int = 80
    steps_per_epoch: int = 4
    learning_rate: float = 1.0
    max_grad_norm: float = 1.0

    @property
    def sample_rate(self) -> float:
        return 1 / self.steps_per_epoch


@dataclass(frozen=True)
class Row:
    """One row of the table: how the model is trained (hospitals 0 = one site), at which epsilon target."""

    mode: str
    hospitals: int = 0
    epsilon: float | None = None
    cell_loss_weight: float = 1.0
    update_encoding: str = "float32"  # federated rows: how each hospital's update travels

    @property
    def name(self) -> str:
        where = f" x{self.hospitals}" if self.hospitals else ""
        weight = f", cell weight {self.cell_loss_weight:g}" if self.mode not in ("logreg",) else ""
        eps = f", eps {self.epsilon:g}" if self.epsilon is not None else ""
        encoding = f", {self.update_encoding} updates" if self.update_encoding != "float32" else ""
        return f"{MODE_NAMES[self.mode]}{where}{eps}{weight}{encoding}"


def fold_seed(seed: int, fold: int) -> int:
    """Seed of one fold of one training seed (distinct for every (seed, fold) with fold < 1000)."""
    if not 0 <= fold < 1000:
        raise ValueError("fold_seed supports at most 1000 folds")
    return seed * 1000 + fold


@functools.lru_cache(maxsize=None)
def calibrate_noise(epsilon: float, *, sample_rate: float, steps: int, delta: float = DELTA) -> float:
    """Noise multiplier whose (sigma, sample_rate, steps) history gives `epsilon` (RDP) within 1e-3, at most."""
    sigma = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=sample_rate, steps=steps,
                                 accountant=ACCOUNTANT, epsilon_tolerance=2e-4)
    return float(sigma)


def epsilon_of(noise_multiplier: float, *, sample_rate: float, steps: int, delta: float = DELTA) -> float:
    """Epsilon of `steps` DP-SGD steps, as `common.privacy.PrivacyAccountant` computes it."""
    return constant_epsilon(ACCOUNTANT, noise_multiplier, sample_rate, steps, delta)


def site_noise(row: Row, sigma: float) -> float:
    """Each hospital's noise multiplier: sigma (centralised, local noise) or its share sigma / sqrt(n)."""
    return sigma / math.sqrt(row.hospitals) if row.mode == "distributed" else sigma


def load_images(data_dir: Path, cache_dir: Path, config: PreprocessConfig) -> list[PreparedImage]:
    records = read_mias_records(data_dir)
    prepared, skipped = preprocess_records(records, cache=PreprocessCache(cache_dir / "preprocessed"),
                                           config=config)
    if skipped:
        raise SystemExit(f"{skipped} images of {data_dir} could not be decoded")
    return prepared


def dataset_for(prepared: Sequence[PreparedImage], config: ModelConfig, cache: FeatureCache) -> CellDataset:
    items = [labelled_image(p) for p in prepared]
    inputs = cache.inputs([item.image for item in items], config, device="cpu")
    return build_dataset(items, config, inputs=inputs)


def folds_for(prepared: Sequence[PreparedImage], *, k: int, seed: int) -> list[tuple[list[int], list[int]]]:
    """(train indices, test indices) per fold, split by patient."""
    patients = [p.record.patient_id for p in prepared]
    labels = [p.record.label for p in prepared]
    out = []
    for train_patients, test_patients in kfold_patients(patients, labels, k=k, seed=seed):
        train_set, test_set = set(train_patients), set(test_patients)
        out.append(([i for i, p in enumerate(patients) if p in train_set],
                    [i for i, p in enumerate(patients) if p in test_set]))
    return out


def hospitals_for(prepared: Sequence[PreparedImage], train_idx: list[int], *, hospitals: int,
                  seed: int) -> list[list[int]]:
    """The training folds cut into IID hospitals by patient: index lists into `prepared`."""
    position = {id(prepared[i].record): i for i in train_idx}
    parts = partition_patients([prepared[i].record for i in train_idx], num_partitions=hospitals, scheme="iid",
                               seed=seed)
    return [[position[id(record)] for record in part] for part in parts]


def _malignancy(model: torch.nn.Module, data: CellDataset, test_idx: list[int]) -> np.ndarray:
    _, probs = predict_proba(model, Subset(data, test_idx))
    return probs[:, MALIGNANT]


def centralised_scores(row: Row, schedule: Schedule, sigma: float | None, model_config: ModelConfig,
                       data: CellDataset, train_idx: list[int], test_idx: list[int],
                       seed: int) -> tuple[np.ndarray, float | None]:
    """One site: `train_local` for `schedule.rounds` steps on the training folds (DP-SGD, or DP off)."""
    model, epsilon = train_centralised(row, schedule, sigma, model_config, data, train_idx, seed)
    return _malignancy(model, data, test_idx), epsilon


def train_centralised(row: Row, schedule: Schedule, sigma: float | None, model_config: ModelConfig,
                      data: CellDataset, train_idx: list[int], seed: int) -> tuple[torch.nn.Module, float | None]:
    """The centralised row's model of one fold (`train_local`, DP-SGD at `sigma` or DP off) and its epsilon."""
    torch.manual_seed(seed)
    model = build_model(model_config)
    dp = DPConfig(noise_multiplier=sigma, max_grad_norm=schedule.max_grad_norm, delta=DELTA,
                  accountant=ACCOUNTANT) if sigma is not None else DPConfig(enabled=False)
    config = LocalTrainConfig(epochs=math.ceil(schedule.rounds / schedule.steps_per_epoch),
                              batch_size=site_batch_size(len(train_idx), schedule.steps_per_epoch),
                              learning_rate=schedule.learning_rate, max_steps=schedule.rounds,
                              cell_loss_weight=row.cell_loss_weight, seed=seed, dp=dp)
    outcome = train_local(model, Subset(data, train_idx), config=config, accountant_state=None, device="cpu")
    return model, outcome.epsilon


def federated_scores(row: Row, schedule: Schedule, sigma: float, model_config: ModelConfig, data: CellDataset,
                     prepared: Sequence[PreparedImage], train_idx: list[int], test_idx: list[int], seed: int,
                     engine: str) -> tuple[np.ndarray, float]:
    """FedSGD over `row.hospitals` IID hospitals; returns the epsilon of one hospital's own noise share."""
    model, epsilon = train_federated(row, schedule, sigma, model_config, data, prepared, train_idx, seed, engine)
    return _malignancy(model, data, test_idx), epsilon


def train_federated(row: Row, schedule: Schedule, sigma: float | None, model_config: ModelConfig,
                    data: CellDataset, prepared: Sequence[PreparedImage], train_idx: list[int], seed: int,
                    engine: str = "fast") -> tuple[torch.nn.Module, float | None]:
    """The federated row's model of one fold (FedSGD over `row.hospitals` IID hospitals cut from `train_idx`;
    DP off when `sigma` is None) and the epsilon of one hospital's own noise share."""
    sites = hospitals_for(prepared, train_idx, hospitals=row.hospitals, seed=seed)
    torch.manual_seed(seed)
    model = build_model(model_config)
    private = sigma is not None
    config = FedSGDConfig(rounds=schedule.rounds, steps_per_epoch=schedule.steps_per_epoch,
                          learning_rate=schedule.learning_rate,
                          noise_multiplier=site_noise(row, sigma) if private else 0.0,
                          max_grad_norm=schedule.max_grad_norm if private else math.inf,
                          cell_loss_weight=row.cell_loss_weight, delta=DELTA, accountant=ACCOUNTANT,
                          update_encoding=row.update_encoding)
    outcome = fedsgd(model, data, sites, config=config, seed=seed, engine=engine)
    return model, max(outcome.epsilons) if private else None


def isolated_scores(row: Row, schedule: Schedule, sigma: float | None, model_config: ModelConfig,
                    data: CellDataset, prepared: Sequence[PreparedImage], train_idx: list[int],
                    test_idx: list[int], seed: int) -> tuple[np.ndarray, float | None]:
    """Each of `row.hospitals` hospitals trains alone (as `centralised_scores` on its share); (test images,
    hospitals) scores and the largest hospital epsilon."""
    sites = hospitals_for(prepared, train_idx, hospitals=row.hospitals, seed=seed)
    columns, epsilons = [], []
    for k, site in enumerate(sites):
        scores, epsilon = centralised_scores(row, schedule, sigma, model_config, data, site, test_idx,
                                             seed * 1000 + k)
        columns.append(scores)
        if epsilon is not None:
            epsilons.append(epsilon)
    return np.stack(columns, axis=1), max(epsilons) if epsilons else None


def logreg_scores(pooled: np.ndarray, labels: np.ndarray, train_idx: list[int], test_idx: list[int],
                  seed: int) -> tuple[np.ndarray, None]:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(pooled[train_idx], labels[train_idx])
    return classifier.predict_proba(pooled[test_idx])[:, list(classifier.classes_).index(MALIGNANT)], None


def evaluate(row: Row, schedule: Schedule, model_config: ModelConfig, data: CellDataset,
             prepared: Sequence[PreparedImage], *, k: int, seeds: Sequence[int], engine: str = "fast") -> dict:
    """Per-seed pooled AUCs of one row, its epsilons and wall time."""
    labels = data.labels.numpy()
    sigma = None if row.epsilon is None else calibrate_noise(row.epsilon, sample_rate=schedule.sample_rate,
                                                             steps=schedule.rounds)
    pooled = data.inputs.float().mean(dim=(2, 3)).numpy() if row.mode == "logreg" else None

    def score(train_idx: list[int], test_idx: list[int], seed: int) -> tuple[np.ndarray, float | None]:
        if pooled is not None:
            return logreg_scores(pooled, labels, train_idx, test_idx, seed)
        if row.mode == "isolated":
            return isolated_scores(row, schedule, sigma, model_config, data, prepared, train_idx, test_idx, seed)
        if row.hospitals == 0:
            return centralised_scores(row, schedule, sigma, model_config, data, train_idx, test_idx, seed)
        return federated_scores(row, schedule, sigma, model_config, data, prepared, train_idx, test_idx, seed,
                                engine)

    aucs, reported = [], []
    start = time.perf_counter()
    models = row.hospitals if row.mode == "isolated" else 1  # score columns: one per model
    for seed in seeds:
        scores = np.zeros((len(labels), models))
        for fold, (train_idx, test_idx) in enumerate(folds_for(prepared, k=k, seed=seed)):
            fold_scores, epsilon = score(train_idx, test_idx, fold_seed(seed, fold))
            scores[test_idx] = np.asarray(fold_scores).reshape(len(test_idx), models)
            if epsilon is not None:
                reported.append(epsilon)
        aucs.append(float(np.mean([roc_auc_score(labels == MALIGNANT, scores[:, m]) for m in range(models)])))
    out = {"name": row.name, **asdict(row), "seeds": list(seeds), "aucs": aucs,
           "seconds": time.perf_counter() - start, "noise_multiplier_sum": sigma,
           "noise_multiplier_site": None if sigma is None else site_noise(row, sigma),
           "epsilon_site_share": max(reported) if reported else None}
    if sigma is not None:
        out["epsilon_sum"] = epsilon_of(sigma, sample_rate=schedule.sample_rate, steps=schedule.rounds)
    return out


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.mean(values)
    return mean, statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


def rows_for(args: argparse.Namespace) -> list[Row]:
    """Reference rows first, then per cell-loss weight and epsilon: centralised, then per n distributed, local."""
    out = [Row("logreg")]
    for weight in args.cell_loss_weight:
        out.append(Row("nodp", cell_loss_weight=weight))
        for eps in args.epsilons:
            out.append(Row("centralised", epsilon=eps, cell_loss_weight=weight))
            for n in args.hospitals:
                out += [Row("distributed", n, eps, weight)]
                out += [Row("local", n, eps, weight, encoding) for encoding in args.update_encoding]
            out += [Row("isolated", n, eps, weight) for n in args.isolated]
        out += [Row("fednodp", n, cell_loss_weight=weight) for n in args.isolated]
        out += [Row("isolated", n, cell_loss_weight=weight) for n in args.isolated]
    return [r for r in out if args.only is None or r.mode in args.only]


def _paired_delta(result: dict, results: Sequence[dict]) -> str:
    base = next((r for r in results if r["mode"] == "centralised" and r["epsilon"] == result["epsilon"]
                 and r["cell_loss_weight"] == result["cell_loss_weight"] and r["seeds"] == result["seeds"]), None)
    if base is None or result is base or result["epsilon"] is None:
        return "-"
    mean, se = mean_se([a - b for a, b in zip(result["aucs"], base["aucs"])])
    return f"{mean:+.3f} ± {se:.3f}"


def format_row(result: dict, results: Sequence[dict]) -> str:
    mean, se = mean_se(result["aucs"])

    def num(key: str, fmt: str) -> str:
        return format(result[key], fmt) if result.get(key) is not None else "-"
    return (f"{result['name']:<58} {mean:>6.3f} ± {se:.3f} {_paired_delta(result, results):>15} "
            f"{num('epsilon_sum', '.3f'):>7} {num('epsilon_site_share', '.2f'):>8} "
            f"{num('noise_multiplier_sum', '.3f'):>7} {num('noise_multiplier_site', '.3f'):>7} "
            f"{result['seconds']:>6.0f}")


HEADER = (f"{'row':<58} {'AUC ± s.e.':>14} {'Δ vs central':>15} {'ε':>7} {'ε share':>8} {'σ sum':>7} "
          f"{'σ site':>7} {'s':>6}")


def row_order(result: dict) -> tuple:
    """Table order: references and rows without DP, then per cell-loss weight and epsilon: centralised, then per n
    distributed, local, each hospital alone."""
    reference = 0 if result["mode"] == "logreg" else 1 if result["epsilon"] is None else 2
    return (reference, result["cell_loss_weight"], result["epsilon"] or 0.0, result["hospitals"],
            MODES.index(result["mode"]), UPDATE_ENCODINGS.index(result.get("update_encoding", "float32")))


def plot(results: Sequence[dict], path: Path) -> None:
    """AUC against epsilon: one line per mode and hospital count (and cell-loss weight when several)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weights = sorted({r["cell_loss_weight"] for r in results if r["epsilon"] is not None})
    lines: dict[tuple, list[dict]] = {}
    for r in results:
        if r["epsilon"] is not None and r.get("update_encoding", "float32") == "float32":
            lines.setdefault((r["mode"], r["hospitals"], r["cell_loss_weight"]), []).append(r)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    colours = {0: "black", 3: "tab:blue", 6: "tab:orange", 10: "tab:green"}
    styles = {"centralised": "-", "distributed": "-", "local": "--", "isolated": ":"}
    markers = {"centralised": "s", "distributed": "o", "local": "^", "isolated": "v"}
    ordered = sorted(lines.items(), key=lambda item: (item[0][2], item[0][1], item[0][0]))
    for position, ((mode, n, weight), points) in enumerate(ordered):
        points = sorted(points, key=lambda r: r["epsilon"])
        dodge = 1 + 0.012 * (position - (len(ordered) - 1) / 2)  # side by side, so error bars stay readable
        stats = [mean_se(r["aucs"]) for r in points]
        label = ("centralised" if mode == "centralised" else f"each of {n} hospitals alone" if mode == "isolated"
                 else f"{n} hospitals, {mode} noise")
        if len(weights) > 1:
            label += f", cell weight {weight:g}"
        ax.errorbar([r["epsilon"] * dodge for r in points], [m for m, _ in stats], yerr=[s for _, s in stats],
                    label=label, color=colours.get(n), linestyle=styles[mode], marker=markers[mode], capsize=3,
                    markersize=4)
    for r in results:
        if r["mode"] in ("nodp", "logreg"):
            ax.axhline(mean_se(r["aucs"])[0], color="grey", linestyle=":" if r["mode"] == "nodp" else "-.",
                       linewidth=1, label=MODE_NAMES[r["mode"]])
    ax.set_xscale("log")
    ax.set_xticks(sorted({r["epsilon"] for r in results if r["epsilon"] is not None}))
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("ε per hospital (δ 1e-5, RDP); distributed noise: ε of the revealed sum")
    ax.set_ylabel("malignancy AUC (5-fold CV, mean ± s.e. over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def tabulate(paths: Sequence[Path], *, weights: Sequence[float], out: Path | None) -> None:
    """The table (and plot) of saved rows: seeded runs give the same rows whether run together or apart."""
    rows: dict[str, dict] = {}
    settings = []
    for path in paths:
        saved = json.loads(path.read_text())
        settings.append(saved.get("settings"))
        for result in saved["rows"]:
            if result["mode"] == "logreg" or result["cell_loss_weight"] in weights:
                rows[result["name"]] = result
    results = sorted(rows.values(), key=row_order)
    print(HEADER)
    for result in results:
        print(format_row(result, results))
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        document = {"sources": [str(p) for p in paths], "settings": settings, "rows": results}
        (out / "model_quality.json").write_text(json.dumps(document, indent=1) + "\n")
        plot(results, out / "model_quality.png")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/bench"))
    parser.add_argument("--out", type=Path, help="write model_quality.json and model_quality.png here")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0],
                        help="epsilon targets (delta 1e-5, RDP) per hospital; distributed noise: of the sum")
    parser.add_argument("--hospitals", type=int, nargs="+", default=[3, 6, 10], help="IID hospital counts")
    parser.add_argument("--isolated", type=int, nargs="*", default=[3],
                        help="hospital counts of the 'each hospital alone' and 'FedSGD, no DP' rows")
    parser.add_argument("--rounds", type=int, default=80, help="FedSGD rounds = centralised steps")
    parser.add_argument("--steps-per-epoch", type=int, default=4,
                        help="Poisson sample rate 1 / this, at every site and centrally")
    parser.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="per-sample clip norm")
    parser.add_argument("--cell-loss-weight", type=float, nargs="+", default=[10.0],
                        help="weight of the cell term of the loss; several values: rows for each (default 10: "
                             "+0.013 ± 0.003 AUC over 1 on the centralised DP rows, 10 seeds; README)")
    parser.add_argument("--engine", choices=ENGINES, default="fast", help="federated rows: see bench.fedsgd")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the demo preset's model, e.g. --set top-k=4")
    parser.add_argument("--only", nargs="+", choices=MODES, help="run only these rows")
    parser.add_argument("--update-encoding", nargs="+", choices=UPDATE_ENCODINGS, default=["float32"],
                        help="local-noise rows: one row per encoding of the hospitals' updates "
                             "(common.update_encoding; distributed noise travels as SecAgg+'s own sum)")
    parser.add_argument("--tabulate", type=Path, nargs="+", metavar="JSON",
                        help="train nothing: print the table (and with --out, the plot) of the rows of these "
                             "model_quality.json files with one of the --cell-loss-weight values (a row run "
                             "twice: the last file's)")
    args = parser.parse_args(argv)
    if args.tabulate:
        tabulate(args.tabulate, weights=args.cell_loss_weight, out=args.out)
        return
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # once per fit; DESIGN §5
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen-feature inputs
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    try:
        demo = resolve("demo", args.set).run
    except ConfigError as exc:
        parser.error(str(exc))
    schedule = Schedule(rounds=args.rounds, steps_per_epoch=args.steps_per_epoch, learning_rate=args.lr,
                        max_grad_norm=args.max_grad_norm)
    prepared = load_images(args.data_dir, args.cache_dir, demo.preprocess_config())
    cache = FeatureCache(args.cache_dir / "features")
    model = demo.model_config()
    head = replace(model, feature_layer="head")
    data = {config: dataset_for(prepared, config, cache) for config in (model, head)}
    started = time.perf_counter()
    settings = {"images": len(prepared), "folds": args.folds, "seeds": args.seeds, "rounds": args.rounds,
                "sample_rate": schedule.sample_rate, "lr": args.lr, "max_grad_norm": args.max_grad_norm,
                "delta": DELTA, "accountant": ACCOUNTANT, "engine": args.engine, "model": asdict(model),
                "torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.machine(),
                "arguments": argv if argv is not None else sys.argv[1:]}
    print(f"# model quality on mini-MIAS: {len(prepared)} images, patient-level {args.folds}-fold CV, seeds "
          f"{args.seeds}; model {model.kind} {model.feature_layer} {model.pooling} top-{model.top_k}, input norm "
          f"{model.input_norm}; {args.rounds} steps (= FedSGD rounds) at Poisson rate 1/{args.steps_per_epoch}, "
          f"lr {args.lr}, clip {args.max_grad_norm}, delta {DELTA:g} ({ACCOUNTANT}); federated engine "
          f"{args.engine}; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}")
    print("# mean ± standard error over seeds; Δ: paired per-seed difference to the centralised row at the same "
          "epsilon; ε: of each hospital (distributed: of the sum); ε share: one hospital's own noise alone")
    print(HEADER, flush=True)
    results: list[dict] = []
    for row in rows_for(args):
        config = head if row.mode == "logreg" else model
        results.append(evaluate(row, schedule, config, data[config], prepared, k=args.folds, seeds=args.seeds,
                                engine=args.engine))
        print(format_row(results[-1], results), flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            document = {"settings": settings, "seconds": time.perf_counter() - started, "rows": results}
            (args.out / "model_quality.json").write_text(json.dumps(document, indent=1) + "\n")
    if args.out is not None and any(r["epsilon"] is not None for r in results):
        plot(results, args.out / "model_quality.png")
    print(f"# total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
