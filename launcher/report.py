"""``python -m launcher report RUN_DIR [RUN_DIR ...]``: one picture of how runs went, and a summary table.

Reads each run's ``metrics.jsonl`` (while the run is still going too: a torn last line is skipped) and writes a
PNG with the training loss, each evaluation metric on an axis of its own, the learning rate and the throughput
against optimizer steps (epochs on the top axis), several runs overlaid, one colour per run in every panel, and
a dotted vertical line wherever a run resumed (a restart, a requeue, a re-run after a stop). A resumed run's
records are de-duplicated by step, the last one winning. The table's final step, time and throughput come from
the run's own records: its ``end`` record once it finished.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from launcher.errors import UserError

_NOT_METRICS = ("kind", "step", "epoch", "time", "test_samples")
#: matplotlib's default colour cycle: run i has colour i in every panel
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf")


@dataclass
class Attempt:
    """One process's share of a run: from its ``start`` record to its ``end`` (or last) record."""

    start: dict[str, Any]
    last_time: float
    end: dict[str, Any] | None = None

    @property
    def seconds(self) -> float:
        """Wall time of the attempt as its own summary counts it (from the trainer's start)."""
        if self.end is not None and isinstance(self.end.get("seconds"), (int, float)):
            return float(self.end["seconds"])
        return self.last_time - (self.start["time"] - float(self.start.get("setup_s", 0.0)))


@dataclass
class Run:
    """The records of one run directory, by kind, one per step."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    epochs: list[dict[str, Any]] = field(default_factory=list)
    attempts: list[Attempt] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def starts(self) -> list[dict[str, Any]]:
        return [a.start for a in self.attempts]

    def eval_metrics(self) -> list[str]:
        keys = {k for r in self.eval for k, v in r.items() if k not in _NOT_METRICS and isinstance(v, (int, float))}
        return sorted(keys)

    def resumes(self) -> list[int]:
        """The steps at which an attempt resumed the run (its start record's step)."""
        return [a.start["step"] for a in self.attempts[1:]]

    @property
    def end(self) -> dict[str, Any] | None:
        return self.attempts[-1].end if self.attempts else None

    def final_step(self) -> int | None:
        records = [r["step"] for r in self.train + self.eval + self.epochs]
        if self.end is not None:
            return int(self.end["step"])
        return max(records) if records else None


def load_run(path: Path) -> Run:
    """Parse ``path/metrics.jsonl``; UserError if there is none."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path} holds no metrics.jsonl: give run directories of this toolkit (runs/<name>-...), "
                        "whose rank 0 writes metrics.jsonl as it trains.")
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "eval": {}, "epoch": {}}
    run = Run(path)
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a running (or killed) process is writing
        kind = record.get("kind")
        if kind == "start":
            run.attempts.append(Attempt(record, record.get("time", 0.0)))
            continue
        if run.attempts and "time" in record:
            run.attempts[-1].last_time = record["time"]
        if kind == "end" and run.attempts:
            run.attempts[-1].end = record
        elif kind in by_kind:
            by_kind[kind][record["step"]] = record  # a redone step replaces the earlier record
    run.train, run.eval, run.epochs = (sorted(by_kind[k].values(), key=lambda r: r["step"])
                                       for k in ("train", "eval", "epoch"))
    return run


def _column(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else (np.array([]), np.array([]))


def _panels(runs: Sequence[Run]) -> list[tuple[str, str, str]]:
    """(kind of record, key, axis label) of every panel: one metric per axis."""
    metrics = sorted({m for run in runs for m in run.eval_metrics()})
    return [("train", "loss", "training loss"), *[("eval", m, m) for m in metrics], ("train", "lr", "learning rate"),
            ("train", "samples_per_s", "throughput (samples/s)")]


def plot(runs: Sequence[Run], out: Path) -> Any:
    """The figure (also written to ``out``): one panel per quantity, one colour per run, resumes marked."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    panels = _panels(runs)
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(12, 3.6 * rows), layout="constrained")
    axes = list(fig.subplots(rows, 2, squeeze=False).flat)
    for ax, (kind, key, label) in zip(axes, panels):
        for index, run in enumerate(runs):
            colour = _COLOURS[index % len(_COLOURS)]
            records = run.eval if kind == "eval" else run.train
            ax.plot(*_column(records, key), color=colour, label=run.name, marker="o" if kind == "eval" else None)
            for step in run.resumes():
                ax.axvline(step, color=colour, linestyle=":", linewidth=1)
        ax.set_ylabel(label)
        ax.set_xlabel("optimizer step")
        if key == "loss" or (kind == "eval" and "loss" in key and _positive(runs, kind, key)):
            ax.set_yscale("log")
        if len(runs) > 1:
            ax.legend(fontsize="small")
    last = max((run.final_step() or 0 for run in runs), default=0)
    for ax in axes[:len(panels)]:
        ax.set_xlim(0, max(1, last))  # the same steps on every panel
    for ax in axes[len(panels):]:
        ax.remove()
    if len(runs) == 1:  # several runs may have different epoch lengths
        _epoch_axes(axes[:len(panels)], runs[0])
    fig.savefig(out, dpi=100)
    return fig


def _positive(runs: Sequence[Run], kind: str, key: str) -> bool:
    values = [v for run in runs for v in _column(run.eval if kind == "eval" else run.train, key)[1]]
    return bool(values) and min(values) > 0


def _epoch_axes(axes: Any, run: Run) -> None:
    """Epochs on the top axis: an epoch record closes its epoch, so it gives the steps per epoch."""
    closed = [r for r in run.epochs + run.eval if r.get("epoch", -1) >= 0 and r.get("step", 0) > 0]
    if not closed:
        return
    per_epoch = closed[0]["step"] / (closed[0]["epoch"] + 1)
    for ax in axes:
        top = ax.secondary_xaxis("top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch))
        top.set_xlabel("epoch")


def _best(run: Run, metric: str, values: list[float]) -> float:
    """Best value: in the direction the run recorded for the metric (losses and errors down otherwise)."""
    recorded = next((s["higher_is_better"].get(metric) for s in reversed(run.starts) if "higher_is_better" in s), None)
    higher = recorded if recorded is not None else not any(w in metric for w in ("loss", "err", "mae", "mse"))
    return max(values) if higher else min(values)


def _throughput(run: Run) -> str:
    if run.end is not None:
        return f"{run.end['samples_per_s']:,.0f} samples/s"
    rates = [r["samples_per_s"] for r in run.epochs if isinstance(r.get("samples_per_s"), (int, float))]
    return f"{sum(rates) / len(rates):,.0f} samples/s" if rates else "-"


def summary(runs: Sequence[Run]) -> Table:
    """One column per run: final step, state, last training loss, last and best value of every evaluation metric,
    wall time, throughput and restarts."""
    table = Table(title="runs", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run.name, justify="right")
    last = [run.train[-1] if run.train else {} for run in runs]
    table.add_row("steps", *[str(run.final_step() if run.final_step() is not None else "-") for run in runs])
    table.add_row("state", *["finished" if run.end else "running or stopped" for run in runs])
    table.add_row("train loss", *[f"{r['loss']:.4f}" if "loss" in r else "-" for r in last])
    for metric in sorted({m for run in runs for m in run.eval_metrics()}):
        cells = []
        for run in runs:
            values = [r[metric] for r in run.eval if isinstance(r.get(metric), (int, float))]
            cells.append(f"{values[-1]:.4f} (best {_best(run, metric, values):.4f})" if values else "-")
        table.add_row(metric, *cells)
    table.add_row("wall time", *[f"{sum(a.seconds for a in run.attempts):,.1f} s" if run.attempts else "-"
                                 for run in runs])
    table.add_row("throughput", *[_throughput(run) for run in runs])
    table.add_row("restarts", *[str(max(len(run.attempts) - 1, 0)) for run in runs])
    return table


def report(paths: Sequence[Path], out: Path | None = None) -> Path:
    """Plot and summarise ``paths``; returns where the PNG went (default: the run's own directory)."""
    runs = [load_run(Path(p)) for p in paths]
    target = out or (runs[0].path / "report.png" if len(runs) == 1 else Path("report.png"))
    plot(runs, target)
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(summary(runs))
    print(f"plot: {target}")
    return target
