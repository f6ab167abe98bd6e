"""What rank 0 tells the user about a run: the start-up table (and config.yaml, the ``start`` record,
TensorBoard's hyperparameters) once every check has passed, and the final summary.

Every rank calls these (the device description is gathered from all ranks); only rank 0 writes.
"""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from launcher.config import flatten, to_dict, to_yaml
from trainers.core.auto import describe_choices
from trainers.core.checkpoint import atomic_write_text
from trainers.core.evaluation import EVAL_EPOCH, describe
from trainers.core.parallel import unwrap
from trainers.core.sinks import key_value_table
from trainers.core.summary import model_summary
from trainers.core.task import BatchInfo

if TYPE_CHECKING:
    from trainers.core.trainer import Trainer


def _changed_keys(path: Path, config: dict[str, Any]) -> list[str]:
    """'key: old -> new' for every key of ``config`` that differs from the YAML file at ``path``."""
    try:
        old = dict(flatten(yaml.safe_load(path.read_text()) or {}))
    except (OSError, yaml.YAMLError):
        return []
    return [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in flatten(config) if old.get(k, v) != v and k != "run.dir"]


def announce(trainer: Trainer) -> None:
    """The start-up table, the ``start`` record and config.yaml, once every check has passed."""
    env, devices = trainer.rt.env, trainer.rt.describe_devices()
    if not trainer.rt.is_main:
        return
    config = to_dict(trainer.task.cfg)  # as the user gave it, `auto`s included
    changed = _changed_keys(trainer.run_dir / "config.yaml", config) if trainer.resumed_from else []
    atomic_write_text(trainer.run_dir / "config.yaml", to_yaml(trainer.task.cfg))  # only now: the run passed its checks
    how = (f"resumed at step {trainer.state.global_step} from {trainer.resumed_from.name}"
           + (" with changed settings (below)" if changed else " with the same settings")
           if trainer.resumed_from else "new run (no checkpoint in it yet)")
    rows = [("task", trainer.task.name), ("run dir", str(trainer.run_dir)), ("status", how),
            ("launch", f"{env.launcher}  (rank 0 on {socket.gethostname()})"),
            ("world", f"{env.world_size} rank(s) = {env.num_nodes} node(s) x {env.local_world_size}"),
            ("backend", f"{trainer.rt.backend or 'none (single process)'}"
             + (f"  master {env.master_addr}:{env.master_port}" if trainer.rt.distributed else "")),
            ("devices", devices), ("precision", trainer.amp.describe()),
            ("auto", describe_choices(trainer.auto_chosen, trainer.rt.device.type)),
            *trainer.task.describe().items(),
            ("restarts", f"{env.restart_count} torchrun restart(s), {env.requeue_count} SLURM requeue(s)"),
            *[(k, str(v)) for k, v in flatten(config) if not k.startswith("slurm.")]]  # submission, not training
    trainer.sink.print(key_value_table("run", rows))
    if changed:
        trainer.sink.print("changed since the last run: " + ", ".join(changed))
    if trainer.cfg.run.debug:
        trainer.sink.print(model_summary(unwrap(trainer.model), _example_inputs(trainer)))
    trainer.sink.metric({"kind": "start", "step": trainer.state.global_step, "epoch": trainer.state.epoch,
                         "world_size": env.world_size, "launcher": env.launcher, "torchrun_restarts": env.restart_count,
                         "slurm_requeues": env.requeue_count, "resumed": bool(trainer.resumed_from),
                         "higher_is_better": {f"test_{n}": m.higher_is_better for n, m in trainer.metrics.items()}})
    trainer.sink.hparams(config)


def _example_inputs(trainer: Trainer) -> Any:
    """The model inputs of one evaluation batch, prepared as in training (for the model summary)."""
    batch, index = next(iter(trainer.eval_loader.epoch(trainer.state.seed, EVAL_EPOCH)))
    batch = trainer.prepare_batch(batch, BatchInfo(index, EVAL_EPOCH, trainer.state.seed, train=False))
    return trainer.task.inputs(batch)


def summarize(trainer: Trainer, result: dict[str, Any]) -> None:
    """Best and final metrics, time, throughput, and where the outputs are (rank 0)."""
    if not trainer.rt.is_main:
        return
    steps, seconds = trainer.trained
    rate = steps * trainer.cfg.train.batch_size / seconds if seconds > 0 else 0.0
    best = trainer.ckpt.best_entry() if trainer.cfg.checkpoint.keep_best else None
    rows = [("time", f"{time.perf_counter() - trainer.started:,.1f} s in this process, {steps} steps trained "
             f"({rate:,.0f} samples/s)")]
    if best is not None:
        rows.append(("best", f"{trainer.best_name} {trainer.best_sign * best['metric']:.4f} at step {best['step']}: "
                     f"{trainer.ckpt.directory / best['file']}"))
    rows.append(("model", str(trainer.run_dir / "model.pt")))
    trainer.sink.print(key_value_table(f"done: {describe(result)} after {trainer.state.global_step} steps", rows))

