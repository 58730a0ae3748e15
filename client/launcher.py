"""The hospital's warm ClientApp launcher: one long-lived process serves every message of its SuperNode.

A SuperNode started with ``--isolation process`` launches nothing: it queues one task per message on its Runtime
API, and an outside process must acquire the task's token and run the app. Flower's ``flwr-clientapp`` does that
for ONE token and exits, paying process start, the FAB install and the torch/Opacus imports on every message. The
launcher instead loops, in one process with torch, Opacus and the node's data already loaded:

1. acquire the next ClientApp task from the SuperNode (``AcquireTask``, signed with the SuperExec secret that the
   SuperNode was started with, so no other local process can take the node's tasks);
2. with the task's token, pull the message, context, run and FAB with the calls ``flwr-clientapp`` makes
   (Flower's ``pull_task_input``, polling the SuperNode's store faster while the message is still arriving),
   and keep the task alive with Flower's task heartbeat while it runs;
3. check the FAB against the hospital's allow-list (:mod:`client.app_approval`): an app the hospital did not
   approve gets an error reply naming the refusal, nothing else runs (no training, no budget spent) and the
   refusal is logged; an approved app runs as the hospital's OWN installed ``client.app:app``: never the code in
   the FAB, which is not even installed;
4. push the reply and the context back (Flower's ``push_message``/``push_task_output``).

Per-message timings (pull, check, handle = the app's own work, push, and the rest) are appended as JSON lines to
``timings.jsonl`` in the launcher's folder; refusals to ``refusals.jsonl``. SIGTERM stops the loop after the
message in hand (a second SIGTERM exits at once).
"""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
from flwr.app import Context, Message
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest, SendTaskHeartbeatRequest
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender
from flwr.supercore.interceptors import (
    RuntimeTokenHttpInterceptor,
    RuntimeVersionHttpInterceptor,
    SuperExecAuthHttpInterceptor,
)
from flwr.supercore.retry import RetryInvoker, exponential
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.common.serde import context_from_proto, fab_from_proto, run_from_proto
from flwr.proto.node_pb2 import Node
from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullTaskInputRequest
from flwr.supercore.fab import Fab
from flwr.supercore.inflatable.inflatable_protobuf_utils import (
    make_confirm_message_received_fn_protobuf,
    make_pull_object_fn_protobuf,
)
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_and_inflate_object_from_tree
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity
from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

from client.app_approval import AllowList

__all__ = ["Launcher", "MessageTimings", "TIMINGS_FILE", "REFUSALS_FILE"]

log = logging.getLogger(__name__)

TIMINGS_FILE = "timings.jsonl"
REFUSALS_FILE = "refusals.jsonl"
_ACQUIRE = "/flwr.proto.Runtime/AcquireTask"
_TASK_RETRY_SECONDS = 60.0  # how long one task's calls retry a SuperNode that does not answer
_COMPONENT = "flwr-clientapp"  # what the SuperNode's version check expects from an app process


@dataclass(frozen=True)
class MessageTimings:
    """One message at the node, in seconds: ``total`` runs from the task's creation at the SuperNode (which
    happens as the message starts to arrive) to its output pushed back (the reply is ready to leave).
    ``overhead`` is the node's per-message cost: all of it but the app's own work (``handle``) and the wait for
    the message itself to arrive (``arrival``: network and SuperLink time, which a fresh ``flwr-clientapp`` pays
    too, hidden behind its imports)."""

    run_id: int
    message_type: str
    approved: bool
    status: str
    acquired_at: float  # wall clock (time.time) when the token was acquired
    queued: float  # from the task's creation at the SuperNode to its acquisition here
    arrival: float  # part of `pull`: the message still arriving at the SuperNode (its download from the SuperLink)
    pull: float
    check: float
    handle: float
    push: float
    total: float

    @property
    def overhead(self) -> float:
        return self.total - self.handle - self.arrival

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "overhead": round(self.overhead, 4)})


@dataclass
class Launcher:
    """Serves the ClientApp tasks of one SuperNode (Runtime API at `runtime_api_address`) in this process."""

    runtime_api_address: str
    allowed: AllowList
    client_app: ClientApp
    log_dir: Path
    superexec_secret: bytes | None = None
    poll_interval: float = 0.2
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        interceptors: list = [RuntimeVersionHttpInterceptor(component_name="SuperExec")]
        if self.superexec_secret:
            interceptors.append(SuperExecAuthHttpInterceptor(master_secret=self.superexec_secret,
                                                             protected_methods={_ACQUIRE}))
        self._tasks = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address, insecure=True, root_certificates=None,
            interceptors=interceptors, retry_invoker=_retry_invoker(max_tries=1))

    def handle_sigterm(self) -> None:
        """SIGTERM/SIGINT: finish the message in hand, then stop; a second signal exits at once."""
        def on_signal(signum: int, _frame) -> None:
            if self.stop.is_set():
                raise SystemExit(128 + signum)
            log.info("signal %d: stopping after the message in hand", signum)
            self.stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def serve(self, *, alive: Callable[[], bool] = lambda: True) -> None:
        """Acquire and serve tasks until `stop` is set or `alive()` turns false (the SuperNode exited)."""
        log.info("launcher serving %s; %d approved app(s)", self.runtime_api_address, len(self.allowed.hashes))
        try:
            while not self.stop.is_set() and alive():
                try:
                    response = self._tasks.AcquireTask(
                        AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP.value]))
                except httpx.HTTPError as error:
                    log.warning("cannot reach the SuperNode's Runtime API: %s", error)
                    self.stop.wait(1.0)
                    continue
                if response.HasField("task") and response.token:
                    self.serve_token(response.token, pending_at=response.task.pending_at)
                    continue
                self.stop.wait(self.poll_interval)
        finally:
            self._tasks.close()

    def serve_token(self, token: str, *, pending_at: str = "") -> MessageTimings | None:
        """Serve one task: pull, check the app, run it here or refuse, push. Returns the message's timings;
        `pending_at` (the task's creation time at the SuperNode, ISO 8601) gives the time it waited."""
        acquired_at, start = time.time(), time.monotonic()
        queued = _seconds_since(pending_at, acquired_at)
        client = RuntimeHttpClient.from_server_address(
            server_address=self.runtime_api_address, insecure=True, root_certificates=None,
            interceptors=[RuntimeVersionHttpInterceptor(component_name=_COMPONENT),
                          RuntimeTokenHttpInterceptor(token)],
            retry_invoker=_retry_invoker(max_time=_TASK_RETRY_SECONDS))
        heartbeat = HeartbeatSender(_task_heartbeat(client))
        heartbeat.start()
        message: Message | None = None
        context: Context | None = None
        reply: Message | None = None
        sub_status, details = SubStatus.FAILED, "the hospital's launcher failed before running the app"
        approved = False
        marks = {"pulled": start, "checked": start, "handled": start}
        arrival = 0.0
        try:
            message, context, run, fab, arrival = _pull_task_input(client)
            marks["pulled"] = marks["checked"] = marks["handled"] = time.monotonic()
            refusal = self.allowed.refusal(declared_hash=fab.hash_str, fab_bytes=fab.content)
            marks["checked"] = marks["handled"] = time.monotonic()
            if refusal is not None:
                log.error("run %s, %s message: %s", run.run_id, message.metadata.message_type, refusal)
                self._record_refusal(run.run_id, message.metadata.message_type, fab.hash_str, refusal)
                reply = Message(Error(code=ErrorCode.INVALID_FAB, reason=refusal), reply_to=message)
                details = refusal
            else:
                approved = True
                reply = self.client_app(message=message, context=context)
                marks["handled"] = time.monotonic()
                sub_status, details = SubStatus.COMPLETED, ""
        except Exception as error:  # noqa: BLE001 - reported to the SuperNode as flwr-clientapp would
            marks["handled"] = time.monotonic()
            log.exception("ClientApp raised an exception")
            details = f"{type(error)}:<'{error}'>"
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=details), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception:  # noqa: BLE001 - the SuperNode's expiry handling answers for this task
                log.exception("failed to push the reply")
            push_task_output(client=client, context=context, sub_status=sub_status, details=details)
            if heartbeat.is_running:
                heartbeat.stop()
            client.close()
        if message is None or context is None:
            return None
        end = time.monotonic()
        timings = MessageTimings(
            run_id=int(context.run_id), message_type=str(message.metadata.message_type), approved=approved,
            status=sub_status, acquired_at=acquired_at, queued=queued, arrival=arrival, pull=marks["pulled"] - start,
            check=marks["checked"] - marks["pulled"], handle=marks["handled"] - marks["checked"],
            push=end - marks["handled"], total=queued + end - start)
        with open(self.log_dir / TIMINGS_FILE, "a", encoding="utf-8") as handle:
            handle.write(timings.to_json() + "\n")
        log.info("run %s, %s message %s in %.2f s (app %.2f s, overhead %.2f s)", timings.run_id,
                 timings.message_type, "served" if approved else "refused", timings.total, timings.handle,
                 timings.overhead)
        return timings

    def _record_refusal(self, run_id: int, message_type: str, declared_hash: str, reason: str) -> None:
        entry = {"time": time.time(), "run_id": int(run_id), "message_type": str(message_type),
                 "declared_hash": declared_hash, "reason": reason}
        with open(self.log_dir / REFUSALS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")


# The SuperNode queues the task before it has downloaded the message's objects from the SuperLink; Flower's
# object pull then backs off 1, 2, 4, 8 s. A fresh flwr-clientapp rarely notices (it spends seconds importing
# first); a warm launcher asks at once, so it polls the SuperNode's own loopback store more often instead.
_PULL_BACKOFF = 0.05
_PULL_BACKOFF_CAP = 0.5


def _pull_task_input(client: RuntimeHttpClient) -> tuple[Message, Context, Run, Fab, float]:
    """Flower's ``run_clientapp.pull_task_input`` (same calls, same order), with a short object-pull backoff.
    Also returns how long the message was still arriving at the SuperNode (until its last "object unavailable"
    answer): the SuperNode's download from the SuperLink, not this node's work."""
    start = time.monotonic()
    response = client.PullTaskInput(PullTaskInputRequest())
    TaskIdentity.task_id = response.task_id
    TaskIdentity.run_id = response.run.run_id
    TaskIdentity.node_id = response.context.node_id
    context = context_from_proto(response.context)
    run = run_from_proto(response.run)
    fab = fab_from_proto(response.fab)
    messages = client.PullMessages(PullAppMessagesRequest())
    if not messages.messages_list:
        raise RuntimeError("No messages received from Runtime API")
    node = Node(node_id=context.node_id)
    tree = messages.message_object_trees[0]
    pull_object = make_pull_object_fn_protobuf(client.PullObject, node, context.run_id)
    arriving = [start]

    def pull_arrived_object(object_id: str) -> bytes:
        try:
            return pull_object(object_id)
        except ObjectUnavailableError:
            arriving[0] = max(arriving[0], time.monotonic())
            raise

    message = pull_and_inflate_object_from_tree(
        tree, pull_arrived_object,
        make_confirm_message_received_fn_protobuf(client.ConfirmMessageReceived, node, context.run_id),
        return_type=Message, initial_backoff=_PULL_BACKOFF, backoff_cap=_PULL_BACKOFF_CAP)
    message.metadata.__dict__["_message_id"] = tree.object_id  # the deflated message does not carry its own id
    return message, context, run, fab, arriving[0] - start


def _retry_invoker(*, max_tries: int | None = None, max_time: float | None = None) -> RetryInvoker:
    """Retries on transport errors only. Flower's own HTTP invoker for app processes raises SIGINT on a 401 and
    retries a dead SuperNode forever, fitting a process that serves one message, not this long-lived one."""
    return RetryInvoker(lambda: exponential(max_delay=5), httpx.TransportError, max_tries=max_tries,
                        max_time=max_time)


def _seconds_since(iso_time: str, now: float) -> float:
    """Seconds from an ISO 8601 time (the SuperNode's task creation) to `now` (time.time); 0 if unknown."""
    try:
        created = datetime.fromisoformat(iso_time)
    except (TypeError, ValueError):
        return 0.0
    if created.tzinfo is None:
        created = created.replace(tzinfo=timezone.utc)
    return max(0.0, now - created.timestamp())


def _task_heartbeat(client: RuntimeHttpClient) -> Callable[[], bool]:
    """Flower's task heartbeat, without its reaction to an expired task (Flower's raises SIGINT, which would stop
    this long-lived process: here the message in hand just finishes and its late reply is dropped)."""
    request = SendTaskHeartbeatRequest()

    def beat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except httpx.TransportError:
            return False
        except httpx.HTTPStatusError as error:
            if error.response.status_code in (httpx.codes.SERVICE_UNAVAILABLE, httpx.codes.GATEWAY_TIMEOUT):
                return False
            raise
        if not response.success:
            log.warning("the SuperNode no longer knows the task in hand (expired)")
        return True

    return beat
