"""How much does the released model reveal about who trained it? Membership-inference advantage against epsilon.

Protocol (that of ``bench.model_quality``, whose functions it reuses): mini-MIAS, patient-level k-fold CV, the
demo preset's model (``effnet_head``), trained as the demo trains it: FedSGD over ``--hospitals`` IID hospitals
cut by patient from the training folds, one DP-SGD step per hospital per round, distributed noise (each hospital
adds sigma / sqrt(n), the revealed sum carries sigma; ``bench.fedsgd``'s fast engine), sigma calibrated so that
(sigma, q, rounds) gives the row's epsilon (``model_quality.calibrate_noise``, RDP, delta 1e-5); the "no DP" row
is the same FedSGD without clipping or noise. For every (seed, fold) model both attacks of
``common.membership_inference`` run on members = the fold's training images (all hospitals') and non-members =
its test images, the larger side subsampled to equal counts with the fold's seed. A row gives, per attack, the
advantage and AUC averaged over folds, then mean ± standard error over seeds; "chance" is the 95 % level of the
advantage of a model that leaks nothing at the same counts (``chance_advantage``: 0.20 for 64 vs 64; median 0.09),
so an advantage below it is indistinguishable from no leakage in one fold; the AUC averaged over 50 folds is the more
sensitive measure (0.5 = no leakage).

Seeds run one after the other, every row for each; ``--out DIR`` rewrites ``membership.json`` (settings and
per-seed numbers; no per-example loss) after each seed, so an interrupted run keeps whole seeds;
``--tabulate JSON`` prints the table of such a file.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Subset

from bench import model_quality as mq
from client.feature_cache import FeatureCache
from common import membership_inference as mi
from common.membership_audit import example_losses
from common.models import CellDataset, ModelConfig
from common.run_config import ConfigError
from simulations.presets import resolve

ATTACK_COLUMNS = (("loss", mi.LOSS_THRESHOLD), ("lr", mi.CALIBRATED_LIKELIHOOD_RATIO))


def rows_for(epsilons: Sequence[float], hospitals: int, cell_loss_weight: float) -> list[mq.Row]:
    """No DP first, then distributed noise at each epsilon, largest first."""
    return [mq.Row("fednodp", hospitals, None, cell_loss_weight),
            *(mq.Row("distributed", hospitals, eps, cell_loss_weight) for eps in sorted(epsilons, reverse=True))]


def fold_audit(model: torch.nn.Module, data: CellDataset, train_idx: list[int], test_idx: list[int],
               seed: int) -> mi.MembershipAudit:
    """Both attacks on one fold's model: its training images vs its test images (balanced with `seed`)."""
    member_losses, member_labels = example_losses(model, Subset(data, train_idx))
    non_member_losses, non_member_labels = example_losses(model, Subset(data, test_idx))
    return mi.audit(member_losses, member_labels, non_member_losses, non_member_labels, seed=seed)


def evaluate(row: mq.Row, schedule: mq.Schedule, model_config: ModelConfig, data: CellDataset, prepared,
             *, k: int, seeds: Sequence[int], engine: str = "fast") -> dict:
    """Per seed: each attack's advantage and AUC averaged over the k folds; the chance level; epsilon."""
    sigma = None if row.epsilon is None else mq.calibrate_noise(row.epsilon, sample_rate=schedule.sample_rate,
                                                                steps=schedule.rounds)
    per_seed: dict[str, list[float]] = {f"{c}_{m}": [] for c, _ in ATTACK_COLUMNS for m in ("advantage", "auc")}
    per_seed["chance_advantage_95"] = []
    counts = []
    start = time.perf_counter()
    for seed in seeds:
        folds = []
        for fold, (train_idx, test_idx) in enumerate(mq.folds_for(prepared, k=k, seed=seed)):
            fs = mq.fold_seed(seed, fold)
            model, _ = mq.train_federated(row, schedule, sigma, model_config, data, prepared, train_idx, fs, engine)
            folds.append(fold_audit(model, data, train_idx, test_idx, fs))
            counts.append(folds[-1].members)
        for column, name in ATTACK_COLUMNS:
            attacks = [next(a for a in audit.attacks if a.name == name) for audit in folds]
            per_seed[f"{column}_advantage"].append(float(np.mean([a.advantage for a in attacks])))
            per_seed[f"{column}_auc"].append(float(np.mean([a.auc for a in attacks])))
        per_seed["chance_advantage_95"].append(float(np.mean([a.chance_advantage_95 for a in folds])))
    out = {"name": row.name, **asdict(row), "seeds": list(seeds), **per_seed,
           "members_per_fold": [min(counts), max(counts)], "noise_multiplier_sum": sigma,
           "seconds": time.perf_counter() - start}
    if sigma is not None:
        out["epsilon_sum"] = mq.epsilon_of(sigma, sample_rate=schedule.sample_rate, steps=schedule.rounds)
    return out


def merged(earlier: dict | None, later: dict) -> dict:
    """One row's results over the seeds of `earlier` and then `later` (same row, disjoint seeds)."""
    if earlier is None:
        return later
    out = dict(earlier)
    for key, value in later.items():
        if isinstance(value, list) and key not in ("members_per_fold",):
            out[key] = earlier[key] + value
    out["members_per_fold"] = [min(earlier["members_per_fold"][0], later["members_per_fold"][0]),
                               max(earlier["members_per_fold"][1], later["members_per_fold"][1])]
    out["seconds"] = earlier["seconds"] + later["seconds"]
    return out


def tabulate(path: Path) -> None:
    """Print the table of a saved ``membership.json``."""
    saved = json.loads(path.read_text())
    print(f"# {path}: seeds {saved['rows'][0]['seeds']}, {saved['settings']['folds']} folds")
    print(HEADER)
    for result in saved["rows"]:
        print(format_row(result))


HEADER = (f"{'row':<40} {'ε':>6} {'loss adv':>15} {'loss AUC':>15} {'LR adv':>15} {'LR AUC':>15} "
          f"{'chance':>6} {'s':>5}")


def format_row(result: dict) -> str:
    def stat(key: str) -> str:
        mean, se = mq.mean_se(result[key])
        return f"{mean:.3f} ± {se:.3f}"
    eps = f"{result['epsilon_sum']:.2f}" if result.get("epsilon_sum") is not None else "-"
    return (f"{result['name']:<40} {eps:>6} {stat('loss_advantage'):>15} {stat('loss_auc'):>15} "
            f"{stat('lr_advantage'):>15} {stat('lr_auc'):>15} {np.mean(result['chance_advantage_95']):>6.3f} "
            f"{result['seconds']:>5.0f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="mini-MIAS folder (required unless --tabulate)")
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/bench"))
    parser.add_argument("--out", type=Path, help="write membership.json here")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--epsilons", type=float, nargs="+", default=[8.0, 3.0, 1.0],
                        help="epsilon of the revealed sum (delta 1e-5, RDP)")
    parser.add_argument("--hospitals", type=int, default=3, help="IID hospitals (distributed noise)")
    parser.add_argument("--rounds", type=int, default=80, help="FedSGD rounds")
    parser.add_argument("--steps-per-epoch", type=int, default=4, help="Poisson sample rate 1 / this")
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--cell-loss-weight", type=float, default=10.0)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the demo preset's model, e.g. --set top-k=4")
    parser.add_argument("--tabulate", type=Path, metavar="JSON", help="train nothing: print this file's table")
    args = parser.parse_args(argv)
    if args.tabulate:
        tabulate(args.tabulate)
        return
    if args.data_dir is None:
        parser.error("--data-dir is required")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    try:
        demo = resolve("demo", args.set).run
    except ConfigError as exc:
        parser.error(str(exc))
    schedule = mq.Schedule(rounds=args.rounds, steps_per_epoch=args.steps_per_epoch, learning_rate=args.lr,
                           max_grad_norm=args.max_grad_norm)
    prepared = mq.load_images(args.data_dir, args.cache_dir, demo.preprocess_config())
    model = demo.model_config()
    data = mq.dataset_for(prepared, model, FeatureCache(args.cache_dir / "features"))
    settings = {"images": len(prepared), "folds": args.folds, "seeds": args.seeds, "hospitals": args.hospitals,
                "rounds": args.rounds, "sample_rate": schedule.sample_rate, "lr": args.lr,
                "max_grad_norm": args.max_grad_norm, "cell_loss_weight": args.cell_loss_weight,
                "delta": mq.DELTA, "accountant": mq.ACCOUNTANT, "model": asdict(model), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "machine": platform.machine(), "processor": platform.processor(),
                "arguments": argv if argv is not None else sys.argv[1:]}
    print(f"# membership inference on mini-MIAS: {len(prepared)} images, patient-level {args.folds}-fold CV, seeds "
          f"{args.seeds}; model {model.kind} {model.feature_layer}; FedSGD over {args.hospitals} hospitals, "
          f"distributed noise, {args.rounds} rounds at Poisson rate 1/{args.steps_per_epoch}, lr {args.lr}, clip "
          f"{args.max_grad_norm}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}")
    print("# members: a fold's training images; non-members: its test images (balanced); advantage = max TPR - FPR;"
          " mean ± s.e. over seeds of the mean over folds; chance: 95 % advantage of a model leaking nothing")
    started = time.perf_counter()
    rows = rows_for(args.epsilons, args.hospitals, args.cell_loss_weight)
    results: list[dict | None] = [None] * len(rows)
    for seed in args.seeds:  # seed by seed, every row: an interrupted run leaves whole seeds in the JSON
        for i, row in enumerate(rows):
            results[i] = merged(results[i], evaluate(row, schedule, model, data, prepared, k=args.folds,
                                                     seeds=[seed]))
        print(f"# seed {seed} done, {time.perf_counter() - started:.0f} s", flush=True)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            document = {"settings": settings, "seconds": time.perf_counter() - started, "rows": results}
            (args.out / "membership.json").write_text(json.dumps(document, indent=1) + "\n")
    print(HEADER)
    for result in results:
        print(format_row(result))
    print(f"# total {time.perf_counter() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
