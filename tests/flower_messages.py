"""Test doubles for driving the strategy and the ClientApp with real Flower Messages outside a running Flower.

``NodesGrid`` stands in for the Grid only where no Flower component can: the strategy's configure hooks need the
list of connected nodes and nothing else. ``serverapp_identity`` gives Messages the run/node/task ids that
Flower's runtime sets in a real ServerApp or ClientApp process.
"""

from __future__ import annotations

import pytest
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity


class NodesGrid(Grid):
    """A grid that only knows which nodes are connected (sampling is all configure_* needs from it)."""

    def __init__(self, node_ids):
        self._ids = list(node_ids)

    def get_node_ids(self):
        return list(self._ids)

    def set_run(self, run):  # pragma: no cover - not used by the hooks under test
        raise NotImplementedError

    @property
    def run(self):  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args, **kwargs):  # pragma: no cover
        raise NotImplementedError

    def push_messages(self, messages):  # pragma: no cover
        raise NotImplementedError

    def pull_messages(self, message_ids):  # pragma: no cover
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):  # pragma: no cover
        raise NotImplementedError


@pytest.fixture
def serverapp_identity(monkeypatch):
    """Messages take run/node/task ids from the process identity, which Flower sets when it runs an app."""
    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)
