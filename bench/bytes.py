"""Bytes on the wire per hospital per round: the training instruction it receives and the reply it sends.

Sizes are of Flower's own serialisation (``flwr.common.serde.recorddict_to_proto``, the protobuf that travels over
gRPC), of the message content: the arrays plus their names, shapes and dtypes, and the metrics or config. Flower's
message metadata (ids, type, timestamps: about 100 bytes) is not counted. The instruction carries the global model
in float32; the reply is built by the ClientApp's own reply function (``client.app._train_content``) from the
model's real travelling weights (``common.weights.exchanged_weights``) under each ``update-encoding``. Distributed
noise (SecAgg+) replies with Flower's masked vector instead: the quantised, masked update as int64 arrays in numpy's
``.npy`` format, 8 bytes per parameter; SecAgg+'s own set-up, key-share and unmasking messages, which grow with the
number of hospitals, come on top (see README, "Performance").

Sizes do not depend on the weights' values (protobuf carries arrays as raw bytes), so random updates serve.
``--quality JSON`` instead reads a ``bench.model_quality`` run with ``--update-encoding float32 float16 int8`` and
prints each encoding's AUC and its paired per-seed difference to float32 (README, "Performance").
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

MODEL_KINDS = ("effnet_head", "cnn", "effnet_finetune")
ENCODINGS = ("float32", "float16", "int8")


def model_weights(kind: str) -> dict[str, np.ndarray]:
    """The weights of model `kind` that travel each round (run config defaults otherwise)."""
    import torch

    from common.models import build_model
    from common.run_config import RunConfig
    from common.weights import exchanged_weights

    torch.manual_seed(0)
    return exchanged_weights(build_model(RunConfig(model=kind).model_config()))


def content_bytes(content) -> int:
    """Serialised size of a Flower RecordDict (what gRPC carries, less the message metadata)."""
    from flwr.common.serde import recorddict_to_proto

    return recorddict_to_proto(content).ByteSize()


def instruction_bytes(weights: dict[str, np.ndarray]) -> int:
    """A training instruction's content: the global model (float32) and the round's config."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    from common import wire

    return content_bytes(RecordDict({wire.ARRAYS: ArrayRecord({k: Array(v) for k, v in weights.items()}),
                                     wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: 1})}))


def reply_bytes(weights: dict[str, np.ndarray], encoding: str, seed: int = 0) -> int:
    """A train reply's content as the ClientApp builds it, with a random update of the model's shape."""
    from client.app import _train_content
    from client.node import TrainResult
    from common.run_config import NodeConfig, RunConfig

    rng = np.random.default_rng(seed)
    trained = {k: (v + rng.normal(0, 0.01, v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v
               for k, v in weights.items()}
    result = TrainResult(weights=trained, num_examples=100, train_loss=0.5, epsilon=1.0, delta=1e-5,
                         noise_multiplier=1.0, max_grad_norm=1.0, steps=10, dp=True, max_epsilon=10.0,
                         epsilon_own_noise=1.0, aggregate_noise_multiplier=1.0)
    node = NodeConfig.from_flower({"partition-id": 0, "num-partitions": 3, "data-dir": "/nonexistent",
                                   "state-dir": "/nonexistent"}, run=RunConfig())
    return content_bytes(_train_content(result, node, encoding, weights))


def secure_reply_bytes(weights: dict[str, np.ndarray]) -> int:
    """A SecAgg+ masked-vector reply's array payload: Flower's ``ndarray_to_bytes`` of int64 arrays (its masked
    vector adds one element, the weight factor, to the first array)."""
    from flwr.common import ndarray_to_bytes

    floats = [v for v in weights.values() if v.dtype.kind == "f"]
    masked = [np.zeros(v.size + (1 if i == 0 else 0), dtype=np.int64) for i, v in enumerate(floats)]
    return sum(len(ndarray_to_bytes(a)) for a in masked)


def measure(kinds: tuple[str, ...] = MODEL_KINDS) -> list[dict]:
    rows = []
    for kind in kinds:
        weights = model_weights(kind)
        params = int(sum(v.size for v in weights.values() if v.dtype.kind == "f"))
        row = {"model": kind, "parameters": params, "instruction": instruction_bytes(weights),
               "secagg_masked_vector": secure_reply_bytes(weights)}
        row.update({f"reply_{e}": reply_bytes(weights, e) for e in ENCODINGS})
        rows.append(row)
    return rows


def encoding_effect(document: dict) -> list[dict]:
    """Per encoded row of a ``bench.model_quality`` JSON: its AUC (mean ± s.e. over seeds) and the paired per-seed
    difference to the float32 row of the same mode, hospitals, epsilon and cell weight."""
    from bench.model_quality import mean_se

    def key(row: dict) -> tuple:
        return row["mode"], row["hospitals"], row["epsilon"], row["cell_loss_weight"], tuple(row["seeds"])

    base = {key(r): r for r in document["rows"] if r.get("update_encoding", "float32") == "float32"}
    out = []
    for row in document["rows"]:
        reference = base.get(key(row))
        if reference is None:
            continue
        mean, se = mean_se(row["aucs"])
        delta, delta_se = mean_se([a - b for a, b in zip(row["aucs"], reference["aucs"])])
        out.append({"name": row["name"], "encoding": row.get("update_encoding", "float32"), "auc": mean,
                    "auc_se": se, "delta": delta, "delta_se": delta_se, "seeds": len(row["aucs"])})
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODEL_KINDS), choices=MODEL_KINDS)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quality", type=Path, metavar="JSON",
                        help="instead: the AUC effect of each update encoding in a bench.model_quality JSON run "
                             "with --update-encoding float32 float16 int8")
    args = parser.parse_args(argv)
    if args.quality:
        print(f"{'row':<66} {'AUC ± s.e.':>14} {'Δ vs float32 (paired)':>22}")
        for r in encoding_effect(json.loads(args.quality.read_text())):
            print(f"{r['name']:<66} {r['auc']:>6.3f} ± {r['auc_se']:.3f} {r['delta']:>+13.4f} ± {r['delta_se']:.4f}")
        return
    rows = measure(tuple(args.models))
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return
    print("# bytes per hospital per round (serialised message content; instruction = global model in float32)")
    print(f"{'model':<16} {'parameters':>10} {'instruction':>12} {'reply f32':>10} {'reply f16':>10} "
          f"{'reply int8':>10} {'SecAgg+ vector':>14}")
    for r in rows:
        print(f"{r['model']:<16} {r['parameters']:>10,} {_size(r['instruction']):>12} {_size(r['reply_float32']):>10} "
              f"{_size(r['reply_float16']):>10} {_size(r['reply_int8']):>10} {_size(r['secagg_masked_vector']):>14}")


def _size(n: int) -> str:
    if n < 10_000:
        return f"{n} B"
    if n < 10_000_000:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.2f} MB"


if __name__ == "__main__":
    main()
