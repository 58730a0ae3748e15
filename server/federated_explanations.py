"""Federated explanations: after the last round, every hospital explains the global model on its own validation
images and returns localisation counts only (``common.wire``, query messages); heatmaps stay at the hospitals.

:func:`request_explanations` sends the query and collects replies; :func:`summarise_explanations` (pure) checks
each reply and pools the counts into per-method rates: pointing-game hit rate, mean attribution mass inside the
lesion, and beside each the random-map baseline (mean lesion share of the breast: the expected value of both
for a map with no information).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message_type import MessageType
from flwr.serverapp import Grid

from common import wire

log = logging.getLogger(__name__)


def request_explanations(grid: Grid, weights: dict[str, np.ndarray], methods: Sequence[str], *,
                         timeout: float) -> dict:
    """Ask every connected node to explain `weights`; the run-directory ``explanations`` section."""
    content = RecordDict({wire.ARRAYS: ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
                          wire.CONFIG: ConfigRecord({wire.EXPLAIN_METHODS: ",".join(methods)})})
    nodes = sorted(grid.get_node_ids())
    messages = [Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    sent = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    named = []
    for reply in replies:
        node = sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        metrics = reply.content.metric_records.get(wire.METRICS) if reply.has_content() else None
        partition = metrics.get(wire.PARTITION_ID) if metrics is not None else None
        name = f"partition-{int(partition)}" if isinstance(partition, (int, float)) else f"node-{node}"
        named.append((name, reply.error.reason if reply.has_error() else None, metrics))
    summary = summarise_explanations(named, methods)
    summary["asked"] = len(nodes)
    return summary


def summarise_explanations(replies: Iterable[tuple[str, str | None, dict | None]], methods: Sequence[str]) -> dict:
    """Pool (hospital, error reason or None, reply metrics) into the ``explanations`` section::

        {"methods": [...], "images": N, "hospitals": {name: {"images": n} | {"error": why}},
         "per_method": {method: {"pointing_game": rate, "mass_inside": mean, "random_baseline": mean}},
         "notes": [...]}
    Rates are None when no image was explained. A reply with missing or impossible numbers is left out, named.
    """
    hospitals: dict[str, dict] = {}
    notes: list[str] = []
    images, baseline, noise = 0, 0.0, 0.0
    hits = dict.fromkeys(methods, 0)
    mass = dict.fromkeys(methods, 0.0)
    for name, error, metrics in replies:
        if error is not None:
            hospitals[name] = {"error": error}
            notes.append(f"{name}: failed: {error}")
            continue
        if metrics is not None and metrics.get(wire.REFUSED) == 1.0:
            hospitals[name] = {"refused": True}
            notes.append(f"{name}: refused (its privacy policy)")
            continue
        problem = _check_noised(metrics, methods) if _noised(metrics) else _check(metrics, methods)
        if problem:
            hospitals[name] = {"error": problem}
            notes.append(f"{name}: rejected: {problem}")
            continue
        n = int(metrics[wire.EXPLAINED_IMAGES])
        hospitals[name] = {"images": n}
        images += n
        noise += float(metrics.get(wire.EVALUATION_NOISE, 0.0)) ** 2
        baseline += float(metrics[wire.EXPLAIN_BASELINE_SUM])
        for method in methods:
            hits[method] += int(metrics[wire.explain_key(method, "hits")])
            mass[method] += float(metrics[wire.explain_key(method, "mass-sum")])
    # Noised counts are pooled first, then made usable: rates clipped into [0, 1] (post-processing).
    per_method = {m: {"pointing_game": _rate(hits[m], images), "mass_inside": _rate(mass[m], images),
                      "random_baseline": _rate(baseline, images)} for m in methods}
    for note in notes:
        log.warning("explanations: %s", note)
    return {"methods": list(methods), "images": max(images, 0), "hospitals": dict(sorted(hospitals.items())),
            "per_method": per_method, "notes": notes, "noise_std": math.sqrt(noise)}


def _rate(total: float, images: int) -> float | None:
    return min(max(total / images, 0.0), 1.0) if images > 0 else None


def _noised(metrics) -> bool:
    return metrics is not None and _real(metrics.get(wire.EVALUATION_NOISE)) and metrics[wire.EVALUATION_NOISE] > 0


def _check_noised(metrics, methods: Sequence[str]) -> str | None:
    """A noised reply: integer counts and real sums of any sign."""
    keys = [wire.EXPLAINED_IMAGES, *(wire.explain_key(m, "hits") for m in methods)]
    for key in keys:
        value = metrics.get(key)
        if not _real(value) or float(value) != int(value):
            return f"'{key}' must be an integer, got {value!r}"
    for key in (wire.EXPLAIN_BASELINE_SUM, *(wire.explain_key(m, "mass-sum") for m in methods)):
        if not _real(metrics.get(key)):
            return f"'{key}' must be a finite number, got {metrics.get(key)!r}"
    return None


def _real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check(metrics, methods: Sequence[str]) -> str | None:
    if metrics is None:
        return "no metrics"
    n = metrics.get(wire.EXPLAINED_IMAGES)
    if not _count(n):
        return f"'{wire.EXPLAINED_IMAGES}' must be a count, got {n!r}"
    base = metrics.get(wire.EXPLAIN_BASELINE_SUM)
    if not _within(base, n):
        return f"'{wire.EXPLAIN_BASELINE_SUM}' must be in [0, {int(n)}], got {base!r}"
    for method in methods:
        h, m = metrics.get(wire.explain_key(method, "hits")), metrics.get(wire.explain_key(method, "mass-sum"))
        if not _count(h) or h > n:
            return f"'{wire.explain_key(method, 'hits')}' must be a count <= {int(n)}, got {h!r}"
        if not _within(m, n):
            return f"'{wire.explain_key(method, 'mass-sum')}' must be in [0, {int(n)}], got {m!r}"
    return None


def _count(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0 and float(value) == int(value))


def _within(value, n) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and 0.0 <= value <= float(n) + 1e-9)
