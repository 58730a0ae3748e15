"""Who sent a reply, and whether what it says can be believed: the coordinator's checks on hospital replies.

Identity: a hospital is its Flower node id (``Message.metadata.src_node_id``, set by the SuperLink from the node's
authenticated connection), never a field the node writes into its reply. The ``partition-id`` a simulated node
sends is kept only as a display label (``partition-N``), bound to the first node id that claims it; a second node
claiming the same partition is shown as ``node-<id>`` and never touches the first one's records. After a
coordinator restart (resume), the records of the checkpoint are kept by node id; a simulation restarted with it
gives its virtual nodes new ids, so a record not seen since the restart passes to the first new node claiming its
partition (its epsilon floor and ``num-examples`` go with it). Deployed nodes send no partition and keep their ids.

Rules (each broken rule rejects the reply with a reason; nothing here raises on hostile input):

- a reply answers an instruction of this step, sent to the node it comes from; a second reply of the same node (or
  with the same message id) in one step is a duplicate, ignored and counted;
- ``epsilon`` (and ``epsilon-own-noise``) is one real number >= 0, finite unless the run trains without DP (then
  +inf: no guarantee), and never below what the same node reported earlier in the run (epsilon only grows);
- ``num-examples`` of a train reply is an integer in [1, ``MAX_NUM_EXAMPLES``] and stays what the node declared in
  its first accepted train reply of the run: it is the size of the node's training split, which does not change
  within a run (Poisson sampling varies the batches, not this count). FedAvg weights are these counts, as declared;
  a node that lies from its first reply on is not caught here: the robust aggregations (run config
  ``aggregation``) ignore the counts.

Evaluate replies go through the same identity and duplicate rules; their contents are checked by the strategy
(``server.strategy``: integral counts, noised or not; one number per metric).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from flwr.app import Message, Metadata, MetricRecord

from common import wire

#: Largest `num-examples` a reply may declare (far above any hospital's training split).
MAX_NUM_EXAMPLES = 10_000_000


@dataclass
class NodeRecord:
    """What the coordinator holds about one node (by Flower node id) over a run."""

    node_id: int
    label: str  # display name: "partition-N" (simulation, first claim) or "node-<id>"
    num_examples: int | None = None  # declared in its first accepted train reply; fixed for the run
    epsilon: float | None = None  # highest epsilon accepted from it

    @property
    def name(self) -> str:
        """How logs and notes name the node: its label and its node id."""
        return self.label if self.label == f"node-{self.node_id}" else f"{self.label} (node {self.node_id})"


class NodeRegistry:
    """Nodes by authenticated Flower node id; labels are display names only."""

    def __init__(self) -> None:
        self.nodes: dict[int, NodeRecord] = {}
        self._carried: set[int] = set()  # node ids restored from a checkpoint, not seen since

    def get(self, node_id: int, claimed_partition: object = None) -> NodeRecord:
        """The record of `node_id`, created on first sight. A claimed partition names a node still called
        ``node-<id>`` if no other node holds that name, or hands it a checkpoint's record of that name that no
        node has used since the restart."""
        self._carried.discard(node_id)
        record = self.nodes.get(node_id)
        default = f"node-{node_id}"
        if (record is None or record.label == default) and is_count(claimed_partition):
            claimed = f"partition-{int(claimed_partition)}"
            holder = next((r for r in self.nodes.values() if r.label == claimed), None)
            if holder is None:
                record = record or NodeRecord(node_id=node_id, label=claimed)
                record.label = claimed
            elif holder.node_id in self._carried:
                self._carried.discard(holder.node_id)
                del self.nodes[holder.node_id]
                if record is not None and record.epsilon is not None:
                    holder.epsilon = max(record.epsilon, holder.epsilon or 0.0)
                holder.node_id, record = node_id, holder
        record = record or NodeRecord(node_id=node_id, label=default)
        self.nodes[node_id] = record
        return record

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.nodes.values()]

    @classmethod
    def from_json(cls, rows: list[dict]) -> NodeRegistry:
        registry = cls()
        for row in rows:
            registry.nodes[int(row["node_id"])] = NodeRecord(**row)
        registry._carried = set(registry.nodes)
        return registry


class StepReplies:
    """The replies of one train or evaluate step: who each comes from, and which are duplicates."""

    def __init__(self, sent: list[Metadata]):
        self.to_node = {m.message_id: m.dst_node_id for m in sent if m.message_id}
        self.asked = {m.dst_node_id for m in sent}
        self.seen_nodes: set[int] = set()
        self.seen_messages: set[str] = set()

    def sender(self, msg: Message) -> int:
        """The node a reply stands for. An error reply the SuperLink makes for a node that went offline comes
        from the SuperLink itself, so its node is the destination of the instruction it answers."""
        if msg.has_error():
            return self.to_node.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
        return msg.metadata.src_node_id

    def is_duplicate(self, msg: Message, node_id: int) -> bool:
        """True for a second reply of a node, or a message seen before, in this step (the first one counts)."""
        message_id = msg.metadata.message_id
        if node_id in self.seen_nodes or (message_id and message_id in self.seen_messages):
            return True
        self.seen_nodes.add(node_id)
        if message_id:
            self.seen_messages.add(message_id)
        return False

    def origin_problem(self, msg: Message, node_id: int) -> str | None:
        """Why a content reply does not answer an instruction this step sent to its sender, or None."""
        answered = msg.metadata.reply_to_message_id
        if self.to_node and answered in self.to_node and self.to_node[answered] != node_id:
            return f"answers an instruction sent to node {self.to_node[answered]}"
        if self.to_node and answered not in self.to_node:
            return "answers no instruction of this step"
        if self.asked and node_id not in self.asked:
            return "this node was not asked in this step"
        return None


def epsilon_problem(metrics: MetricRecord, record: NodeRecord, *, dp_required: bool) -> str | None:
    """Why the epsilon a reply reports cannot be accepted from this node, or None."""
    if wire.EPSILON not in metrics:
        return f"no '{wire.EPSILON}'"
    for key in (wire.EPSILON, wire.EPSILON_OWN_NOISE):
        if key not in metrics:
            continue
        value = metrics[key]
        if not is_number(value):
            return f"'{key}' must be one number, got {type(value).__name__}"
        if math.isnan(value) or value < 0:
            return f"'{key}' must be >= 0, got {value!r}"
        if math.isinf(value) and dp_required:
            return f"'{key}' is infinite: this run trains with DP only"
    eps = float(metrics[wire.EPSILON])
    if record.epsilon is not None and eps < record.epsilon:
        return f"'{wire.EPSILON}' {eps:.6g} is below the {record.epsilon:.6g} this node reported earlier in the run"
    return None


def num_examples_problem(value: object, record: NodeRecord) -> str | None:
    """Why a train reply's `num-examples` cannot weigh its update, or None."""
    if not is_count(value) or not 1 <= value <= MAX_NUM_EXAMPLES:
        return f"'{wire.NUM_EXAMPLES}' must be an integer in [1, {MAX_NUM_EXAMPLES}], got {value!r}"
    if record.num_examples is not None and int(value) != record.num_examples:
        return (f"'{wire.NUM_EXAMPLES}' {int(value)} differs from the {record.num_examples} this node declared "
                f"earlier in the run (its training split does not change within a run)")
    return None


def is_number(value: object) -> bool:
    """A real scalar (int or float, not bool; NaN and inf included)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: object) -> bool:
    """A finite integral number (an int, or a float with no fraction)."""
    return is_number(value) and math.isfinite(value) and float(value) == int(value)
