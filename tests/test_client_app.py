"""The ClientApp's handlers called directly with real Messages: refusals and what a failure tells the coordinator."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import NodeFailure, make_client_app
from common import wire

pytestmark = pytest.mark.usefixtures("serverapp_identity")


def _instruction(server_round: int) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(tmp_path, **node) -> Context:
    node_config = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"), "max-epsilon": 5.0,
                   **node}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


def test_deployed_node_refuses_training_without_dp_and_sends_no_weights(tmp_path):
    app = make_client_app(overrides={"dp": False})
    reply = app(_instruction(1), _context(tmp_path, **{"max-epsilon": 3.0}))
    assert wire.ARRAYS not in reply.content.array_records
    metrics = reply.content[wire.METRICS]
    assert (metrics[wire.REFUSED], metrics[wire.NUM_EXAMPLES], metrics[wire.MAX_EPSILON]) == (1.0, 0, 3.0)
    assert "trains only with DP" in reply.content[wire.REFUSAL][wire.REASON]


def test_a_failure_reaches_the_coordinator_without_its_message(tmp_path):
    (tmp_path / "data" / "secret-patient-folder").mkdir(parents=True)
    app = make_client_app()
    with pytest.raises(NodeFailure) as error:
        app(_instruction(1), _context(tmp_path, **{"data-dir": str(tmp_path / "data" / "secret-patient-folder")}))
    assert str(error.value) == ("HospitalDataError during training; the details are in the hospital's own log")
    assert "secret" not in str(error.value) and error.value.__cause__ is None


# ---------------------------------------------------------------- distributed noise needs secure aggregation
def test_distributed_run_refuses_a_plain_training_message(tmp_path):
    """In distributed mode a node adds only its share of the noise: its update must never leave in clear."""
    app = make_client_app(overrides={"dp-mode": "distributed"})
    reply = app(_instruction(1), _context(tmp_path))
    assert wire.ARRAYS not in reply.content.array_records
    assert reply.content[wire.METRICS][wire.REFUSED] == 1.0
    assert "needs secure aggregation" in reply.content[wire.REFUSAL][wire.REASON]


def test_secure_round_instruction_without_secagg_is_refused(tmp_path):
    """A legacy training instruction that did not come through SecAgg+ (no protocol state on the node)."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.common import FitIns, ndarrays_to_parameters

    from client.app import NodeRefusal

    fitins = FitIns(ndarrays_to_parameters([np.zeros(2, dtype=np.float32)]),
                    {wire.SERVER_ROUND: 1, wire.WEIGHT_KEYS: "w"})
    msg = Message(compat.fitins_to_recorddict(fitins, True), dst_node_id=7, message_type=MessageType.TRAIN)
    with pytest.raises(NodeRefusal, match="without secure aggregation"):
        make_client_app(overrides={"dp-mode": "distributed"})(msg, _context(tmp_path))


@pytest.mark.parametrize("case, reason", [
    ("threshold below the policy", "allows at most 1 (secagg-max-dropouts)"),
    ("threshold of one", "is not between 2 and the"),
    ("clipping range too small", "values would be clipped"),
    ("weights count", "max weight 1000"),
    ("dp off", "needs dp = true"),
])
def test_node_refuses_secure_rounds_its_policy_does_not_allow(tmp_path, case, reason):
    from client.node import SecureRoundTerms, train_secure_round
    from common.distributed_dp import SecureSumRange, secure_sum_range, share_noise_multiplier
    from common.models import build_model
    from common.run_config import NodeConfig, RunConfig
    from common.weights import exchanged_weights

    run = RunConfig.from_flower({"model": "cnn", "image-size": 64, "dp-mode": "distributed", "batch-size": 4,
                                 "dp": case != "dp off"})
    node = NodeConfig.from_flower({"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"),
                                   "max-epsilon": 5.0}, run=run)
    weights = exchanged_weights(build_model(run.model_config()))
    participants, threshold = 5, {"threshold below the policy": 3, "threshold of one": 1}.get(case, 4)
    sized = secure_sum_range(participants=participants, batch_size=4, parameters=sum(v.size for v in weights.values()),
                             share=share_noise_multiplier(run.noise_multiplier, max(threshold, 1)))
    if case == "clipping range too small":
        sized = SecureSumRange(sized.clipping_range / 3, sized.quantization_range, sized.modulus_range, participants)
    terms = SecureRoundTerms(participants=participants, threshold=threshold, sum_range=sized,
                             max_weight=1000.0 if case == "weights count" else 1.0)
    result = train_secure_round(run=run, node=node, global_weights=weights, server_round=1, terms=terms)
    assert result.refused and reason in result.refusal and result.gradient_sum is None
    assert not (tmp_path / "state" / "privacy-ledger.json").exists()  # nothing spent
