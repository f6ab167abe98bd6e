"""What rank 0 tells the user about a run: the start-up table (and config.yaml, the ``start`` record,
TensorBoard's hyperparameters) once every check has passed, and the final summary.

Both read a small record of the run that the trainer fills in, never the trainer itself. Only rank 0
calls them (the device description is gathered from all ranks before).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from launcher.config import flatten, to_dict, to_yaml
from launcher.env import DistEnv
from trainers.core.evaluation import describe
from trainers.core.files import atomic_write_text
from trainers.core.sinks import Sink, count, key_value_table

__all__ = ["RunRecord", "Outcome", "announce", "summarize"]


@dataclass(frozen=True)
class RunRecord:
    """What the start-up table says about a run (read-only)."""

    task: str
    run_dir: Path
    given: Any  # the config as the user gave it, `auto`s included (config.yaml, TensorBoard)
    env: DistEnv
    backend: str | None
    devices: str  # every rank's device, compacted (gathered from all ranks)
    precision: str
    auto: str  # what each `auto` key became on this device
    step: int
    epoch: int
    resumed_from: Path | None = None
    task_rows: dict[str, str] = field(default_factory=dict)
    higher_is_better: dict[str, bool | None] = field(default_factory=dict)
    model_summary: Any = None  # a table for run.debug
    setup_s: float = 0.0  # seconds from the trainer's start to this table (with the run's time so far, its wall time)


@dataclass(frozen=True)
class Outcome:
    """What the final summary says about a run (read-only)."""

    result: dict[str, Any]
    step: int
    seconds: float  # wall time of this process
    steps_trained: int  # optimizer steps trained by this process
    samples_per_s: float
    best: dict[str, Any] | None  # manifest entry of the best checkpoint
    best_name: str
    best_sign: float
    checkpoints: Path
    model: Path


def _torch_build() -> str:
    """Which torch this is: its version and whether it is a CUDA or a CPU build."""
    import torch

    return f"{torch.__version__} ({f'CUDA {torch.version.cuda} build' if torch.version.cuda else 'CPU build'})"


def _changed_keys(path: Path, config: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key of ``config`` that differs from the YAML file at ``path``."""
    try:
        old = dict(flatten(yaml.safe_load(path.read_text()) or {}))
    except (OSError, yaml.YAMLError):
        return []
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in flatten(config) if old.get(k, v) != v and k != "run.dir"]


def _status(record: RunRecord, changed: list[str]) -> str:
    if record.resumed_from is None:
        status = "new run (no checkpoint in it yet)"
    else:
        status = (f"resumed at step {record.step} from {record.resumed_from.name}"
                  + (" with changed settings (below)" if changed else " with the same settings"))
    if record.given.run.debug:
        status += "; DEBUG MODE (run.debug=true): a few batches per epoch, one process, anomaly detection"
    return status


def _settings_rows(record: RunRecord, config: dict[str, Any]) -> list[tuple[str, str]]:
    """The keys whose value differs from the task's defaults (``run.dir`` has its own row; ``slurm.*`` is for
    submission, not training); every key is in config.yaml."""
    defaults = dict(flatten(to_dict(type(record.given)())))
    rows = [(k, str(v)) for k, v in flatten(config)
            if defaults.get(k) != v and k != "run.dir" and not k.startswith("slurm.")]
    where = f"all keys: {record.run_dir / 'config.yaml'}"
    return [("settings", f"{len(rows)} differ from the defaults of {record.task} (below); {where}"), *rows]


def announce(record: RunRecord, sink: Sink) -> None:
    """The start-up table, the ``start`` record and config.yaml (rank 0), once every check has passed."""
    env = record.env
    config = to_dict(record.given)
    changed = _changed_keys(record.run_dir / "config.yaml", config) if record.resumed_from else []
    atomic_write_text(record.run_dir / "config.yaml", to_yaml(record.given))  # only now: the run passed its checks
    rows = [("task", record.task), ("run dir", str(record.run_dir)), ("status", _status(record, changed)),
            ("launch", f"{env.launcher}  (rank 0 on {socket.gethostname()})"),
            ("world", f"{env.world_size} rank(s) = {env.num_nodes} node(s) x {env.local_world_size}"),
            ("backend", f"{record.backend or 'none (single process)'}"
             + (f"  master {env.master_addr}:{env.master_port}" if record.backend else "")),
            ("devices", record.devices), ("torch", _torch_build()), ("precision", record.precision),
            ("auto", record.auto),
            *record.task_rows.items(),
            ("restarts", f"{env.restart_count} torchrun restart(s), {env.requeue_count} SLURM requeue(s)"),
            *_settings_rows(record, config)]
    sink.print(key_value_table("run", rows))
    if changed:
        sink.print("changed since the last run: " + ", ".join(changed))
    if record.model_summary is not None:
        sink.print(record.model_summary)
    sink.metric({"kind": "start", "step": record.step, "epoch": record.epoch, "world_size": env.world_size,
                 "launcher": env.launcher, "torchrun_restarts": env.restart_count, "slurm_requeues": env.requeue_count,
                 "resumed": record.resumed_from is not None, "higher_is_better": record.higher_is_better,
                 "setup_s": round(record.setup_s, 3)})
    sink.hparams(config)


def summarize(outcome: Outcome, sink: Sink) -> None:
    """Best and final metrics, time, throughput, and where the outputs are (rank 0)."""
    rows = [("time", f"{outcome.seconds:,.1f} s in this process, {count(outcome.steps_trained, 'step')} trained "
             f"({outcome.samples_per_s:,.0f} samples/s)")]
    if outcome.best is not None:
        rows.append(("best", f"{outcome.best_name} {outcome.best_sign * outcome.best['metric']:.4f} at step "
                     f"{outcome.best['step']}: {outcome.checkpoints / outcome.best['file']}"))
    rows.append(("model", str(outcome.model)))
    sink.print(key_value_table(f"done: {describe(outcome.result)} after {outcome.step} steps", rows))
