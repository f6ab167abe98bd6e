"""The recipe every task's ``main()`` follows: config, runtime, run directory, trainer, exit code.

    def main(argv=None) -> int:
        return run_task(MyTask, argv)

User errors (``launcher.errors.UserError``: config, launch environment, data, checkpoint) become one
message and exit status 2 here, in one place.
"""

from __future__ import annotations

import argparse
import socket
import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch
from rich.console import Console
from rich.table import Table

from launcher.config import Config, flatten, leaves, load_config, replace, to_dict, to_yaml, yaml_scalar
from launcher.errors import USAGE_EXIT_CODE, UserError
from launcher.runtime import CollectiveError, Runtime, configure_determinism, distributed
from launcher.signals import PREEMPTED_EXIT_CODE, Preempted
from trainers.core.checkpoint import atomic_write_text
from trainers.core.task import Task
from trainers.core.trainer import Trainer

#: Exit status when a peer rank failed or timed out in a collective.
COLLECTIVE_EXIT_CODE = 3


class Fits(Protocol):
    def fit(self) -> dict[str, Any]: ...


#: Builds the trainer of a run: ``Trainer`` by default, or any class taking (task, rt, run_dir) with ``fit()``.
TrainerFactory = Callable[[Task, Runtime, Path], Fits]


def _keys_help(schema: type[Config]) -> str:
    """Every configuration key with its type, default and documentation, generated from the schema."""
    lines = ["configuration keys (key=value):"]
    for leaf in leaves(schema):
        kind = getattr(leaf.type, "__name__", str(leaf.type))
        default = yaml_scalar(leaf.default)
        lines.append(f"  {leaf.key} ({kind}, default {'(empty)' if default == '' else default}): "
                     f"{leaf.doc.replace('`', '')}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None, prog: str, schema: type[Config] = Config) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train; settings come from --config and key=value overrides (see README).",
        epilog=_keys_help(schema), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with settings (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 optim.lr=0.05")
    return parser.parse_args(argv)


def resolve_run_dir(cfg: Config, rt: Runtime, task_name: str) -> Path:
    """run.dir, or runs/<name>-<job id or time>, chosen by rank 0 so that every rank agrees."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    # A job id is stable across requeues and torchrun restarts, so those resume automatically.
    suffix = rt.env.job_id or time.strftime("%Y%m%d-%H%M%S")
    if rt.env.job_id is None and rt.env.max_restarts > 0 and rt.is_main:
        print("warning: torchrun has --max-restarts but no --rdzv-id (or --standalone), so a restarted group "
              "would pick a new run directory and start over; set run.dir or --rdzv-id.", file=sys.stderr)
    return Path(rt.broadcast_object(f"runs/{cfg.run.name or task_name}-{suffix}", "run directory"))


def startup_table(cfg: Config, rt: Runtime, devices: list[str], task_name: str) -> Table:
    """Task, launch mode, world, backend, devices and the resolved config, as one compact table."""
    env = rt.env
    table = Table(title="run", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("task", task_name)
    table.add_row("launch", f"{env.launcher}  (rank 0 on {socket.gethostname()})")
    table.add_row("world", f"{env.world_size} rank(s) = {env.num_nodes} node(s) x {env.local_world_size}")
    table.add_row("backend", f"{rt.backend or 'none (single process)'}"
                  + (f"  master {env.master_addr}:{env.master_port}" if rt.distributed else ""))
    table.add_row("devices", _compact(devices))
    for key, value in flatten(to_dict(cfg)):
        table.add_row(key, str(value))
    return table


def _compact(devices: list[str]) -> str:
    """'cuda H100 @ node1 (ranks 0-7)' style summary: one entry per distinct device description."""
    seen: dict[str, list[int]] = {}
    for rank, dev in enumerate(devices):
        seen.setdefault(dev, []).append(rank)
    return "; ".join(f"{dev} (rank {r[0]})" if len(r) == 1 else f"{dev} (ranks {r[0]}-{r[-1]})"
                     for dev, r in seen.items())


def _describe_device(device: torch.device) -> str:
    # Without the GPU index, so that the ranks of a node compact into one "(ranks 0-7)" entry.
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)} @ {socket.gethostname()}"
    return f"cpu @ {socket.gethostname()}"


def _train(cfg: Config, rt: Runtime, task_cls: type[Task], trainer: TrainerFactory) -> dict[str, Any]:
    configure_determinism(cfg.run.deterministic)
    run_dir = resolve_run_dir(cfg, rt, task_cls.name)
    cfg = replace(cfg, run={"dir": str(run_dir)})
    devices = rt.gather_objects(_describe_device(rt.device), "start-up")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        Console(highlight=False).print(startup_table(cfg, rt, devices, task_cls.name))
    rt.barrier("run directory")
    summary = trainer(task_cls(cfg), rt, run_dir).fit()
    if rt.is_main:
        scores = "  ".join(f"{k} {v:.4f}" for k, v in summary.items() if k.startswith("test_") and isinstance(v, float))
        print(f"done: {scores} after {summary.get('global_step')} steps; outputs in {run_dir}")
    return summary


def run_task(task: type[Task], argv: Sequence[str] | None = None, *, trainer: TrainerFactory | None = None,
             prog: str | None = None) -> int:
    """Parse, launch, train ``task``; returns the process exit code (0, 2, 3 or PREEMPTED_EXIT_CODE).

    ``trainer`` replaces the built-in ``Trainer`` (any factory of (task, rt, run_dir) with ``fit()``).
    """
    args = parse_args(argv, prog or f"python -m trainers.{task.name}", task.config)
    trainer = trainer or Trainer
    try:
        cfg = load_config(args.config, args.overrides, schema=task.config)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        with distributed(cfg.dist) as rt:
            _train(cfg, rt, task, trainer)
        return 0
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except CollectiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return COLLECTIVE_EXIT_CODE
