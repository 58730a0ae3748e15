"""The update codec: exact round trips, stated error bounds, sizes, and refusals that name the array."""

from __future__ import annotations

import numpy as np
import pytest

from common.update_encoding import (SCALE_SUFFIX, UpdateEncodingError, decode_update, encode_update,
                                    encoded_nbytes)
from flower_messages import NodesGrid


def _model(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(global weights, trained weights) with float32 tensors of mixed sizes and one integer counter."""
    rng = np.random.default_rng(seed)
    reference = {"head.weight": rng.normal(size=(3, 192)).astype(np.float32),
                 "head.bias": rng.normal(size=(3,)).astype(np.float32),
                 "bn.num_batches_tracked": np.array(7, dtype=np.int64)}
    trained = {"head.weight": (reference["head.weight"] + rng.normal(0, 0.05, (3, 192))).astype(np.float32),
               "head.bias": (reference["head.bias"] + rng.normal(0, 0.05, (3,))).astype(np.float32),
               "bn.num_batches_tracked": np.array(8, dtype=np.int64)}
    return reference, trained


def test_float32_is_the_identity():
    reference, trained = _model()
    encoded = encode_update(trained, reference, "float32")
    assert encoded.keys() == trained.keys()
    decoded = decode_update(encoded, reference, "float32")
    for key in trained:
        assert np.array_equal(decoded[key], trained[key]) and decoded[key].dtype == trained[key].dtype


def test_float16_stays_within_half_precision_of_the_update():
    reference, trained = _model(1)
    encoded = encode_update(trained, reference, "float16")
    assert encoded["head.weight"].dtype == np.float16
    assert encoded["bn.num_batches_tracked"].dtype == np.int64  # not a float: travels unchanged
    decoded = decode_update(encoded, reference, "float16")
    assert decoded.keys() == trained.keys()
    assert int(decoded["bn.num_batches_tracked"]) == 8
    for key in ("head.weight", "head.bias"):
        assert decoded[key].dtype == np.float32
        delta = trained[key].astype(np.float64) - reference[key].astype(np.float64)
        bound = np.abs(delta) * 2.0 ** -11 + 2.0 ** -24 + np.spacing(np.abs(trained[key]))
        assert np.all(np.abs(decoded[key].astype(np.float64) - trained[key]) <= bound)


def test_float16_of_exactly_representable_updates_round_trips_exactly():
    reference = {"w": np.array([1.0, -2.0, 0.5, 3.0], dtype=np.float32)}
    trained = {"w": np.array([1.25, -2.5, 0.5, 3.0078125], dtype=np.float32)}
    decoded = decode_update(encode_update(trained, reference, "float16"), reference, "float16")
    assert np.array_equal(decoded["w"], trained["w"])


def test_int8_error_is_at_most_half_a_step():
    reference, trained = _model(2)
    encoded = encode_update(trained, reference, "int8")
    assert encoded["head.weight"].dtype == np.int8
    assert set(encoded) == {"head.weight", "head.bias", "bn.num_batches_tracked",
                            "head.weight" + SCALE_SUFFIX, "head.bias" + SCALE_SUFFIX}
    decoded = decode_update(encoded, reference, "int8")
    for key in ("head.weight", "head.bias"):
        delta = trained[key].astype(np.float64) - reference[key].astype(np.float64)
        step = np.max(np.abs(delta)) / 127
        assert float(encoded[key + SCALE_SUFFIX][0]) == pytest.approx(step, rel=1e-6)
        assert np.max(np.abs(encoded[key].astype(int))) == 127  # the largest element uses the full range
        error = np.abs(decoded[key].astype(np.float64) - trained[key])
        assert np.all(error <= step / 2 * (1 + 1e-6) + np.spacing(np.abs(trained[key])))


def test_int8_hand_computed_values():
    reference = {"w": np.zeros(4, dtype=np.float32)}
    trained = {"w": np.array([1.27, -1.27, 0.5, 0.004], dtype=np.float32)}  # step 0.01
    encoded = encode_update(trained, reference, "int8")
    assert encoded["w"].tolist() == [127, -127, 50, 0]
    assert np.allclose(decode_update(encoded, reference, "int8")["w"], [1.27, -1.27, 0.5, 0.0], atol=1e-6)


def test_an_unchanged_model_encodes_to_zeros_and_decodes_exactly():
    reference, _ = _model(3)
    for encoding in ("float16", "int8"):
        decoded = decode_update(encode_update(reference, reference, encoding), reference, encoding)
        for key in reference:
            assert np.array_equal(decoded[key], reference[key])


def test_sizes_per_parameter():
    reference, trained = _model(4)
    params = 3 * 192 + 3
    counter = 8  # the int64 counter
    assert encoded_nbytes(encode_update(trained, reference, "float32")) == 4 * params + counter
    assert encoded_nbytes(encode_update(trained, reference, "float16")) == 2 * params + counter
    assert encoded_nbytes(encode_update(trained, reference, "int8")) == params + 2 * 4 + counter


def test_decoding_refuses_what_does_not_fit_naming_the_array():
    reference, trained = _model(5)
    encoded = encode_update(trained, reference, "int8")
    missing_scale = {k: v for k, v in encoded.items() if k != "head.bias" + SCALE_SUFFIX}
    with pytest.raises(UpdateEncodingError, match="head.bias"):
        decode_update(missing_scale, reference, "int8")
    wrong_dtype = {**encoded, "head.weight": encoded["head.weight"].astype(np.int16)}
    with pytest.raises(UpdateEncodingError, match="'head.weight' is int16"):
        decode_update(wrong_dtype, reference, "int8")
    bad_scale = {**encoded, "head.weight" + SCALE_SUFFIX: np.array([np.nan], dtype=np.float32)}
    with pytest.raises(UpdateEncodingError, match="head.weight"):
        decode_update(bad_scale, reference, "int8")
    half = encode_update(trained, reference, "float16")
    with pytest.raises(UpdateEncodingError, match="float16 update carries int8 scales"):
        decode_update({**half, "head.weight" + SCALE_SUFFIX: np.array([1.0], dtype=np.float32)}, reference,
                      "float16")
    with pytest.raises(UpdateEncodingError, match="unknown update encoding 'int4'"):
        decode_update(half, reference, "int4")


def test_encoding_refuses_non_finite_or_out_of_range_updates():
    reference = {"w": np.zeros(2, dtype=np.float32)}
    with pytest.raises(UpdateEncodingError, match="'w' holds NaN"):
        encode_update({"w": np.array([np.nan, 0], dtype=np.float32)}, reference, "int8")
    with pytest.raises(UpdateEncodingError, match="float16 range"):
        encode_update({"w": np.array([1e5, 0], dtype=np.float32)}, reference, "float16")
    with pytest.raises(UpdateEncodingError, match="'v' has no counterpart"):
        encode_update({"v": np.zeros(2, dtype=np.float32)}, reference, "float16")


# ---------------------------------------------------------------- on the wire: run config, client reply, coordinator
def test_the_run_config_knows_every_encoding_and_refuses_them_with_secure_aggregation():
    from common.run_config import UPDATE_ENCODINGS, ConfigError, RunConfig
    from common.update_encoding import ENCODINGS

    assert UPDATE_ENCODINGS == ENCODINGS
    assert RunConfig().update_encoding == "float32"
    assert RunConfig.from_flower({"update-encoding": "int8", "dp-mode": "local"}).update_encoding == "int8"
    with pytest.raises(ConfigError, match="'update-encoding' int8 applies to dp-mode local only"):
        RunConfig.from_flower({"update-encoding": "int8", "dp-mode": "auto", "min-nodes": 3})
    with pytest.raises(ConfigError, match="update-encoding"):
        RunConfig.from_flower({"update-encoding": "int4"})


@pytest.mark.parametrize("encoding", ["float16", "int8"])
def test_the_coordinator_decodes_encoded_replies_before_checking_and_averaging(encoding, serverapp_identity):
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from common import wire
    from common.run_config import RunConfig
    from server.strategy import build_strategy

    reference = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3), "b": np.zeros(3, dtype=np.float32)}
    config = RunConfig.from_flower({"min-nodes": 2, "min-train-replies": 2, "dp-mode": "local",
                                    "update-encoding": encoding, "round-timeout": 2.0,
                                    "max-update-norm": 1e6})  # hand-made updates, larger than DP-SGD's bound
    strategy = build_strategy(config)
    records = ArrayRecord({k: Array(v) for k, v in reference.items()})
    instructions = list(strategy.configure_train(1, records, ConfigRecord(), NodesGrid([11, 12, 13])))

    def reply(instruction, arrays):
        metrics = MetricRecord({wire.NUM_EXAMPLES: 10, wire.TRAIN_LOSS: 0.5, wire.EPSILON: 1.0,
                                wire.EPSILON_OWN_NOISE: 1.0, wire.DELTA: 1e-5, wire.NOISE_MULTIPLIER: 1.0,
                                wire.AGGREGATE_NOISE_MULTIPLIER: 1.0, wire.MAX_GRAD_NORM: 1.0, wire.STEPS: 1,
                                wire.DP_ENABLED: 1.0, wire.REFUSED: 0.0})
        content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(np.ascontiguousarray(v))
                                                        for k, v in arrays.items()}), wire.METRICS: metrics})
        return Message(content, reply_to=instruction)

    one = {"w": reference["w"] + 0.5, "b": reference["b"] + 0.25}
    two = {"w": reference["w"] - 0.25, "b": reference["b"] + 0.75}
    replies = [reply(instructions[0], encode_update(one, reference, encoding)),
               reply(instructions[1], encode_update(two, reference, encoding)),
               reply(instructions[2], one)]  # float32 weights where an encoded update was due: rejected
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert metrics["replies-valid"] == 2 and metrics["replies-rejected"] == 1
    tolerance = 0.75 / 127 if encoding == "int8" else 1e-3
    np.testing.assert_allclose(arrays["w"].numpy(), reference["w"] + 0.125, atol=tolerance)
    np.testing.assert_allclose(arrays["b"].numpy(), reference["b"] + 0.5, atol=tolerance)
    assert arrays["w"].numpy().dtype == np.float32
    assert any(f"update-encoding {encoding}" in note for note in strategy.train_reports[1].notes)


def test_the_node_reply_carries_the_encoded_update_and_its_size_shrinks():
    from bench.bytes import reply_bytes
    from client.app import _train_content
    from client.node import TrainResult
    from common import wire
    from common.run_config import NodeConfig, RunConfig

    reference, trained = _model(6)
    result = TrainResult(weights=trained, num_examples=10, train_loss=0.5, epsilon=1.0, delta=1e-5,
                         noise_multiplier=1.0, max_grad_norm=1.0, steps=1, dp=True, max_epsilon=10.0)
    node = NodeConfig.from_flower({"data-dir": "/nonexistent", "state-dir": "/nonexistent", "max-epsilon": 10.0},
                                  run=RunConfig())
    content = _train_content(result, node, "int8", reference)
    sent = {k: v.numpy() for k, v in content[wire.ARRAYS].items()}
    assert sent["head.weight"].dtype == np.int8
    np.testing.assert_array_equal(sent["head.weight"], encode_update(trained, reference, "int8")["head.weight"])
    sizes = [reply_bytes(reference, e) for e in ("float32", "float16", "int8")]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[0] - sizes[1] >= 2 * (3 * 192 + 3)  # 2 bytes saved per float parameter, framing aside


def test_the_fedsgd_bench_passes_updates_through_the_codec():
    import torch

    from bench.fedsgd import through_the_wire

    start = {"w": torch.zeros(4)}
    weights = {"w": torch.tensor([1.27, -1.27, 0.5, 0.004]), "n": torch.tensor(3)}
    assert through_the_wire(weights, start, "float32") is weights
    decoded = through_the_wire(weights, start, "int8")
    np.testing.assert_allclose(decoded["w"].numpy(), [1.27, -1.27, 0.5, 0.0], atol=1e-6)
    assert int(decoded["n"]) == 3
