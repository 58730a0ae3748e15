"""Per-round checkpoints of a federation: global weights, strategy state, and what resume needs to continue.

One file per round, ``round-NNNN.npz`` (numpy archive, no pickle), written atomically (temporary file in the same
folder, fsync, rename), so a crash mid-write leaves the previous checkpoint intact and never a half file under the
final name. Keys: ``model:<name>`` (global weights), ``strategy:<name>`` (e.g. FedAdam moments) and ``__meta__``
(JSON text: round number, per-hospital privacy, round reports).

Before a round's training instructions go out, an empty marker ``started-NNNN`` is written (and fsynced) in a
folder beside the checkpoints (default ``started-rounds/`` next to the checkpoint folder). A
round with a marker but no checkpoint was interrupted: hospitals may have trained it and spent budget on it
(recorded in their ledgers, where they refuse to train it again). A resumed run therefore never asks for that
round again: :meth:`CheckpointStore.lost_rounds` names it, and the run continues at the next round number.

Signed: a store with a ``common.signing.Signer`` writes ``round-NNNN.npz.sig`` (provenance: round, epsilon per
hospital, code version, config hash) before the checkpoint takes its final name. :meth:`CheckpointStore.load`
verifies against the store's trusted keys before parsing and refuses an unsigned, edited or foreign-signed file
(``common.signing.SignatureError``); a store without trusted keys loads nothing.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.signing import Signer, SignatureError, TrustedKeys, epsilon_by_hospital, verify_file

_NAME = re.compile(r"^round-(\d{4,})\.npz$")
_STARTED = re.compile(r"^started-(\d{4,})$")
_MODEL, _STRATEGY, _META = "model:", "strategy:", "__meta__"
STARTED_DIR = "started-rounds"  # round-started markers, beside the checkpoint folder


@dataclass(frozen=True)
class Checkpoint:
    """The state of a run after `round` completed rounds."""

    round: int
    arrays: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


class CheckpointStore:
    """The checkpoint folder of one run directory; `signer` signs what it saves, `trusted` verifies what it loads."""

    def __init__(self, directory: Path, *, started_dir: Path | None = None, signer: Signer | None = None,
                 trusted: TrustedKeys | None = None):
        self.directory = Path(directory)
        self.started_dir = Path(started_dir) if started_dir else self.directory.parent / STARTED_DIR
        self.signer = signer
        self.trusted = trusted

    def path_for(self, round_number: int) -> Path:
        return self.directory / f"round-{round_number:04d}.npz"

    def save(self, checkpoint: Checkpoint) -> Path:
        """Write atomically; returns the final path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        payload = {f"{_MODEL}{k}": np.asarray(v) for k, v in checkpoint.arrays.items()}
        payload.update({f"{_STRATEGY}{k}": np.asarray(v) for k, v in checkpoint.strategy_state.items()})
        payload[_META] = np.asarray(json.dumps({**checkpoint.meta, "round": checkpoint.round}))
        final = self.path_for(checkpoint.round)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        buffer = io.BytesIO()
        np.savez(buffer, **payload)
        data = buffer.getvalue()
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            if self.signer is not None:
                self.signer.sign_bytes(final, data, kind="checkpoint", round=checkpoint.round,
                                       epsilon=epsilon_by_hospital(checkpoint.meta.get("privacy") or {}))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync_dir(self.directory)
        return final

    def rounds(self) -> list[int]:
        """Rounds with a complete checkpoint, ascending."""
        if not self.directory.is_dir():
            return []
        found = (_NAME.match(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def load(self, round_number: int) -> Checkpoint:
        """The checkpoint of `round_number`, verified against the store's trusted keys (SignatureError if not)."""
        path = self.path_for(round_number)
        if self.trusted is None:
            raise SignatureError(f"{path}: no trusted public key configured to verify it")
        verified = verify_file(path, self.trusted, kind="checkpoint")
        if verified.provenance.round != round_number:
            raise SignatureError(f"{path}: signed as round {verified.provenance.round}, found as round "
                                 f"{round_number}")
        with np.load(io.BytesIO(verified.data), allow_pickle=False) as data:
            meta = json.loads(str(data[_META]))
            arrays = {k[len(_MODEL):]: data[k] for k in data.files if k.startswith(_MODEL)}
            state = {k[len(_STRATEGY):]: data[k] for k in data.files if k.startswith(_STRATEGY)}
        if meta.get("round") != round_number:
            raise ValueError(f"checkpoint {self.path_for(round_number)} says round {meta.get('round')}")
        return Checkpoint(round=round_number, arrays=arrays, strategy_state=state, meta=meta)

    def mark_started(self, round_number: int) -> Path:
        """Record, durably, that round `round_number`'s training instructions are about to be sent."""
        self.started_dir.mkdir(parents=True, exist_ok=True)
        marker = self.started_dir / f"started-{round_number:04d}"
        with open(marker, "wb") as handle:
            os.fsync(handle.fileno())
        _fsync_dir(self.started_dir)
        return marker

    def unmark_started(self, round_number: int) -> None:
        """Forget that round `round_number` started: every sampled hospital refused it, so nobody spent on it."""
        (self.started_dir / f"started-{round_number:04d}").unlink(missing_ok=True)
        if self.started_dir.is_dir():
            _fsync_dir(self.started_dir)

    def started_rounds(self) -> list[int]:
        """Rounds whose training was started (marked), ascending."""
        if not self.started_dir.is_dir():
            return []
        found = (_STARTED.match(p.name) for p in self.started_dir.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def lost_rounds(self) -> list[int]:
        """Rounds started after the last checkpoint: interrupted, possibly trained (and spent) by hospitals, never
        aggregated. A resumed run skips them."""
        rounds = self.rounds()
        last = rounds[-1] if rounds else 0
        return [r for r in self.started_rounds() if r > last]

    def latest(self) -> Checkpoint | None:
        """The most recent checkpoint, or None when the run has none yet."""
        rounds = self.rounds()
        return self.load(rounds[-1]) if rounds else None


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
