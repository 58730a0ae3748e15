"""How fast is one DP-SGD step with each Opacus grad-sample mode, per model kind? (DESIGN §5)

All modes give the same privacy guarantee (same clipping, same noise, same accountant); they differ in how the
per-sample gradients are computed: hooks, functorch, ew (expanded weights) or ghost clipping. This runs the
project's own `train_local` on synthetic inputs of each model kind's real shape, one mode after the other in one
process, and prints seconds per step and the ratio to `hooks`.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from client.training import DPConfig, LocalTrainConfig, train_local
from common.models import CellDataset, ModelConfig, build_feature_extractor, build_model, cell_grid, prepare_inputs
from common.training_config import GRAD_SAMPLE_MODES


def synthetic_dataset(config: ModelConfig, n: int, seed: int = 0) -> CellDataset:
    """n random preprocessed images turned into the model's real inputs, with labels and cell targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, config.image_size, config.image_size, generator=g)
    with torch.no_grad():
        inputs = prepare_inputs(images, config, build_feature_extractor(config))
    labels = torch.arange(n) % 3
    grid = cell_grid(config)
    targets = torch.full((n, grid, grid), -1)
    targets[labels == 0] = 0
    return CellDataset(inputs, labels, targets)


def time_mode(config: ModelConfig, data: CellDataset, mode: str, *, steps: int, batch_size: int) -> float:
    """Seconds per DP-SGD step (after one warm-up step) for `mode`."""
    train = LocalTrainConfig(batch_size=batch_size, max_steps=1, seed=1, dp=DPConfig(grad_sample_mode=mode))
    train_local(build_model(config), data, config=train, accountant_state=None, device="cpu")  # warm-up
    timed = LocalTrainConfig(batch_size=batch_size, max_steps=steps, seed=1, dp=DPConfig(grad_sample_mode=mode))
    model = build_model(config)
    start = time.perf_counter()
    outcome = train_local(model, data, config=timed, accountant_state=None, device="cpu")
    return (time.perf_counter() - start) / outcome.steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--kinds", nargs="+", default=["effnet_head", "effnet_finetune", "cnn"])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"# grad-sample modes: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, image {args.image_size}px, batch {args.batch_size}, "
          f"{args.steps} steps")
    print(f"{'model':<16} {'mode':<10} {'s/step':>8} {'vs hooks':>9}")
    for kind in args.kinds:
        config = ModelConfig(kind=kind, image_size=args.image_size)
        data = synthetic_dataset(config, n=4 * args.batch_size)
        seconds = {mode: time_mode(config, data, mode, steps=args.steps, batch_size=args.batch_size)
                   for mode in GRAD_SAMPLE_MODES}
        for mode, value in seconds.items():
            print(f"{kind:<16} {mode:<10} {value:8.3f} {value / seconds['hooks']:8.2f}x")


if __name__ == "__main__":
    main()
