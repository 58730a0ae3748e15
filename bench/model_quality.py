"""How well does the model learn malignancy on mini-MIAS? Patient-level k-fold CV x seeds, one run.

The protocol of the independent reference in the federated-training issue: every patient is tested exactly once
per seed (`common.splits.kfold_patients`, stratified by worst label), the test predictions of all folds are
pooled and one malignancy AUC is computed per seed; the table gives mean ± standard deviation over seeds. The
folds depend on the training seed (each seed re-draws them); inside a seed every fold trains with its own seed,
``fold_seed(seed, fold) = seed * 1000 + fold`` (initial weights, sampling, noise, the cut into hospitals). Rows,
all on the same folds:

- ``pooled head features + logreg``: global-average-pooled frozen EfficientNet-Lite0 head features + logistic
  regression (the reference's "pooled features do not see lesions" baseline);
- the `demo` preset's lesion-aware cell model trained centrally (one site holds all training folds) with the
  project's `train_local`, without DP and with DP-SGD;
- ``FedAvg``: the training folds cut into IID hospitals by patient, each running the `demo` preset's local round
  (`client.node.local_train_config`) from the global weights with its accountant carried over, averaged by
  example count (`common.aggregation.weighted_average`) for the preset's number of rounds: the federation
  without its transport and without the hospitals' validation split.

Frozen features and preprocessed images are cached under ``--cache-dir``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from torch.utils.data import Subset

from client.feature_cache import FeatureCache
from client.hospital_data import PreparedImage, labelled_image, preprocess_records
from client.node import local_train_config
from client.preprocess_cache import PreprocessCache
from client.readers.mias import read_mias_records
from client.training import DPConfig, LocalTrainConfig, train_local
from common.aggregation import weighted_average
from common.device import default_device
from common.evaluation import predict_proba
from common.models import CellDataset, ModelConfig, build_dataset, build_model
from common.partitioning import partition_patients
from common.preprocessing import PreprocessConfig
from common.records import CLASS_NAMES
from common.run_config import ConfigError, RunConfig
from common.splits import kfold_patients
from simulations.presets import resolve

MALIGNANT = CLASS_NAMES.index("malignant")


@dataclass(frozen=True)
class Variant:
    """One row of the table: a model and how it is trained (train None = logistic-regression reference).

    hospitals > 0: federated instead of centralised: the training folds are cut into that many hospitals by
    patient (IID), and every round each hospital runs `train` (one local round) from the global weights,
    its accountant carried over, and the global weights become their example-weighted average (FedAvg).
    """

    name: str
    model: ModelConfig
    train: LocalTrainConfig | None
    hospitals: int = 0
    rounds: int = 1


def load_images(data_dir: Path, cache_dir: Path, config: PreprocessConfig) -> list[PreparedImage]:
    records = read_mias_records(data_dir)
    prepared, skipped = preprocess_records(records, cache=PreprocessCache(cache_dir / "preprocessed"),
                                           config=config)
    if skipped:
        raise SystemExit(f"{skipped} images of {data_dir} could not be decoded")
    return prepared


def dataset_for(prepared: Sequence[PreparedImage], config: ModelConfig, cache: FeatureCache) -> CellDataset:
    items = [labelled_image(p) for p in prepared]
    inputs = cache.inputs([item.image for item in items], config, device=default_device())
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


def fold_seed(seed: int, fold: int) -> int:
    """Seed of one fold of one training seed (distinct for every (seed, fold) with fold < 1000)."""
    if not 0 <= fold < 1000:
        raise ValueError("fold_seed supports at most 1000 folds")
    return seed * 1000 + fold


def cell_model_scores(variant: Variant, data: CellDataset, train_idx: list[int], test_idx: list[int],
                      seed: int) -> tuple[np.ndarray, float | None]:
    torch.manual_seed(seed)
    model = build_model(variant.model)
    config = replace(variant.train, seed=seed)
    outcome = train_local(model, Subset(data, train_idx), config=config, accountant_state=None,
                          device=default_device())
    _, probs = predict_proba(model, Subset(data, test_idx))
    return probs[:, MALIGNANT], outcome.epsilon


def federated_scores(variant: Variant, data: CellDataset, prepared: Sequence[PreparedImage],
                     train_idx: list[int], test_idx: list[int], seed: int) -> tuple[np.ndarray, float | None]:
    """FedAvg of `variant.hospitals` IID hospitals cut from the training folds (what the federation's
    nodes run each round, without the transport)."""
    position = {id(prepared[i].record): i for i in train_idx}
    parts = partition_patients([prepared[i].record for i in train_idx], num_partitions=variant.hospitals,
                               scheme="iid", seed=seed)
    sites = [Subset(data, [position[id(record)] for record in part]) for part in parts]
    torch.manual_seed(seed)
    model = build_model(variant.model)
    states: list[dict | None] = [None] * len(sites)
    epsilon = None
    for round_number in range(variant.rounds):
        updates = []
        for k, site in enumerate(sites):
            local = build_model(variant.model)
            local.load_state_dict(model.state_dict())
            config = replace(variant.train, seed=seed * 10_000 + round_number * 100 + k)
            outcome = train_local(local, site, config=config, accountant_state=states[k],
                                  device=default_device())
            states[k] = outcome.accountant_state
            epsilon = outcome.epsilon if epsilon is None or outcome.epsilon is None else max(epsilon, outcome.epsilon)
            updates.append((outcome.weights, outcome.num_examples))
        model.load_state_dict(weighted_average(updates), strict=False)
    _, probs = predict_proba(model, Subset(data, test_idx))
    return probs[:, MALIGNANT], epsilon


def logreg_scores(pooled: np.ndarray, labels: np.ndarray, train_idx: list[int], test_idx: list[int],
                  seed: int) -> tuple[np.ndarray, None]:
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    classifier.fit(pooled[train_idx], labels[train_idx])
    return classifier.predict_proba(pooled[test_idx])[:, list(classifier.classes_).index(MALIGNANT)], None


def evaluate(variant: Variant, prepared: Sequence[PreparedImage], cache: FeatureCache, *, k: int,
             seeds: Sequence[int]) -> dict:
    data = dataset_for(prepared, variant.model, cache)
    labels = data.labels.numpy()
    score: Callable
    if variant.train is None:
        pooled = data.inputs.float().mean(dim=(2, 3)).numpy()
        score = lambda tr, te, seed: logreg_scores(pooled, labels, tr, te, seed)  # noqa: E731
    elif variant.hospitals:
        score = lambda tr, te, seed: federated_scores(variant, data, prepared, tr, te, seed)  # noqa: E731
    else:
        score = lambda tr, te, seed: cell_model_scores(variant, data, tr, te, seed)  # noqa: E731
    aucs, epsilons = [], []
    start = time.perf_counter()
    for seed in seeds:
        scores = np.zeros(len(labels))
        for fold, (train_idx, test_idx) in enumerate(folds_for(prepared, k=k, seed=seed)):
            scores[test_idx], epsilon = score(train_idx, test_idx, fold_seed(seed, fold))
            if epsilon is not None:
                epsilons.append(epsilon)
        aucs.append(float(roc_auc_score(labels == MALIGNANT, scores)))
    return {"name": variant.name, "aucs": aucs, "epsilon": max(epsilons) if epsilons else None,
            "seconds": time.perf_counter() - start}


def variants(args: argparse.Namespace, demo: RunConfig) -> list[Variant]:
    """The reference, the cell model centralised without and with DP, and the `demo` preset's federation."""
    cell = demo.model_config()
    plain = LocalTrainConfig(epochs=args.epochs, batch_size=args.batch_size, learning_rate=args.lr,
                             dp=DPConfig(enabled=False))
    private = replace(plain, dp=DPConfig(noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm))
    federated = local_train_config(demo, server_round=1)  # seeded per site and round below
    out = [Variant("pooled head features + logreg", replace(cell, feature_layer="head"), None),
           Variant("cell model, no DP", cell, plain),
           Variant(f"cell model, DP sigma {args.noise_multiplier:g}", cell, private),
           Variant(f"FedAvg x{args.hospitals}, demo settings", cell, federated, hospitals=args.hospitals,
                   rounds=demo.num_server_rounds)]
    return [v for v in out if args.only is None or any(word in v.name for word in args.only)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/bench"))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20, help="centralised variants: epochs")
    parser.add_argument("--batch-size", type=int, default=64, help="centralised variants: expected batch size")
    parser.add_argument("--lr", type=float, default=1.0, help="centralised variants: SGD learning rate")
    parser.add_argument("--noise-multiplier", type=float, default=1.75, help="centralised DP variant: sigma")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="centralised DP variant: clip norm")
    parser.add_argument("--hospitals", type=int, default=3, help="federated variant: IID hospitals")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the demo preset (model keys change every cell-model row), e.g. "
                             "--set feature-layer=head --set input-norm=false")
    parser.add_argument("--only", nargs="+", help="run only the variants whose name contains one of these words")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # once per fit; DESIGN §5
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen-feature inputs
    try:
        demo = resolve("demo", args.set).run
    except ConfigError as exc:
        parser.error(str(exc))
    prepared = load_images(args.data_dir, args.cache_dir, demo.preprocess_config())
    cache = FeatureCache(args.cache_dir / "features")
    model = demo.model_config()
    print(f"# model quality on mini-MIAS: {len(prepared)} images, patient-level {args.folds}-fold CV, seeds "
          f"{args.seeds}; model {model.kind} {model.feature_layer} {model.pooling} top-{model.top_k}, input norm "
          f"{model.input_norm}; centralised: {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}; "
          f"federated: demo preset ({demo.num_server_rounds} rounds, batch {demo.batch_size}, lr {demo.lr}, "
          f"sigma {demo.noise_multiplier:g}); torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}")
    print(f"{'variant':<34} {'AUC malignant':>15} {'per seed':>22} {'epsilon':>8} {'s':>6}")
    for variant in variants(args, demo):
        row = evaluate(variant, prepared, cache, k=args.folds, seeds=args.seeds)
        aucs = row["aucs"]
        spread = statistics.stdev(aucs) if len(aucs) > 1 else 0.0
        eps = f"{row['epsilon']:.2f}" if row["epsilon"] is not None else "-"
        print(f"{row['name']:<34} {statistics.mean(aucs):>8.3f} ± {spread:.3f} "
              f"{' '.join(f'{a:.3f}' for a in aucs):>22} {eps:>8} {row['seconds']:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
