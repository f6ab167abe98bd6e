"""``python -m launcher report RUN_DIR [RUN_DIR ...]``: one picture of how runs went, and a summary table.

Reads each run's ``metrics.jsonl`` (while the run is still going too: a torn last line is skipped)
and writes a PNG with training loss, evaluation metrics, learning rate and throughput against
optimizer steps (epochs on the top axis), several runs overlaid. A resumed run's records are
de-duplicated by step, the last one winning.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from launcher.errors import UserError

_NOT_METRICS = ("kind", "step", "epoch", "time", "test_samples")


@dataclass
class Run:
    """The records of one run directory, by kind, one per step."""

    path: Path
    train: list[dict[str, Any]] = field(default_factory=list)
    eval: list[dict[str, Any]] = field(default_factory=list)
    starts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def eval_metrics(self) -> list[str]:
        keys = {k for r in self.eval for k, v in r.items() if k not in _NOT_METRICS and isinstance(v, (int, float))}
        return sorted(keys)


def load_run(path: Path) -> Run:
    """Parse ``path/metrics.jsonl``; UserError if there is none."""
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path} holds no metrics.jsonl: give run directories of this toolkit (runs/<name>-...), "
                        "whose rank 0 writes metrics.jsonl as it trains.")
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "eval": {}}
    starts = []
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line a running (or killed) process is writing
        if record.get("kind") == "start":
            starts.append(record)
        elif record.get("kind") in by_kind:
            by_kind[record["kind"]][record["step"]] = record  # a redone step replaces the earlier record
    train, evals = (sorted(by_kind[k].values(), key=lambda r: r["step"]) for k in ("train", "eval"))
    return Run(path, train, evals, starts)


def _column(records: list[dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    pairs = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return (np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])) if pairs else (np.array([]), np.array([]))


def plot(runs: Sequence[Run], out: Path) -> None:
    """Training loss, evaluation metrics, learning rate and throughput against steps, one line per run."""
    from matplotlib.figure import Figure  # no pyplot: no display backend needed

    fig = Figure(figsize=(12, 8), layout="constrained")
    axes = fig.subplots(2, 2)
    panels = [(axes[0, 0], "train", ["loss"], "training loss"), (axes[1, 0], "train", ["lr"], "learning rate"),
              (axes[1, 1], "train", ["samples_per_s"], "throughput (samples/s)")]
    for ax, kind, keys, title in panels:
        for run in runs:
            for key in keys:
                ax.plot(*_column(getattr(run, kind), key), label=run.name)
        ax.set_title(title)
    ax = axes[0, 1]
    for run in runs:
        for key in run.eval_metrics():
            ax.plot(*_column(run.eval, key), marker="o", label=f"{run.name}: {key}" if len(runs) > 1 else key)
    ax.set_title("evaluation")
    axes[0, 0].set_yscale("log")
    if len(runs) == 1:  # several runs may have different epoch lengths
        _epoch_axes(axes.flat, runs[0])
    for ax in axes.flat:
        ax.set_xlabel("optimizer step")
        if ax.lines:
            ax.legend(fontsize="small")
    fig.savefig(out, dpi=100)


def _epoch_axes(axes: Any, run: Run) -> None:
    """Epochs on the top axis: an evaluation record closes its epoch, so it gives the steps per epoch."""
    closed = [r for r in run.eval if r.get("epoch", -1) >= 0 and r.get("step", 0) > 0]
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


def summary(runs: Sequence[Run]) -> Table:
    """One column per run: steps, last training loss, last and best value of every evaluation metric."""
    table = Table(title="runs", title_justify="left")
    table.add_column("")
    for run in runs:
        table.add_column(run.name, justify="right")
    last = [run.train[-1] if run.train else {} for run in runs]
    table.add_row("steps", *[str(r.get("step", "-")) for r in last])
    table.add_row("epoch", *[str(r.get("epoch", "-")) for r in last])
    table.add_row("train loss", *[f"{r['loss']:.4f}" if "loss" in r else "-" for r in last])
    for metric in sorted({m for run in runs for m in run.eval_metrics()}):
        cells = []
        for run in runs:
            values = [r[metric] for r in run.eval if isinstance(r.get(metric), (int, float))]
            cells.append(f"{values[-1]:.4f} (best {_best(run, metric, values):.4f})" if values else "-")
        table.add_row(metric, *cells)
    times = [[r["time"] for r in run.train + run.eval if "time" in r] for run in runs]
    table.add_row("wall time", *[f"{max(t) - min(t):,.0f} s" if len(t) > 1 else "-" for t in times])
    table.add_row("restarts", *[str(max(len(run.starts) - 1, 0)) for run in runs])
    return table


def report(paths: Sequence[Path], out: Path | None = None) -> Path:
    """Plot and summarise ``paths``; returns where the PNG went (default: the run's own directory)."""
    runs = [load_run(Path(p)) for p in paths]
    target = out or (runs[0].path / "report.png" if len(runs) == 1 else Path("report.png"))
    plot(runs, target)
    Console(highlight=False, width=None if sys.stdout.isatty() else 120).print(summary(runs))
    print(f"plot: {target}")
    return target
