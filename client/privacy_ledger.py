"""The node's own record of its privacy spending, on its disk (JSON), across rounds, runs, restarts and processes.

The hospital's lifetime budget is enforced here, never trusted to the coordinator. Use per round:

    spend = ledger.spend(noise_multiplier=..., sample_rate=..., steps=planned, delta=..., max_epsilon=...,
                         run_id=..., server_round=...)
    if not spend.allowed: reply with spend.reason, do not train
    outcome = train_local(..., accountant_state=spend.prior_state, ...)   # at most `planned` steps

`spend` checks the budget and records the steps in one step under the ledger's lock, BEFORE training: two
processes can never both pass a check that together overspend, and the lock is held for milliseconds, not for
the minutes training takes. A round that then crashes or fails stays counted (the ledger only ever over-counts).
`check_budget` alone is advisory (another process may spend between it and a later `record`).

Two histories are kept. ``history`` holds the noise this node adds itself: what it has spent if nothing else
protects its updates (the conservative epsilon). ``aggregate-history`` holds the noise in what the coordinator
sees: the same with local noise; with distributed noise over secure aggregation, the noise of the revealed sum
(``aggregate_noise_multiplier``), valid only under that mode's assumption (``common.distributed_dp``). The budget
is checked against the one the node's policy names (``on_aggregate``); both are recorded with every entry.

Concurrency and crashes. Every change takes an exclusive ``flock`` on ``<ledger>.lock`` (kept beside the ledger,
never deleted), re-reads the file, changes it, writes it and lets go; the OS releases the lock of a process that
dies, even by SIGKILL. Writes are atomic (temporary file, fsync, rename), so a reader (which takes no lock) sees the
old or the new ledger, never a torn one. A writer killed mid-write leaves a temporary file
(``.<ledger>.*.tmp``); whoever next holds the lock removes it (also when a ledger is opened). The in-memory view
(``epsilon``, ``entries``...) is the file as last read: ``reload`` re-reads it. The file holds numbers only (no
paths, no patient data).

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

import contextlib
import fcntl
import glob
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.privacy import DEFAULT_MECHANISM, PrivacyAccountant

FORMAT_VERSION = 2
LEDGER_FILE_NAME = "privacy-ledger.json"  # inside a node's state-dir (``NodeConfig.ledger_path``)
_READABLE_VERSIONS = (1, 2)
LOCK_TIMEOUT_S = 60.0  # a writer holds the lock for milliseconds; longer means a hung process
_LOCK_POLL_S = 0.005

log = logging.getLogger(__name__)


class LedgerError(RuntimeError):
    """The ledger file is unreadable or inconsistent, or its lock is stuck: the node must not train until someone
    looks."""


class _LockBusy(LedgerError):
    """Another writer holds the ledger's lock past the wait allowed."""


@dataclass(frozen=True)
class BudgetDecision:
    allowed: bool
    epsilon_now: float
    epsilon_after: float
    max_epsilon: float
    reason: str


@dataclass(frozen=True)
class Spend:
    """What `PrivacyLedger.spend` did: when `allowed`, the steps are already in the ledger file."""

    decision: BudgetDecision
    prior_state: dict[str, Any]  # Opacus accountant state of the node's own noise just before this spend

    @property
    def allowed(self) -> bool:
        return self.decision.allowed

    @property
    def reason(self) -> str:
        return self.decision.reason


class PrivacyLedger:
    """Cumulative DP-SGD history of one node, persisted at `path` (created on first record), shared safely by
    every process and thread that opens the same file."""

    def __init__(self, path: str | os.PathLike[str], *, mechanism: str | None = None,
                 lock_timeout: float = LOCK_TIMEOUT_S):
        """`mechanism`: accountant used for epsilon; None = the file's (or rdp for a new ledger).
        The stored history is mechanism-free, so any mechanism can read it. `lock_timeout`: seconds to wait for
        another writer before raising `LedgerError`."""
        self.path = Path(path)
        self._mechanism_choice = mechanism
        self._lock_timeout = float(lock_timeout)
        self._clear()
        if self._temporaries():
            try:
                with self._locked(timeout=0.0):  # removes a crashed writer's leftovers, then reads
                    return
            except (_LockBusy, PermissionError):  # a writer is at work, or this is a read-only view: just read
                pass
        self.reload()

    @property
    def lock_path(self) -> Path:
        """The file every writer locks (`flock`) while it changes the ledger; it stays, empty, beside the ledger."""
        return self.path.with_name(self.path.name + ".lock")

    # ------------------------------------------------------------------ reading
    def _clear(self) -> None:
        self._entries: list[dict[str, Any]] = []
        self._accountant = PrivacyAccountant(self._mechanism_choice or DEFAULT_MECHANISM)
        self._aggregate = PrivacyAccountant(self._mechanism_choice or DEFAULT_MECHANISM)

    def reload(self) -> None:
        """Re-read the file: what every process has recorded so far (a consistent snapshot, no lock needed)."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._clear()
            return
        except OSError as exc:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc})") from exc
        mechanism = self._mechanism_choice
        try:
            data = json.loads(text)
            if data.get("version") not in _READABLE_VERSIONS:
                raise LedgerError(f"{self.path}: unsupported ledger version {data.get('version')!r}")
            accountant = PrivacyAccountant(mechanism or data["mechanism"], history=data["history"])
            aggregate = PrivacyAccountant(mechanism or data["mechanism"],
                                          history=data.get("aggregate-history", data["history"]))
            entries = list(data["entries"])
        except LedgerError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise LedgerError(f"{self.path}: privacy ledger unreadable ({exc}); refusing to guess "
                              "the privacy already spent") from exc
        self._accountant, self._aggregate, self._entries = accountant, aggregate, entries

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
        return any(e.get("run_key") == run_key and e.get("server_round") == server_round
                   and e.get("kind", "training") == "training" for e in self._entries)

    # ------------------------------------------------------------------ budget
    def check_budget(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     max_epsilon: float, aggregate_noise_multiplier: float | None = None,
                     on_aggregate: bool = False) -> BudgetDecision:
        """Would `steps` more steps keep epsilon (at `delta`) within `max_epsilon`? With `on_aggregate` the
        budget is checked on the noise the coordinator sees (`aggregate_noise_multiplier`, default: the node's
        own), else on the node's own noise. Re-reads the file first; spends nothing (use `spend` to act on it)."""
        self.reload()
        return self._decide(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta,
                            max_epsilon=max_epsilon, aggregate_noise_multiplier=aggregate_noise_multiplier,
                            on_aggregate=on_aggregate)

    def _decide(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                max_epsilon: float, aggregate_noise_multiplier: float | None, on_aggregate: bool) -> BudgetDecision:
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
    def spend(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, max_epsilon: float,
              aggregate_noise_multiplier: float | None = None, on_aggregate: bool = False,
              run_id: str | None = None, server_round: int | None = None, kind: str = "training",
              run_key: str | None = None) -> Spend:
        """Check the budget (as `check_budget`) and, if allowed, record the steps (as `record`), atomically with
        respect to every other writer of this ledger. Call it before training with the planned steps; a refusal
        writes nothing. With `run_key`, a training round of that run already in the ledger is refused too."""
        _check_aggregate_noise(noise_multiplier, aggregate_noise_multiplier)
        with self._locked():
            prior = self.accountant_state()
            if run_key is not None and server_round is not None and self.has_trained(run_key, server_round):
                now = self._accountant.epsilon(delta)
                return Spend(BudgetDecision(False, now, now, float(max_epsilon),
                                            f"refused: round {server_round} of this run (key {run_key}) is already "
                                            f"in this node's ledger"), prior)
            decision = self._decide(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps,
                                    delta=delta, max_epsilon=max_epsilon,
                                    aggregate_noise_multiplier=aggregate_noise_multiplier, on_aggregate=on_aggregate)
            if decision.allowed:
                self._append(noise_multiplier=noise_multiplier, aggregate_noise_multiplier=aggregate_noise_multiplier,
                             sample_rate=sample_rate, steps=steps, delta=delta, run_id=run_id,
                             server_round=server_round, kind=kind, run_key=run_key)
        return Spend(decision, prior)

    def record(self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float,
               aggregate_noise_multiplier: float | None = None, run_id: str | None = None,
               server_round: int | None = None, kind: str = "training", run_key: str | None = None) -> float:
        """Add `steps` DP-SGD steps to the ledger unconditionally (under the lock, on top of whatever other
        processes recorded), persist atomically, return the new epsilon of the node's own noise
        (`epsilon(delta, aggregate=True)` gives the other). `aggregate_noise_multiplier`: the noise of what the
        coordinator sees, when it is more than the node's own (distributed noise); default: the same. `kind`: what
        was released, "training" (DP-SGD steps), "evaluation" or "explanation" (noised counts, one step at rate 1)."""
        _check_aggregate_noise(noise_multiplier, aggregate_noise_multiplier)
        with self._locked():
            return self._append(noise_multiplier=noise_multiplier,
                                aggregate_noise_multiplier=aggregate_noise_multiplier, sample_rate=sample_rate,
                                steps=steps, delta=delta, run_id=run_id, server_round=server_round, kind=kind,
                                run_key=run_key)

    def _append(self, *, noise_multiplier: float, aggregate_noise_multiplier: float | None, sample_rate: float,
                steps: int, delta: float, run_id: str | None, server_round: int | None,
                kind: str = "training", run_key: str | None = None) -> float:
        """Add one entry and write the file; the caller holds the lock. On error the view is re-read."""
        aggregate_noise = aggregate_noise_multiplier or noise_multiplier
        try:
            self._accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
            self._aggregate.step(noise_multiplier=aggregate_noise, sample_rate=sample_rate, steps=steps)
            epsilon = self._accountant.epsilon(delta)
            self._entries.append({
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "run_id": run_id, "run_key": run_key, "server_round": server_round, "kind": kind,
                "noise_multiplier": float(noise_multiplier), "aggregate_noise_multiplier": float(aggregate_noise),
                "sample_rate": float(sample_rate), "steps": int(steps), "delta": float(delta), "epsilon": epsilon,
                "epsilon_aggregate": self._aggregate.epsilon(delta),
            })
            self._write()
        except BaseException:
            self.reload()  # the view must never show what the file does not hold
            raise
        return epsilon

    @contextlib.contextmanager
    def _locked(self, *, timeout: float | None = None) -> Iterator[None]:
        """Hold the ledger's exclusive lock (against other processes and other `PrivacyLedger` objects in this
        one); inside, the view is the file as it is now and no crashed writer's temporary file is left."""
        timeout = self._lock_timeout if timeout is None else timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise _LockBusy(f"{self.lock_path}: another process has held the privacy ledger's lock "
                                        f"for over {timeout:g} s; refusing to spend without it") from None
                    time.sleep(_LOCK_POLL_S)
            for leftover in self._temporaries():  # only lock holders write them: these are from crashed writers
                leftover.unlink(missing_ok=True)
                log.warning("%s: removed %s, left by a writer that stopped mid-write", self.path, leftover.name)
            self.reload()
            yield
        finally:
            os.close(fd)  # releases the lock

    def _temporaries(self) -> list[Path]:
        if not self.path.parent.is_dir():
            return []
        return sorted(self.path.parent.glob(glob.escape(f".{self.path.name}.") + "*.tmp"))

    def _write(self) -> None:
        data = {"version": FORMAT_VERSION, "mechanism": self.mechanism,
                "history": [list(entry) for entry in self._accountant.history],
                "aggregate-history": [list(entry) for entry in self._aggregate.history], "entries": self._entries}
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


def ledger_statement(ledger: PrivacyLedger, *, delta: float | None = None,
                     max_epsilon: float | None = None) -> dict[str, Any]:
    """What the node has released, for people: every entry with the epsilon of everything up to and including it
    (both bases), the totals, and the budget left when `max_epsilon` is given.

    Epsilons are recomputed at one `delta` (default: the most recent entry's) with the ledger's accountant, so they
    compare across entries recorded at different deltas. Totals come from the histories (what the budget check
    uses); `unlisted_steps` counts history steps that have no entry (a version-1 file kept none).
    """
    entries = ledger.entries
    if delta is None and entries:
        delta = float(entries[-1]["delta"])
    if delta is None and ledger.total_steps:
        raise LedgerError(f"{ledger.path}: the ledger has steps but no entry naming their delta; give a delta")
    own, aggregate = PrivacyAccountant(ledger.mechanism), PrivacyAccountant(ledger.mechanism)
    releases = []
    for entry in entries:
        noise = float(entry["noise_multiplier"])
        aggregate_noise = float(entry.get("aggregate_noise_multiplier") or noise)
        rate, steps = float(entry["sample_rate"]), int(entry["steps"])
        own.step(noise_multiplier=noise, sample_rate=rate, steps=steps)
        aggregate.step(noise_multiplier=aggregate_noise, sample_rate=rate, steps=steps)
        releases.append({"time": entry.get("time"), "run_id": entry.get("run_id"),
                         "server_round": entry.get("server_round"), "steps": steps, "sample_rate": rate,
                         "noise_multiplier": noise, "aggregate_noise_multiplier": aggregate_noise,
                         "epsilon": own.epsilon(delta), "epsilon_aggregate": aggregate.epsilon(delta)})
    epsilon = ledger.epsilon(delta) if delta is not None else 0.0
    epsilon_aggregate = ledger.epsilon(delta, aggregate=True) if delta is not None else 0.0
    budget = None
    if max_epsilon is not None:
        budget = {"max_epsilon": float(max_epsilon), "remaining": float(max_epsilon) - epsilon,
                  "remaining_aggregate": float(max_epsilon) - epsilon_aggregate}
    return {
        "ledger": str(ledger.path), "mechanism": ledger.mechanism, "delta": delta,
        "distributed": any(r["aggregate_noise_multiplier"] != r["noise_multiplier"] for r in releases),
        "releases": releases,
        "totals": {"releases": len(releases), "steps": ledger.total_steps,
                   "unlisted_steps": ledger.total_steps - sum(r["steps"] for r in releases),
                   "epsilon": epsilon, "epsilon_aggregate": epsilon_aggregate},
        "budget": budget,
    }


def _check_aggregate_noise(noise_multiplier: float, aggregate_noise_multiplier: float | None) -> None:
    aggregate_noise = aggregate_noise_multiplier or noise_multiplier
    if aggregate_noise < noise_multiplier:
        raise ValueError(f"aggregate noise {aggregate_noise} below the node's own {noise_multiplier}")
