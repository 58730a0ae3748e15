"""What does DP cost per step, per model kind and Opacus grad-sample mode? Seconds and peak memory. (DESIGN §5)

All modes give the same privacy guarantee (same clipping, same noise, same accountant); they differ in how the
per-sample gradients are computed: hooks, functorch, ew (expanded weights) or ghost clipping. ``no DP`` is the same
`train_local` with DP off (plain SGD on the same batches): the reference every ratio is taken against.

Each (model kind, mode) runs in a fresh Python process (``--one KIND MODE``), so its peak memory is its own: the
process's peak resident set (``ru_maxrss``, which includes the interpreter, torch and the data set: compare the
rows, not the absolute numbers) and, on a GPU, ``torch.cuda.max_memory_allocated``. Inside it: synthetic inputs of
the kind's real shape, a warm-up call, then timed calls of the project's own `train_local`. The table gives seconds
per step, the ratio to no DP, the fixed seconds per `train_local` call, and peak memory; rows of one invocation ran one after the other on the
same machine, so their ratios are comparable even when the machine is busy. Seconds per step and per call are
separated as `time_mode` says.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from client.training import DPConfig, LocalTrainConfig, train_local
from common.device import default_device
from common.models import CellDataset, ModelConfig, build_feature_extractor, build_model, cell_grid, prepare_inputs
from common.training_config import GRAD_SAMPLE_MODES

NO_DP = "no-dp"
MODES = (NO_DP, *GRAD_SAMPLE_MODES)


def synthetic_dataset(config: ModelConfig, n: int, seed: int = 0) -> CellDataset:
    """n random preprocessed images turned into the model's real inputs, with labels and cell targets."""
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, config.image_size, config.image_size, generator=g)
    extractor = build_feature_extractor(config)
    with torch.no_grad():  # 4 images at a time: the frozen stage's activations must not set the peak memory
        inputs = torch.cat([prepare_inputs(images[i:i + 4], config, extractor) for i in range(0, n, 4)])
    del extractor
    labels = torch.arange(n) % 3
    grid = cell_grid(config)
    targets = torch.full((n, grid, grid), -1)
    targets[labels == 0] = 0
    return CellDataset(inputs, labels, targets)


def dp_config(mode: str) -> DPConfig:
    return DPConfig(enabled=False) if mode == NO_DP else DPConfig(grad_sample_mode=mode)


def time_mode(config: ModelConfig, data: CellDataset, mode: str, *, steps: int, batch_size: int,
              device: torch.device | str = "cpu") -> tuple[float, float]:
    """(seconds per step, seconds per call) for `mode` (a grad-sample mode, or NO_DP), after a warm-up call.

    A `train_local` call costs a fixed part (wrapping the model and optimiser, computing epsilon once) plus a part
    per step. Timing calls of 1 and 1 + `steps` steps separates them: per step = the difference / `steps`; per call
    = the 1-step call minus one step. FedSGD rounds take one step per call, so both matter."""
    def run(max_steps: int) -> float:
        train = LocalTrainConfig(epochs=max_steps, batch_size=batch_size, max_steps=max_steps, seed=1,
                                 dp=dp_config(mode))
        model = build_model(config)
        start = time.perf_counter()
        outcome = train_local(model, data, config=train, accountant_state=None, device=device)
        if outcome.steps != max_steps:
            raise RuntimeError(f"{outcome.steps} steps taken, {max_steps} asked")
        return time.perf_counter() - start

    run(1)  # warm-up
    one, many = run(1), run(1 + steps)
    per_step = max(many - one, 0.0) / steps
    return per_step, max(one - per_step, 0.0)


def measure_one(kind: str, mode: str, *, image_size: int, batch_size: int, steps: int) -> dict:
    """One (kind, mode) in this process: seconds per step and peak memory (see the module doc)."""
    torch.manual_seed(0)
    device = default_device()
    config = ModelConfig(kind=kind, image_size=image_size)
    data = synthetic_dataset(config, n=4 * batch_size)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    per_step, per_call = time_mode(config, data, mode, steps=steps, batch_size=batch_size, device=device)
    return {"kind": kind, "mode": mode, "seconds_per_step": per_step, "seconds_per_call": per_call,
            "device": device.type,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "peak_gpu_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def measure(kind: str, mode: str, args: argparse.Namespace) -> dict:
    """`measure_one` in a fresh process (its own peak memory)."""
    command = [sys.executable, "-m", "bench.grad_sample_modes", "--one", kind, mode, "--image-size",
               str(args.image_size), "--batch-size", str(args.batch_size), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} {mode} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--kinds", nargs="+", default=["effnet_head", "effnet_finetune", "cnn"])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--json", action="store_true", help="also print every row as JSON")
    parser.add_argument("--one", nargs=2, metavar=("KIND", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(*args.one, image_size=args.image_size, batch_size=args.batch_size,
                                     steps=args.steps)))
        return
    print(f"# DP cost per step: torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}, device {default_device().type}, image "
          f"{args.image_size}px, batch {args.batch_size}, {args.steps} steps; one process per row")
    print(f"{'model':<16} {'mode':<10} {'s/step':>8} {'vs no DP':>9} {'s/call':>7} {'peak RSS MiB':>13} "
          f"{'peak GPU MiB':>13}")
    rows = []
    for kind in args.kinds:
        measured = {mode: measure(kind, mode, args) for mode in args.modes}
        base = measured.get(NO_DP)
        for mode, row in measured.items():
            ratio = row["seconds_per_step"] / base["seconds_per_step"] if base else float("nan")
            gpu = f"{row['peak_gpu_mib']:.0f}" if row["peak_gpu_mib"] is not None else "-"
            print(f"{kind:<16} {mode:<10} {row['seconds_per_step']:8.3f} {ratio:8.2f}x "
                  f"{row['seconds_per_call']:7.3f} {row['peak_rss_mib']:13.0f} {gpu:>13}")
            rows.append({**row, "ratio_to_no_dp": ratio})
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
