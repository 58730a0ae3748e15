"""Distributed DP over secure aggregation: the noise is shared out, only the SecAgg+ sum is revealed.

An in-process federation of three virtual hospitals (Flower's Simulation Engine, the project's real ServerApp and
ClientApp with Flower's real SecAggPlusWorkflow and secaggplus_mod, real Opacus, real mini-MIAS). The ServerApp
is wrapped so that every reply reaching it is recorded, and a client mod between SecAgg+ and the handler writes
each hospital's clear gradient sum to disk (the only place it exists): no reply carries it, the masked vectors do
not resemble it, and the revealed mean is their mean. In round 2 hospital 2 dies while training: the round completes
from the other two (the SecAgg+ threshold), and the noise recorded for the sum is that of the two shares present.
In round 3 hospital 1's own budget (checked, by default, on its own share's epsilon) would be exceeded: it
refuses, the protocol treats it as a dropout, the refusal is counted and named, and it spends nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import MessageType
from flwr.common import bytes_to_ndarray
from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
from flwr.common.secure_aggregation.ndarrays_arithmetic import (factor_combine, factor_extract, parameters_addition,
                                                                parameters_mod, parameters_subtraction)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen
from flwr.serverapp import ServerApp
from flwr.supercore.primitives.asymmetric import generate_key_pairs
from opacus.accountants import RDPAccountant

from client.app import make_client_app
from client.hospital_data import held_out_test_set, simulation_partition, split_train_val
from common.evaluation import evaluate_model
from common.privacy import PrivacyAccountant
from common.distributed_dp import (MODULUS_RANGE, SecureSumError, SecureSumRange, check_secure_sum,
                                   reconstruction_threshold, secure_sum_range, share_noise_multiplier,
                                   sum_noise_multiplier, value_bound)
from common.run_config import RunConfig
from server.app import run_federation
from server.run_directory import load_metrics, outcome_entry

BACKEND = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}}
DELTA = 1e-5


# ---------------------------------------------------------------- sizing (pure)
def test_noise_shares_sum_to_the_target_for_any_revealed_sum():
    assert reconstruction_threshold(3, 1) == 2 and reconstruction_threshold(10, 3) == 7
    assert reconstruction_threshold(3, 5) == 2  # never below 2
    with pytest.raises(SecureSumError):
        reconstruction_threshold(1, 0)
    share = share_noise_multiplier(1.75, 7)
    assert share == pytest.approx(1.75 / math.sqrt(7))
    assert sum_noise_multiplier(share, 7) == pytest.approx(1.75)
    assert sum_noise_multiplier(share, 10) > 1.75  # more contributors than the threshold: more noise


def test_secure_sum_cannot_overflow_or_clip_at_the_bound():
    """Every participant uploads values at +bound and -bound; Flower's quantisation, masking and modular sum
    give back the exact mean (within one quantisation step): no wrap-around, no clipping."""
    participants, share = 10, share_noise_multiplier(1.75, 9)
    sum_range = secure_sum_range(participants=participants, batch_size=22, share=share, parameters=600)
    assert participants * sum_range.quantization_range < MODULUS_RANGE
    assert sum_range.clipping_range == value_bound(batch_size=22, share=share, parameters=600)
    bound = sum_range.clipping_range
    uploads = [[np.array([bound, -bound, bound * (k % 2), -bound * 0.5], dtype=np.float64)]
               for k in range(participants)]
    keys = [generate_key_pairs() for _ in range(participants)]
    total = None
    for k, upload in enumerate(uploads):  # what secaggplus_mod does with weight 1 (max_weight 1)
        quantized = factor_combine(sum_range.quantization_range,
                                   quantize(upload, sum_range.clipping_range, sum_range.quantization_range))
        shapes = [a.shape for a in quantized]
        for j in range(participants):  # pairwise masks cancel in the sum
            if j == k:
                continue
            secret = generate_shared_key(keys[k][0], keys[j][1])
            mask = pseudo_rand_gen(secret, sum_range.modulus_range, shapes)
            quantized = (parameters_addition if k > j else parameters_subtraction)(quantized, mask)
        quantized = parameters_mod(quantized, sum_range.modulus_range)
        total = quantized if total is None else parameters_addition(total, quantized)
    total = parameters_mod(total, sum_range.modulus_range)
    weight, values = factor_extract(total)  # what SecAggPlusWorkflow's unmask stage does
    assert weight == participants * sum_range.quantization_range
    mean = dequantize(values, sum_range.clipping_range, sum_range.quantization_range)[0]
    mean = (mean - (participants - 1) * sum_range.clipping_range) / participants
    expected = np.mean([u[0] for u in uploads], axis=0)
    step = 2 * sum_range.clipping_range / sum_range.quantization_range
    np.testing.assert_allclose(mean, expected, atol=step)
    # one more participant than the range was sized for can wrap around: refused
    with pytest.raises(SecureSumError, match="wrap around"):
        SecureSumRange(sum_range.clipping_range, sum_range.quantization_range, sum_range.modulus_range,
                       participants=2 * participants)
    # a node refuses a clipping range below its own bound, and accepts the coordinator's sizing
    assert check_secure_sum(sum_range, batch_size=22, share=share, parameters=600) is None
    smaller = SecureSumRange(bound / 2, sum_range.quantization_range, sum_range.modulus_range, participants)
    assert "values would be clipped" in check_secure_sum(smaller, batch_size=22, share=share, parameters=600)


# ---------------------------------------------------------------- the federation
class RecordingGrid:
    """The ServerApp's grid, recording every reply that reaches the coordinator."""

    def __init__(self, grid, replies: list):
        self._grid, self.replies = grid, replies

    def send_and_receive(self, messages, *, timeout=None):
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies

    def __getattr__(self, name):
        return getattr(self._grid, name)


def clear_updates_to(folder: Path):
    """A client mod behind SecAgg+: saves each hospital's clear reply arrays (test only, on the 'hospital')."""
    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type == MessageType.TRAIN and "fitres.parameters" in reply.content.array_records:
            arrays = [a.numpy() for a in reply.content.array_records["fitres.parameters"].values()]
            rnd = int(msg.content.config_records["fitins.config"]["server-round"])
            np.savez(folder / f"round{rnd}-hospital{context.node_config['partition-id']}.npz", *arrays)
        return reply
    return mod


def hospital_2_dies_training_round_2(msg, context, call_next):
    if (msg.metadata.message_type == MessageType.TRAIN and context.node_config["partition-id"] == 2
            and "fitins.config" in msg.content.config_records
            and msg.content.config_records["fitins.config"]["server-round"] == 2):
        raise RuntimeError("hospital 2 lost power while training")
    return call_next(msg, context)


@pytest.mark.slow
def test_three_hospitals_secure_rounds_reveal_only_the_sum(mias_dir, tmp_path, capfd, console_noise):
    from flwr.simulation import run_simulation

    run_dir, state, clear = tmp_path / "run", tmp_path / "hospitals", tmp_path / "clear"
    clear.mkdir()
    overrides = {"model": "cnn", "image-size": 64, "num-server-rounds": 3, "batch-size": 4, "lr": 0.5,
                 "noise-multiplier": 1.5, "min-nodes": 3, "min-train-replies": 2, "min-evaluate-replies": 2,
                 "round-timeout": 300.0, "sim-data-dir": str(mias_dir), "sim-state-dir": str(state),
                 "sim-max-patients": 18, "sim-test-fraction": 0.2, "val-fraction": 0.25, "run-dir": str(run_dir)}
    config = RunConfig.from_flower(overrides)
    assert config.distributed_dp  # auto: three hospitals planned
    share = share_noise_multiplier(1.5, 2)
    records = simulation_partition(mias_dir, config, partition_id=1, num_partitions=3)
    train, _ = split_train_val(records, val_fraction=config.val_fraction, seed=config.seed)
    rate = 1 / math.ceil(len(train) / config.batch_size)
    two, three = (PrivacyAccountant(history=[(share, rate, k)]).epsilon(DELTA) for k in (2, 3))
    # Hospital 1 can afford rounds 1 and 2, not 3. Evaluations are released in clear here (noised ones are tested in
    # tests/test_node_policy.py), so the ledgers hold the training rounds only.
    clear_evaluation = {"evaluation": "clear"}
    budget = {0: clear_evaluation, 1: {**clear_evaluation, "max-epsilon": (two + three) / 2}, 2: clear_evaluation}
    replies: list = []

    def central(run):
        test = held_out_test_set(run, cache_dir=Path(run.sim_state_dir) / "coordinator")
        return lambda model: outcome_entry(evaluate_model(model, test))

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context):
        run_federation(RecordingGrid(grid, replies), config, central_evaluator=central)

    client_app = make_client_app(overrides=overrides, node_overrides=budget,
                                 mods=[clear_updates_to(clear), hospital_2_dies_training_round_2])
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=3, backend_config=BACKEND)

    # What the hospitals (Ray actors) printed: their own warnings, none of the known third-party noise.
    console = "".join(capfd.readouterr())
    assert "refused: privacy budget would exceed max-epsilon" in console
    assert console_noise(console) == {}

    metrics = load_metrics(run_dir)
    assert metrics["status"] == "completed", metrics.get("error")
    round1, round2, round3 = metrics["rounds"]
    assert round1["secure_aggregation"]["participants"] == 3 and round1["secure_aggregation"]["threshold"] == 2
    assert round1["secure_aggregation"]["contributors"] == 3
    assert round1["secure_aggregation"]["noise_multiplier_of_sum"] == pytest.approx(share * math.sqrt(3))
    assert round2["secure_aggregation"]["contributors"] == 2  # hospital 2 died: two shares in the sum
    assert round2["secure_aggregation"]["noise_multiplier_of_sum"] == pytest.approx(1.5)
    assert (round2["replies"]["train"]["valid"], round2["replies"]["train"]["failed"]) == (2, 1)
    assert round1["train_loss"] is None  # no per-hospital loss leaves a node in distributed mode
    train3 = round3["replies"]["train"]
    assert (train3["valid"], train3["refused"], round3["secure_aggregation"]["contributors"]) == (2, 1, 2)
    assert "would exceed max-epsilon" in train3["notes"][0] and "of this node's own noise" in train3["notes"][0]
    assert train3["notes"][0].startswith("node-")  # the one participant that did not contribute

    # Nothing in clear: every reply's arrays are empty; masked vectors look nothing like the clear sums.
    saved = {}
    for path in clear.glob("*.npz"):
        with np.load(path) as arrays:
            saved[path.stem] = [arrays[f"arr_{i}"] for i in range(len(arrays.files))]
    assert sorted(saved) == ["round1-hospital0", "round1-hospital1", "round1-hospital2", "round2-hospital0",
                             "round2-hospital1", "round3-hospital0", "round3-hospital2"]
    masked = []
    for reply in replies:
        if not reply.has_content():
            continue
        assert all(len(record) == 0 for record in reply.content.array_records.values())
        configs = reply.content.config_records.get("secaggplus_configs", {})
        if "masked_params" in configs:
            masked.append([bytes_to_ndarray(b) for b in configs["masked_params"]])
    assert len(masked) == 7
    clear_flat = [np.concatenate([a.ravel() for a in arrays]) for arrays in saved.values()]
    for vector in masked:
        flat = np.concatenate([a.ravel() for a in vector[1:]]).astype(np.float64)
        for update in clear_flat:
            assert abs(np.corrcoef(flat, update)[0, 1]) < 0.2  # uniform masks, not the update
    # The revealed mean is the mean of the hidden sums: the global step equals the pooled one.
    checkpoint1 = np.load(run_dir / "checkpoints" / "round-0001.npz")
    checkpoint2 = np.load(run_dir / "checkpoints" / "round-0002.npz")
    step = config.lr * config.max_grad_norm / config.batch_size
    names = [k for k in checkpoint2.files if k.startswith("model:")]
    round2_mean = [np.mean([saved[f"round2-hospital{h}"][i] for h in (0, 1)], axis=0) for i in range(len(names))]
    for i, name in enumerate(names):
        np.testing.assert_allclose(checkpoint2[name], checkpoint1[name] - step * round2_mean[i], atol=1e-4)

    # Both epsilons per hospital, equal to Opacus' RDP accountant fed the share and the sum.
    for hospital, rounds in (("partition-0", 3), ("partition-1", 2)):
        entry = metrics["privacy"][hospital]
        ledger = json.loads((state / f"hospital-{hospital[-1]}" / "privacy-ledger.json").read_text())
        assert len(ledger["entries"]) == rounds  # hospital 1 refused round 3 and spent nothing on it
        rate = ledger["history"][0][1]
        own, summed = RDPAccountant(), RDPAccountant()
        own.history, summed.history = [(share, rate, rounds)], [(1.5, rate, rounds)]
        assert entry["epsilon_own_noise"] == pytest.approx(own.get_epsilon(DELTA))
        assert entry["epsilon"] == pytest.approx(summed.get_epsilon(DELTA))
        assert entry["epsilon"] < entry["epsilon_own_noise"]
        assert entry["noise_multiplier"] == pytest.approx(share)
        assert entry["aggregate_noise_multiplier"] == pytest.approx(1.5)
    assert metrics["privacy"]["partition-1"]["epsilon_own_noise"] == pytest.approx(two)
    assert round3["epsilon_max"] == pytest.approx(max(metrics["privacy"][h]["epsilon"]
                                                      for h in ("partition-0", "partition-2")))
    dead = json.loads((state / "hospital-2" / "privacy-ledger.json").read_text())
    assert [e["server_round"] for e in dead["entries"]] == [1, 3]  # died before training round 2: nothing spent
