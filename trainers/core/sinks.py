"""Rank-0 outputs: the console (a live display on a terminal, plain lines elsewhere), ``metrics.jsonl``,
and TensorBoard event files. Other ranks get a silent sink.

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
from rich.table import Table

from launcher.config import flatten
from launcher.errors import UserError
from trainers.core.files import atomic_write_text


class Sink:
    """Where a run reports: ``print`` for humans, ``metric`` for the files, a live display of the run.

    This base reports nothing: it is what ranks other than 0 get; ``MainSink`` is rank 0's.
    """

    live = False  # True while a live display shows loss, learning rate and throughput

    def print(self, *objects: Any) -> None: ...
    def metric(self, record: dict[str, Any]) -> None: ...
    def hparams(self, config: dict[str, Any]) -> None: ...
    def start(self, total_steps: int, done: int) -> None: ...
    def advance(self, step: int, epoch: int, **fields: Any) -> None: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...


class MainSink(Sink):
    """Rank 0's console, ``metrics.jsonl`` (one JSON object per line, appended and flushed) and TensorBoard."""

    def __init__(self, metrics_path: Path | None, progress: str = "auto", tensorboard: Path | None = None) -> None:
        self.console = Console(file=sys.stdout, highlight=False, soft_wrap=True)
        if not self.console.is_terminal:  # log files: wide lines rather than tables wrapped at 80 columns
            self.console.width = 120
        # A live display only on a terminal: in SLURM logs (not a TTY) redraws would flood the file.
        self.use_bar = progress == "bar" or (progress == "auto" and self.console.is_terminal)
        self.quiet = progress == "quiet"
        self.metrics_path = metrics_path
        self.metrics: Any = None  # opened at the first record: a resume may rewrite the file before that
        self.progress: Progress | None = None
        self.task: Any = None
        # Checked now (a missing package is a start-up error), opened at the first record: a run refused
        # by a later check leaves no event file behind.
        self.board_class = _tensorboard() if tensorboard is not None else None
        self.board_dir = tensorboard
        self._board: Any = None

    @property
    def board(self) -> Any:
        if self._board is None and self.board_class is not None:
            self._board = self.board_class(log_dir=str(self.board_dir))
        return self._board

    def print(self, *objects: Any) -> None:
        if self.quiet:
            return
        if self.console.is_terminal:
            self.console.print(*objects)
            return
        # A log file gets plain lines: tables rendered at the console's width, without the padding after each row.
        with self.console.capture() as captured:
            self.console.print(*objects)
        self.console.file.write("".join(line.rstrip() + "\n" for line in captured.get().splitlines()))
        self.console.file.flush()

    def metric(self, record: dict[str, Any]) -> None:
        if self.metrics_path is not None:
            if self.metrics is None:
                self.metrics = open(self.metrics_path, "a", buffering=1)
            self.metrics.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        if self.board is not None:
            for key, value in record.items():
                if key not in ("kind", "step", "epoch", "time") and isinstance(value, (int, float)):
                    self.board.add_scalar(f"{record['kind']}/{key}", value, record.get("step", 0))

    def hparams(self, config: dict[str, Any]) -> None:
        if self.board is None:
            return
        from torch.utils.tensorboard.summary import hparams

        values = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flatten(config)}
        # Written into this run's own event file (SummaryWriter.add_hparams would start another run).
        for summary in hparams(values, {}):
            self.board.file_writer.add_summary(summary)

    def start(self, total_steps: int, done: int) -> None:
        if not self.use_bar or self.quiet:
            return
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[rate]} img/s"),
            TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=done, epoch=0, loss="-", lr="-",
                                           rate="-")
        self.live = True

    def advance(self, step: int, epoch: int, **fields: Any) -> None:
        if self.progress is not None:
            shown: dict[str, Any] = {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in fields.items()}
            self.progress.update(self.task, completed=step, epoch=epoch, **shown)

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
            self.live = False

    def close(self) -> None:
        self.stop()
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self._board is not None:
            self._board.close()


def _tensorboard() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("run.tensorboard=true needs the tensorboard package, which is not installed: "
                        "pip install -e '.[tensorboard]' (or pip install tensorboard), or set run.tensorboard=false."
                        ) from None
    return SummaryWriter


def make_sink(is_main: bool, run_dir: Path, progress: str, tensorboard: bool = False) -> Sink:
    """The rank's sink: the real one on rank 0, a null one elsewhere."""
    if not is_main:
        return Sink()
    run_dir.mkdir(parents=True, exist_ok=True)
    return MainSink(run_dir / "metrics.jsonl", progress, run_dir if tensorboard else None)


def count(n: int, noun: str) -> str:
    """``1 step``, ``2 steps``."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def key_value_table(title: str, rows: list[tuple[str, str]]) -> Table:
    """A compact two-column table (the start-up table, the final summary)."""
    table = Table(title=title, show_header=False, box=None, pad_edge=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(key, value)
    return table


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records logged after ``last_step`` (work lost to a crash that the resumed run will redo)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines(keepends=True) if _step_of(line) <= last_step]
    atomic_write_text(path, "".join(line if line.endswith("\n") else line + "\n" for line in kept))


def _step_of(line: str) -> float:
    """The record's step; a torn last line (the process died mid-write) counts as after everything."""
    try:
        return float(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return float("inf")
