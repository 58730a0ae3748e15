"""Live round-by-round display of a run, fed by its run directory (``metrics.json``), never by log lines.

:class:`RoundWatcher` polls ``metrics.json`` (rewritten atomically after every round by whoever runs the
rounds) in a background thread and hands each new document to a callback. :class:`RoundTable` is such a
callback: a Rich live table with one row per round (train loss, epsilon max, AUC on the hospitals' validation
splits and on the held-out test set, replies).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from server.run_directory import METRICS_FILE

log = logging.getLogger(__name__)


class RoundWatcher:
    """Calls `on_update(document)` whenever the run directory's ``metrics.json`` changes (polling thread)."""

    def __init__(self, run_dir: Path, on_update: Callable[[dict], None], *, interval: float = 0.5):
        self.path = Path(run_dir) / METRICS_FILE
        self.on_update = on_update
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="round-watcher", daemon=True)
        self._seen: tuple[int, int] | None = None

    def __enter__(self) -> RoundWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll()  # the final state, even if it landed between two polls

    def poll(self) -> None:
        """Read the document once if it changed since the last read."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._seen:
            return
        try:
            document = json.loads(self.path.read_text())
        except (OSError, ValueError):  # replaced between stat and read: next poll gets it
            return
        self._seen = stamp
        self.on_update(document)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception:  # a display problem must never stop the run
                log.exception("progress display failed")


class RoundTable:
    """A Rich live view: a progress bar over rounds and a table of per-round numbers."""

    def __init__(self, *, title: str, total_rounds: int, console: Console | None = None):
        self.title = title
        self.total_rounds = total_rounds
        self.console = console or Console(stderr=True)
        self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), console=self.console)
        self._task = self._progress.add_task("rounds", total=total_rounds)
        self._document: dict = {}
        self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
        self._lock = threading.Lock()

    def __enter__(self) -> RoundTable:
        self._live.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._live.update(self._render())
        self._live.__exit__(*exc)
        if not self.console.is_terminal:
            self.console.line()  # Rich ends the last frame with a newline on terminals only

    def __call__(self, document: dict) -> None:
        with self._lock:
            self._document = document
            rounds = document.get("rounds") or []
            done = max((r.get("round", 0) for r in rounds), default=0)
            status = document.get("status", "running")
            self._progress.update(self._task, completed=min(done, self.total_rounds),
                                  description=f"rounds ({status})")
            self._live.update(self._render())

    def _render(self) -> Group:
        table = Table(title=self.title, title_justify="left", expand=False)
        for name in ("round", "train loss", "ε max", "val. AUC malig.", "test AUC malig.", "test acc.",
                     "replies"):
            table.add_column(name, justify="right")
        for entry in self._document.get("rounds") or []:
            fed = entry.get("federated_eval") or {}
            test = entry.get("centralised_eval") or {}
            train = (entry.get("replies") or {}).get("train") or {}
            replies = f"{train.get('valid', '?')}/{train.get('sampled', '?')}" if train else "-"
            table.add_row(str(entry.get("round")), _fmt(entry.get("train_loss")), _fmt(entry.get("epsilon_max"), 2),
                          _fmt(fed.get("auc_malignant")), _fmt(test.get("auc_malignant")),
                          _fmt(test.get("accuracy")), replies)
        return Group(self._progress, table)


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)
