"""The ClientApp's handlers called directly with real Messages: refusals and what a failure tells the coordinator."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from client.app import NodeFailure, make_client_app
from common import wire


@pytest.fixture(autouse=True)
def _serverapp_identity(monkeypatch):
    """Instruction Messages take their run/node ids from the process identity (set by Flower's runtime)."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


def _instruction(server_round: int) -> Message:
    content = RecordDict({wire.ARRAYS: ArrayRecord({"w": Array(np.zeros(2, dtype=np.float32))}),
                          wire.CONFIG: ConfigRecord({wire.SERVER_ROUND: server_round})})
    return Message(content, dst_node_id=7, message_type=MessageType.TRAIN)


def _context(tmp_path, **node) -> Context:
    node_config = {"data-dir": str(tmp_path / "data"), "state-dir": str(tmp_path / "state"), **node}
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
