"""Privacy accounting for DP-SGD: a small component around Opacus' own accountants.

The state is Opacus' format, so it can be handed to (and taken from) `PrivacyEngine.accountant`:
`{"history": [(noise_multiplier, sample_rate, steps), ...], "mechanism": "rdp" | "prv" | "gdp"}`.
Epsilon is always computed by a fresh Opacus accountant of the named mechanism fed this history, so a
number reported here is exactly Opacus' number. The default is RDP (Opacus 1.6's `PrivacyEngine`
defaults to PRV); whoever reports an epsilon reports `mechanism` with it.

GDP only supports one constant (noise, rate) pair: Opacus' Gaussian accountant reads the last history
entry only, so a mixed history is refused here rather than under-reported.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from opacus.accountants import IAccountant, create_accountant

MECHANISMS: tuple[str, ...] = ("rdp", "prv", "gdp")
DEFAULT_MECHANISM = "rdp"

HistoryEntry = tuple[float, float, int]


def _entry(raw: Iterable[Any]) -> HistoryEntry:
    noise, rate, steps = raw
    entry = (float(noise), float(rate), int(steps))
    if entry[0] <= 0 or not 0 < entry[1] <= 1 or entry[2] < 0:
        raise ValueError(f"invalid accountant history entry {tuple(raw)!r}")
    return entry


def _merge(history: list[HistoryEntry], entry: HistoryEntry) -> None:
    """Append like Opacus' accountants do: consecutive steps with equal (noise, rate) are merged."""
    if history and history[-1][:2] == entry[:2]:
        history[-1] = (entry[0], entry[1], history[-1][2] + entry[2])
    elif entry[2] > 0:
        history.append(entry)


class PrivacyAccountant:
    """Cumulative DP-SGD privacy loss: history of (noise multiplier, sample rate, steps).

    Not thread-safe; the state is small and copied on every export.
    """

    def __init__(self, mechanism: str = DEFAULT_MECHANISM, *,
                 history: Iterable[Iterable[Any]] = ()) -> None:
        if mechanism not in MECHANISMS:
            raise ValueError(f"unknown accountant {mechanism!r}; choose one of {MECHANISMS}")
        self._mechanism = mechanism
        self._history: list[HistoryEntry] = []
        for entry in history:
            _merge(self._history, _entry(entry))
        self._check()

    # ------------------------------------------------------------------ state
    @property
    def mechanism(self) -> str:
        return self._mechanism

    @property
    def history(self) -> list[HistoryEntry]:
        return list(self._history)

    @property
    def total_steps(self) -> int:
        return sum(steps for _, _, steps in self._history)

    def state_dict(self) -> dict[str, Any]:
        """Opacus' accountant state format (a copy)."""
        return {"history": list(self._history), "mechanism": self._mechanism}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the history with `state["history"]` (lists from JSON accepted).

        The state's mechanism may differ from this accountant's: the history is mechanism-free
        (noise, rate, steps), and epsilon is then computed with this accountant's mechanism.
        """
        if "history" not in state:
            raise ValueError("accountant state has no 'history'")
        history: list[HistoryEntry] = []
        for entry in state["history"]:
            _merge(history, _entry(entry))
        self._replace_history(history)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any] | None, *,
                        mechanism: str | None = None) -> PrivacyAccountant:
        """Accountant restored from `state` (None = fresh); `mechanism` defaults to the state's."""
        state = state or {}
        accountant = cls(mechanism or state.get("mechanism", DEFAULT_MECHANISM))
        if state:
            accountant.load_state_dict(state)
        return accountant

    @classmethod
    def from_opacus(cls, accountant: IAccountant) -> PrivacyAccountant:
        return cls(accountant.mechanism(), history=accountant.history)

    # ------------------------------------------------------------------ steps
    def step(self, *, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record `steps` DP-SGD steps with this noise multiplier and Poisson sample rate."""
        history = list(self._history)
        _merge(history, _entry((noise_multiplier, sample_rate, steps)))
        self._replace_history(history)

    def _replace_history(self, history: list[HistoryEntry]) -> None:
        """Adopt `history` if this accountant can compute epsilon from it; otherwise keep the old one and raise."""
        previous, self._history = self._history, history
        try:
            self._check()
        except ValueError:
            self._history = previous
            raise

    # ------------------------------------------------------------------ epsilon
    def to_opacus(self) -> IAccountant:
        """A fresh Opacus accountant of this mechanism holding this history."""
        with warnings.catch_warnings():
            if self._mechanism == "gdp":  # Opacus warns on every construction; said once in the docs above
                warnings.simplefilter("ignore", UserWarning)
            accountant = create_accountant(self._mechanism)
        accountant.history = copy.deepcopy(list(self._history))
        return accountant

    def epsilon(self, delta: float) -> float:
        """Epsilon spent so far at this delta (0.0 before any step)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if not self._history:
            return 0.0
        return float(self.to_opacus().get_epsilon(delta=delta))

    def epsilon_after(self, *, noise_multiplier: float, sample_rate: float, steps: int,
                      delta: float) -> float:
        """Epsilon after `steps` more steps, without changing this accountant."""
        future = PrivacyAccountant(self._mechanism, history=self._history)
        future.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps)
        return future.epsilon(delta)

    def _check(self) -> None:
        if self._mechanism == "gdp" and len({entry[:2] for entry in self._history}) > 1:
            raise ValueError("the gdp accountant needs one constant (noise, sample rate); "
                             "use rdp or prv for a history that changes them")

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self._mechanism!r}, history={self._history!r})"
