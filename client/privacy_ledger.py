"""The node's own record of its privacy spending, on its disk (JSON), across rounds, runs and restarts.

The hospital's lifetime budget is enforced here, never trusted to the coordinator. Use per round:

    decision = ledger.check_budget(noise_multiplier=..., sample_rate=..., steps=..., delta=..., max_epsilon=...)
    if not decision.allowed: reply with decision.reason, do not train
    outcome = train_local(..., accountant_state=ledger.accountant_state(), ...)
    ledger.record(noise_multiplier=..., sample_rate=..., steps=outcome.steps, ...)   # before replying

Two histories are kept. ``history`` holds the noise this node adds itself: what it has spent if nothing else
protects its updates (the conservative epsilon). ``aggregate-history`` holds the noise in what the coordinator
sees: the same with local noise; with distributed noise over secure aggregation, the noise of the revealed sum
(``aggregate_noise_multiplier``), valid only under that mode's assumption (``common.distributed_dp``). The budget
is checked against the one the node's policy names (``on_aggregate``); both are recorded with every entry.

Recording before the reply leaves the node means a crash can only over-count (trained, recorded, never
sent), never under-count. Writes are atomic (temporary file, fsync, rename), so a crash leaves the old
or the new ledger, never a torn one. The file holds numbers only (no paths, no patient data). One
process per ledger file is assumed (one node).

File format (version 2; a version-1 file, written before distributed noise existed, is read with its history as
both histories):
    {"version": 2, "mechanism": "rdp", "history": [[noise, rate, steps], ...],
     "aggregate-history": [[noise, rate, steps], ...],
     "entries": [{"time": ISO-8601, "run_id": ..., "run_key": ..., "server_round": ..., "noise_multiplier": ...,
                  "aggregate_noise_multiplier": ..., "sample_rate": ..., "steps": ..., "delta": ...,
                  "epsilon": ..., "epsilon_aggregate": ...}, ...]}

``run_id`` is the Flower run that asked; ``run_key`` the coordinator's run identity, which survives its restarts
(a resumed run is a new Flower run with the same run key): :meth:`PrivacyLedger.has_trained` finds a round already
spent under it.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.privacy import DEFAULT_MECHANISM, PrivacyAccountant

FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)


class LedgerError(RuntimeError):
    """The ledger file is unreadable or inconsistent: the node must not train until someone looks."""


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_now: float
    epsilon_after: float
    max_epsilon: float
    reason: str


class PrivacyLedger:
    """Cumulative DP-SGD history of one node, persisted at `path` (created on first record)."""

    def __init__(self, path: str | os.PathLike[str], *, mechanism: str | None = None):
        """`mechanism`: accountant used for epsilon; None = the file's (or rdp for a new ledger).
        The stored history is mechanism-free, so any mechanism can read it."""
        self.path = Path(path)
        self._entries: list[dict[str, Any]] = []
        self._accountant = PrivacyAccountant(mechanism or DEFAULT_MECHANISM)
        self._aggregate = PrivacyAccountant(mechanism or DEFAULT_MECHANISM)
        if self.path.exists():
            self._load(mechanism)

    # ------------------------------------------------------------------ reading
    def _load(self, mechanism: str | None) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") not in _READABLE_VERSIONS:
                raise LedgerError(f"{self.path}: unsupported ledger version {data.get('version')!r}")
            self._accountant = PrivacyAccountant(mechanism or data["mechanism"], history=data["history"])
            self._aggregate = PrivacyAccountant(mechanism or data["mechanism"],
                                                history=data.get("aggregate-history", data["history"]))
            self._entries = list(data["entries"])
        except LedgerError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc}); refusing to guess "
                              "the privacy already spent") from exc

    @property
    def mechanism(self) -> str:
        return self._accountant.mechanism

    @property
    def history(self) -> list[tuple[float, float, int]]:
        return self._accountant.history

    @property
    def entries(self) -> list[dict[str, Any]]:
        return [dict(e) for e in self._entries]

    @property
    def total_steps(self) -> int:
        return self._accountant.total_steps

    def accountant_state(self) -> dict[str, Any]:
        """Opacus accountant state of everything spent so far (for `train_local`)."""
        return self._accountant.state_dict()

    @property
    def aggregate_history(self) -> list[tuple[float, float, int]]:
        return self._aggregate.history

    def epsilon(self, delta: float, *, aggregate: bool = False) -> float:
        """Epsilon spent at `delta`: of this node's own noise, or (`aggregate`) of the noise the coordinator saw."""
        return (self._aggregate if aggregate else self._accountant).epsilon(delta)

    def has_trained(self, run_key: str, server_round: int) -> bool:
        """Whether round `server_round` of the run named `run_key` was already trained (and spent) here."""
        return any(e.get("run_key") == run_key and e.get("server_round") == server_round for e in self._entries)

    # ------------------------------------------------------------------ budget
    def check_budget(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     max_epsilon: float, aggregate_noise_multiplier: float | None = None,
                     on_aggregate: bool = False) -> BudgetDecision:
        """Would `steps` more steps keep epsilon (at `delta`) within `max_epsilon`? With `on_aggregate` the
        budget is checked on the noise the coordinator sees (`aggregate_noise_multiplier`, default: the node's
        own), else on the node's own noise."""
        accountant = self._aggregate if on_aggregate else self._accountant
        noise = (aggregate_noise_multiplier or noise_multiplier) if on_aggregate else noise_multiplier
        now = accountant.epsilon(delta)
        after = accountant.epsilon_after(noise_multiplier=noise, sample_rate=sample_rate, steps=steps, delta=delta)
        allowed = after <= max_epsilon
        verdict = "within" if allowed else "would exceed"
        basis = "of the aggregate, under secure aggregation" if on_aggregate else "of this node's own noise"
        reason = (f"privacy budget {verdict} max-epsilon {max_epsilon:g}: epsilon {basis} {now:.3f} now, "
                  f"{after:.3f} after this round ({steps} steps, noise {noise:g}, "
                  f"sample rate {sample_rate:.4g}; delta {delta:g}, accountant {self.mechanism})")
        if not allowed:
            reason = "refused: " + reason
        return BudgetDecision(allowed, now, after, float(max_epsilon), reason)

    # ------------------------------------------------------------------ writing
    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               aggregate_noise_multiplier: float | None = None, run_id: str | None = None,
               server_round: int | None = None, run_key: str | None = None) -> float:
        """Add `steps` DP-SGD steps to the ledger, persist atomically, return the new epsilon of the node's own
        noise (`epsilon(delta, aggregate=True)` gives the other). `aggregate_noise_multiplier`: the noise of what
        the coordinator sees, when it is more than the node's own (distributed noise); default: the same."""
        aggregate_noise = aggregate_noise_multiplier or noise_multiplier
        if aggregate_noise < noise_multiplier:
            raise ValueError(f"aggregate noise {aggregate_noise} below the node's own {noise_multiplier}")
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        self._aggregate.step(noise_multiplier=aggregate_noise, sample_rate=sample_rate, steps=steps)
        epsilon = self._accountant.epsilon(delta)
        self._entries.append({
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id, "run_key": run_key, "server_round": server_round,
            "noise_multiplier": float(noise_multiplier), "aggregate_noise_multiplier": float(aggregate_noise),
            "sample_rate": float(sample_rate), "steps": int(steps), "delta": float(delta), "epsilon": epsilon,
            "epsilon_aggregate": self._aggregate.epsilon(delta),
        })
        self._write()
        return epsilon

    def _write(self) -> None:
        data = {"version": FORMAT_VERSION, "mechanism": self.mechanism,
                "history": [list(entry) for entry in self._accountant.history],
                "aggregate-history": [list(entry) for entry in self._aggregate.history], "entries": self._entries}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
