"""The node's own record of its privacy spending, on its disk (JSON), across rounds, runs and restarts.

The hospital's lifetime budget is enforced here, never trusted to the coordinator. Use per round:

    decision = ledger.check_budget(noise_multiplier=..., sample_rate=..., steps=..., delta=..., max_epsilon=...)
    if not decision.allowed: reply with decision.reason, do not train
    outcome = train_local(..., accountant_state=ledger.accountant_state(), ...)
    ledger.record(noise_multiplier=..., sample_rate=..., steps=outcome.steps, ...)   # before replying

Recording before the reply leaves the node means a crash can only over-count (trained, recorded, never
sent), never under-count. Writes are atomic (temporary file, fsync, rename), so a crash leaves the old
or the new ledger, never a torn one. The file holds numbers only (no paths, no patient data). One
process per ledger file is assumed (one node).

File format (version 1):
    {"version": 1, "mechanism": "rdp", "history": [[noise, rate, steps], ...],
     "entries": [{"time": ISO-8601, "run_id": ..., "server_round": ..., "noise_multiplier": ...,
                  "sample_rate": ..., "steps": ..., "delta": ..., "epsilon": ...}, ...]}
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

FORMAT_VERSION = 1


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
        if self.path.exists():
            self._load(mechanism)

    # ------------------------------------------------------------------ reading
    def _load(self, mechanism: str | None) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if data.get("version") != FORMAT_VERSION:
                raise LedgerError(f"{self.path}: unsupported ledger version {data.get('version')!r}")
            self._accountant = PrivacyAccountant(mechanism or data["mechanism"], history=data["history"])
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

    def epsilon(self, delta: float) -> float:
        return self._accountant.epsilon(delta)

    # ------------------------------------------------------------------ budget
    def check_budget(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     max_epsilon: float) -> BudgetDecision:
        """Would `steps` more steps keep epsilon (at `delta`) within `max_epsilon`?"""
        now = self._accountant.epsilon(delta)
        after = self._accountant.epsilon_after(noise_multiplier=noise_multiplier,
                                               sample_rate=sample_rate, steps=steps, delta=delta)
        allowed = after <= max_epsilon
        verdict = "within" if allowed else "would exceed"
        reason = (f"privacy budget {verdict} max-epsilon {max_epsilon:g}: epsilon {now:.3f} now, "
                  f"{after:.3f} after this round ({steps} steps, noise {noise_multiplier:g}, "
                  f"sample rate {sample_rate:.4g}; delta {delta:g}, accountant {self.mechanism})")
        if not allowed:
            reason = "refused: " + reason
        return BudgetDecision(allowed, now, after, float(max_epsilon), reason)

    # ------------------------------------------------------------------ writing
    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               run_id: str | None = None, server_round: int | None = None) -> float:
        """Add `steps` DP-SGD steps to the ledger, persist atomically, return the new epsilon."""
        self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        epsilon = self._accountant.epsilon(delta)
        self._entries.append({
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "run_id": run_id, "server_round": server_round,
            "noise_multiplier": float(noise_multiplier), "sample_rate": float(sample_rate),
            "steps": int(steps), "delta": float(delta), "epsilon": epsilon,
        })
        self._write()
        return epsilon

    def _write(self) -> None:
        data = {"version": FORMAT_VERSION, "mechanism": self.mechanism,
                "history": [list(entry) for entry in self._accountant.history], "entries": self._entries}
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
