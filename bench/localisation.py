"""Do the model's explanations point at the lesions? Pointing game and attribution mass on mini-MIAS, per method.

Protocol (that of `bench.model_quality`, one training seed): patient-level k-fold CV (`folds_for`, stratified by
worst label); per fold, the demo preset's model ("effnet_head": frozen EfficientNet-Lite0 block-14 features + DP
cell head) is trained on the training folds by the model-quality bench's centralised DP-SGD path
(`train_centralised`: `client.training.train_local`, 80 steps at Poisson rate 1/4, clip 1, lr 1, cell-loss
weight 10, noise calibrated to epsilon 8 at delta 1e-5, RDP), with the fold's own seed `fold_seed(seed, fold)`.
Then on the fold's TEST images that carry mini-MIAS lesion circles (benign and malignant; circles mapped into
the preprocessed 512-px frame; images whose circles miss the breast mask are counted and left out) every method
of `common.explanations` explains the image's own class (benign or malignant) and is scored inside the breast:

- pointing game: the map's maximum lies in a circle (`common.explanations.localisation.pointing_game`);
- mass inside: share of the positive attribution that lies in the circles (`mass_inside`);
- random: the circles' share of the breast, what a random map scores on both (`random_baseline`);
- model randomisation: Spearman rank correlation, inside the breast, between the map of the trained model and
  that of the same model with a re-initialised cell head (`model_randomisation_check`); near 1 = the map does not
  depend on what the head learnt. Grad-CAM and cell scores: every lesion image; Integrated Gradients and
  occlusion: the first ``--randomisation-images`` lesion images of each fold (they cost as much again).

Grad-CAM and the cell-score map are computed from the cached frozen features (the same maps as through the
backbone, checked in tests/test_explanations.py); Integrated Gradients and occlusion run through the 512-px
backbone, which is what makes them expensive on a CPU: ``--ig-steps`` forward+backward passes per image (about
0.2 s each on one thread, in internal batches of 2) and ((512 - window) / stride + 1)^2 forward passes for
occlusion (about 0.1 s each). Defaults (8 steps; window 128, stride 64) keep the whole run near 15 CPU minutes.

Nothing per image is written: the JSON holds counts and sums per fold and method, and the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench.model_quality import (
    ACCOUNTANT,
    DELTA,
    Row,
    Schedule,
    calibrate_noise,
    dataset_for,
    fold_seed,
    folds_for,
    load_images,
    train_centralised,
)
from client.feature_cache import FeatureCache
from client.hospital_data import PreparedImage, labelled_image
from common.explanations import (
    explain,
    explainable,
    mass_inside,
    model_randomisation_check,
    pointing_game,
    random_baseline,
)
from common.models import CellDataset, InferenceModel, ModelConfig, build_feature_extractor
from common.records import CLASS_NAMES
from common.run_config import ConfigError
from simulations.presets import resolve

#: The rows: (name, `common.explanations` method, its fixed options). The model's own map first, then the
#: Captum methods from cheapest to dearest; Grad-CAM also before its ReLU (the ReLU'd map is empty wherever the
#: class-contrastive gradient points away from every cell's features).
VARIANTS: tuple[tuple[str, str, dict], ...] = (
    ("cell_scores", "cell_scores", {}),
    ("grad_cam", "grad_cam", {}),
    ("grad_cam_signed", "grad_cam", {"relu": False}),
    ("integrated_gradients", "integrated_gradients", {}),
    ("occlusion", "occlusion", {}),
)
METHOD_ORDER = tuple(name for name, _, _ in VARIANTS)
METHOD_NAMES = {"cell_scores": "cell scores (the model's own map)", "grad_cam": "Grad-CAM",
                "grad_cam_signed": "Grad-CAM without ReLU", "integrated_gradients": "Integrated Gradients",
                "occlusion": "occlusion"}
#: Methods that need the backbone (images); the others run on cached features.
THROUGH_BACKBONE = ("integrated_gradients", "occlusion")
SUBSETS = {"all": (CLASS_NAMES.index("benign"), CLASS_NAMES.index("malignant")),
           "malignant": (CLASS_NAMES.index("malignant"),)}


@dataclass(frozen=True)
class Settings:
    """What the benchmark trains and how the expensive methods are sized."""

    folds: int = 5
    seed: int = 0
    epsilon: float = 8.0
    cell_loss_weight: float = 10.0
    ig_steps: int = 8
    ig_internal_batch_size: int = 2  # faster than larger internal batches on one CPU thread
    occlusion_window: int = 128
    occlusion_stride: int = 64
    randomisation_images: int = 2
    batch_size: int = 1  # one image at a time: on one CPU thread the backbone passes are fastest in small batches

    def options(self, method: str) -> dict:
        """Keyword options of one method."""
        if method == "integrated_gradients":
            return {"steps": self.ig_steps, "internal_batch_size": self.ig_internal_batch_size}
        if method == "occlusion":
            return {"window": self.occlusion_window, "stride": self.occlusion_stride, "perturbations_per_eval": 1}
        return {}


@dataclass
class Tally:
    """Sums over images of one (method, subset, fold): enough to pool folds without keeping any image's score."""

    images: int = 0
    hits: int = 0
    empty: int = 0  # maps constant over the breast (they point nowhere: misses)
    mass: float = 0.0
    mass_sq: float = 0.0
    baseline: float = 0.0
    correlations: list[float] = field(default_factory=list)

    def add(self, hit: bool, mass: float, baseline: float, *, empty: bool = False) -> None:
        self.images += 1
        self.hits += int(hit)
        self.empty += int(empty)
        self.mass += mass
        self.mass_sq += mass * mass
        self.baseline += baseline

    def merge(self, other: Tally) -> Tally:
        return Tally(self.images + other.images, self.hits + other.hits, self.empty + other.empty,
                     self.mass + other.mass, self.mass_sq + other.mass_sq, self.baseline + other.baseline,
                     self.correlations + other.correlations)


def summarise(tally: Tally) -> dict:
    """Pointing-game hit rate (binomial s.e.), mean mass inside (s.e. over images), the random baseline (mean
    circle share) and the mean rank correlation under model randomisation (s.e. over images)."""
    n = tally.images
    if n == 0:
        return {"images": 0}
    hit_rate = tally.hits / n
    mass = tally.mass / n
    mass_var = max(tally.mass_sq / n - mass * mass, 0.0) * n / (n - 1) if n > 1 else 0.0
    out = {"images": n, "empty_maps": tally.empty, "pointing_game": hit_rate,
           "pointing_game_se": math.sqrt(hit_rate * (1 - hit_rate) / n),
           "mass_inside": mass, "mass_inside_se": math.sqrt(mass_var / n), "random": tally.baseline / n}
    correlations = [c for c in tally.correlations if not math.isnan(c)]
    if correlations:
        m = len(correlations)
        out["randomisation_images"] = m
        out["randomisation_rank_correlation"] = float(np.mean(correlations))
        out["randomisation_rank_correlation_se"] = float(np.std(correlations, ddof=1) / math.sqrt(m)) if m > 1 else 0.0
    return out


def format_table(summary: dict, subset: str = "all") -> str:
    """Markdown table of one subset's summary ({method: summarise(...)})."""
    lines = ["| method | images (empty maps) | pointing game | random | mass inside | random "
             "| rank corr., randomised head (images) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for method in METHOD_ORDER:
        s = summary.get(method, {}).get(subset)
        if not s or not s["images"]:
            continue
        corr = (f"{s['randomisation_rank_correlation']:.2f} ± {s['randomisation_rank_correlation_se']:.2f} "
                f"({s['randomisation_images']})" if "randomisation_rank_correlation" in s else "-")
        lines.append(f"| {METHOD_NAMES[method]} | {s['images']} ({s['empty_maps']}) | {s['pointing_game']:.2f} ± "
                     f"{s['pointing_game_se']:.2f} | {s['random']:.3f} | {s['mass_inside']:.3f} ± "
                     f"{s['mass_inside_se']:.3f} | {s['random']:.3f} | {corr} |")
    return "\n".join(lines)


@dataclass(frozen=True)
class LesionImage:
    """One test image with circles: its index, class, and circle and breast masks in the preprocessed frame."""

    index: int
    label: int
    lesion: np.ndarray
    breast: np.ndarray


def lesion_images(prepared: Sequence[PreparedImage], indices: Sequence[int]) -> tuple[list[LesionImage], int]:
    """The images of `indices` with lesion circles inside the breast, and how many had circles that miss it."""
    out, missed = [], 0
    for i in indices:
        if not prepared[i].record.lesions:
            continue
        item = labelled_image(prepared[i])
        if item.lesion_mask is None or item.label not in SUBSETS["all"]:
            continue
        if not (item.lesion_mask & item.breast_mask).any():
            missed += 1
            continue
        out.append(LesionImage(i, item.label, item.lesion_mask, item.breast_mask))
    return out, missed


def explain_fold(model: torch.nn.Module, config: ModelConfig, extractor, data: CellDataset,
                 prepared: Sequence[PreparedImage], images: Sequence[LesionImage], settings: Settings,
                 seed: int, cpu_seconds: dict[str, float]) -> dict[str, dict[str, Tally]]:
    """Tallies per method and subset for one fold's lesion images; adds each method's CPU time to
    `cpu_seconds`."""
    classifier = explainable(model)
    inference = InferenceModel(config, classifier, extractor).eval()
    size = prepared[0].preprocessed.image.shape[-1]
    tallies = {m: {s: Tally() for s in SUBSETS} for m in METHOD_ORDER}
    for start in range(0, len(images), settings.batch_size):
        chunk = images[start:start + settings.batch_size]
        targets = [item.label for item in chunk]
        pixels = torch.from_numpy(np.stack([prepared[item.index].preprocessed.image for item in chunk]))[:, None]
        features = data.inputs[[item.index for item in chunk]].float()
        masks = [item.breast for item in chunk]
        for name, method, fixed in VARIANTS:
            backbone = method in THROUGH_BACKBONE
            model_for, inputs = (inference, pixels) if backbone else (classifier, features)
            extra = {**fixed, **settings.options(method), **({} if backbone else {"size": size})}
            clock = time.process_time()
            maps = explain(method, model_for, inputs, targets, **extra)
            cpu_seconds[name] += time.process_time() - clock
            randomise = [not backbone or start + j < settings.randomisation_images for j in range(len(chunk))]
            for j, item in enumerate(chunk):
                heat = maps[j].numpy()
                region = heat[item.breast]
                empty = bool(region.max() == region.min())
                hit = pointing_game(heat, item.lesion, item.breast)
                mass = mass_inside(heat, item.lesion, item.breast)
                baseline = random_baseline(item.lesion, item.breast)
                correlation = None
                if randomise[j]:
                    clock = time.process_time()
                    correlation = model_randomisation_check(
                        method, model_for, inputs[j:j + 1], [targets[j]], seed=seed, masks=[masks[j]],
                        attributions=maps[j:j + 1], **extra)
                    cpu_seconds[name] += time.process_time() - clock
                for subset, labels in SUBSETS.items():
                    if item.label in labels:
                        tallies[name][subset].add(hit, mass, baseline, empty=empty)
                        if correlation is not None:
                            tallies[name][subset].correlations.append(correlation)
    return tallies


def tally_record(tally: Tally) -> dict:
    """A fold's tally as counts and sums (no image's own score)."""
    correlations = [c for c in tally.correlations if not math.isnan(c)]
    return {"images": tally.images, "hits": tally.hits, "empty_maps": tally.empty, "mass_sum": tally.mass,
            "mass_sq_sum": tally.mass_sq,
            "random_sum": tally.baseline, "correlations": len(correlations),
            "correlation_sum": float(sum(correlations)),
            "correlations_undefined": len(tally.correlations) - len(correlations)}


def pooled(folds: Sequence[dict[str, dict[str, Tally]]]) -> dict[str, dict[str, dict]]:
    """Summary per method and subset over all folds."""
    out: dict[str, dict[str, dict]] = {}
    for method in METHOD_ORDER:
        out[method] = {}
        for subset in SUBSETS:
            total = Tally()
            for fold in folds:
                total = total.merge(fold[method][subset])
            out[method][subset] = summarise(total)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = Settings()
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("cache/bench"),
                        help="preprocessed images and frozen features, shared with the model-quality bench")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="where localisation.json goes")
    parser.add_argument("--folds", type=int, default=defaults.folds)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training seed (fold seeds: seed*1000+fold)")
    parser.add_argument("--epsilon", type=float, default=defaults.epsilon, help="DP target (delta 1e-5, RDP)")
    parser.add_argument("--ig-steps", type=int, default=defaults.ig_steps)
    parser.add_argument("--occlusion-window", type=int, default=defaults.occlusion_window)
    parser.add_argument("--occlusion-stride", type=int, default=defaults.occlusion_stride)
    parser.add_argument("--randomisation-images", type=int, default=defaults.randomisation_images,
                        help="per fold, for Integrated Gradients and occlusion (the others: every image)")
    parser.add_argument("--max-images", type=int, help="at most this many lesion images per fold (a quick look)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override the demo preset's model, e.g. --set top-k=4")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")  # once per fit; DESIGN §5
    warnings.filterwarnings("ignore", message="Full backward hook is firing")  # frozen-feature inputs
    warnings.filterwarnings("ignore", message="Using a non-full backward hook")
    try:
        demo = resolve("demo", args.set).run
    except ConfigError as exc:
        parser.error(str(exc))
    settings = Settings(folds=args.folds, seed=args.seed, epsilon=args.epsilon, ig_steps=args.ig_steps,
                        occlusion_window=args.occlusion_window, occlusion_stride=args.occlusion_stride,
                        randomisation_images=args.randomisation_images)
    schedule = Schedule()
    row = Row("centralised", epsilon=settings.epsilon, cell_loss_weight=settings.cell_loss_weight)
    started = time.perf_counter()
    prepared = load_images(args.data_dir, args.cache_dir, demo.preprocess_config())
    config = demo.model_config()
    data = dataset_for(prepared, config, FeatureCache(args.cache_dir / "features"))
    extractor = build_feature_extractor(config)
    sigma = calibrate_noise(settings.epsilon, sample_rate=schedule.sample_rate, steps=schedule.rounds)
    print(f"# localisation on mini-MIAS: {len(prepared)} images, patient-level {settings.folds}-fold CV, seed "
          f"{settings.seed}; model {config.kind} {config.feature_layer} {config.pooling} top-{config.top_k}, "
          f"centralised DP-SGD eps {settings.epsilon:g} (sigma {sigma:.3f}, {schedule.rounds} steps at q "
          f"{schedule.sample_rate:g}, delta {DELTA:g}, {ACCOUNTANT}), cell-loss weight {settings.cell_loss_weight:g}; "
          f"IG {settings.ig_steps} steps; occlusion window {settings.occlusion_window} stride "
          f"{settings.occlusion_stride}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.machine()}", flush=True)
    folds, epsilons, missed_total, seconds = [], [], 0, []
    cpu_seconds = dict.fromkeys(METHOD_ORDER, 0.0)
    for fold, (train_idx, test_idx) in enumerate(folds_for(prepared, k=settings.folds, seed=settings.seed)):
        fold_start = time.perf_counter()
        seed = fold_seed(settings.seed, fold)
        model, epsilon = train_centralised(row, schedule, sigma, config, data, train_idx, seed)
        epsilons.append(epsilon)
        images, missed = lesion_images(prepared, test_idx)
        images = images[:args.max_images]
        missed_total += missed
        folds.append(explain_fold(model, config, extractor, data, prepared, images, settings, seed, cpu_seconds))
        seconds.append(time.perf_counter() - fold_start)
        print(f"# fold {fold}: {len(images)} lesion images ({missed} with circles outside the breast left out), "
              f"eps {epsilon:.2f}, {seconds[-1]:.0f} s", flush=True)
    summary = pooled(folds)
    for subset in SUBSETS:
        print(f"\n{subset} lesion images (target: the image's own class)" if subset == "all"
              else "\nmalignant lesion images only")
        print(format_table(summary, subset))
    total = time.perf_counter() - started
    print(f"\n# total {total:.0f} s wall; CPU s per method (randomisation included): "
          + ", ".join(f"{name} {cpu:.0f}" for name, cpu in cpu_seconds.items()), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    document = {
        "settings": {**asdict(settings), "schedule": asdict(schedule), "noise_multiplier": sigma, "delta": DELTA,
                     "accountant": ACCOUNTANT, "model": asdict(config), "images": len(prepared),
                     "max_images": args.max_images, "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "machine": platform.machine(), "arguments": argv if argv is not None else sys.argv[1:]},
        "epsilons": epsilons, "left_out_circles_outside_breast": missed_total, "seconds": total,
        "fold_seconds": seconds, "method_cpu_seconds": cpu_seconds, "summary": summary,
        "folds": [{name: {subset: tally_record(t) for subset, t in per.items()} for name, per in fold.items()}
                  for fold in folds],
    }
    (args.out / "localisation.json").write_text(json.dumps(document, indent=1) + "\n")

if __name__ == "__main__":
    main()
