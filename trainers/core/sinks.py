"""Rank-0 outputs: console lines or a progress bar, and the metrics file. Other ranks get a silent one.

The sink never calls a collective: whatever it shows was reduced before, on every rank.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from trainers.core.checkpoint import atomic_write_text  # the same temp+fsync+rename discipline


class Sink:
    """Where a run reports: ``print`` for humans, ``metric`` for the metrics file, a per-epoch bar.

    This base reports nothing: it is what ranks other than 0 get; ``MainSink`` is rank 0's.
    """

    def print(self, *objects: Any) -> None: ...
    def metric(self, record: dict[str, Any]) -> None: ...
    def epoch_start(self, epoch: int, steps: int, done: int) -> None: ...
    def advance(self, step_in_epoch: int) -> None: ...
    def epoch_end(self) -> None: ...
    def close(self) -> None: ...


class MainSink(Sink):
    """Rank 0's console and ``metrics.jsonl`` (one JSON object per line, appended and flushed)."""

    def __init__(self, metrics_path: Path | None, progress: str = "auto") -> None:
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        # A bar only on a terminal: in SLURM logs (not a TTY) redraws would flood the file.
        self.use_bar = progress == "bar" or (progress == "auto" and self.console.is_terminal)
        self.quiet = progress == "quiet"
        self.metrics_path = metrics_path
        self.metrics: Any = None  # opened at the first record: a resume may rewrite the file before that
        self.progress: Progress | None = None
        self.task: Any = None

    def print(self, *objects: Any) -> None:
        if not self.quiet:
            self.console.print(*objects)

    def metric(self, record: dict[str, Any]) -> None:
        if self.metrics_path is None:
            return
        if self.metrics is None:
            self.metrics = open(self.metrics_path, "a", buffering=1)
        self.metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")

    def epoch_start(self, epoch: int, steps: int, done: int) -> None:
        if not self.use_bar:
            return
        self.progress = Progress(TextColumn(f"epoch {epoch}"), BarColumn(), MofNCompleteColumn(),
                                 TimeRemainingColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=steps, completed=done)

    def advance(self, step_in_epoch: int) -> None:
        if self.progress is not None:
            self.progress.update(self.task, completed=step_in_epoch)

    def epoch_end(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def close(self) -> None:
        self.epoch_end()
        if self.metrics:
            self.metrics.close()
            self.metrics = None


def make_sink(is_main: bool, run_dir: Path, progress: str) -> Sink:
    """The rank's sink: the real one on rank 0, a null one elsewhere."""
    if not is_main:
        return Sink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return MainSink(run_dir / "metrics.jsonl", progress)


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (work lost to a crash that the resumed run will redo)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= last_step]
    atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """The record's step; a torn last line (the process died mid-write) counts as after everything."""
    try:
        return json.loads(line).get("step", 0)
    except json.JSONDecodeError:
        return float("inf")
