"""The recipe every task's ``main()`` follows: config, runtime, run directory, trainer, exit code.

    def main(argv=None) -> int:
        return run_task(MyTask(), argv)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
from rich.console import Console
from rich.table import Table

from launcher.config import Config, ConfigError, flatten, load_config, replace, to_dict, to_yaml
from launcher.env import LaunchError
from launcher.runtime import CollectiveError, Runtime, configure_determinism, distributed
from launcher.signals import PREEMPTED_EXIT_CODE, Preempted
from trainers.checkpoint import CheckpointError, atomic_write_text
from trainers.cifar_data import DatasetUnavailable
from trainers.task import Task
from trainers.trainer import Trainer

#: Exit status for bad input (config, launch environment, dataset, checkpoint): fix and re-run.
USAGE_EXIT_CODE = 2
#: Exit status when a peer rank failed or timed out in a collective.
COLLECTIVE_EXIT_CODE = 3

_USER_ERRORS = (ConfigError, LaunchError, CheckpointError, DatasetUnavailable)


def parse_args(argv: Sequence[str] | None, prog: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train; settings come from --config and key=value overrides (see README).")
    parser.add_argument("--config", type=Path, default=None, help="YAML file with settings (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 data.synthetic=true")
    return parser.parse_args(argv)


def resolve_run_dir(cfg: Config, rt: Runtime) -> Path:
    """run.dir, or runs/<name>-<job id or time>, chosen by rank 0 so that every rank agrees."""
    if cfg.run.dir:
        return Path(cfg.run.dir)
    # A job id is stable across requeues and torchrun restarts, so those resume automatically.
    suffix = rt.env.job_id or time.strftime("%Y%m%d-%H%M%S")
    if rt.env.job_id is None and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0 and rt.is_main:
        print("warning: torchrun has --max-restarts but no --rdzv-id (or --standalone), so a restarted group "
              "would pick a new run directory and start over; set run.dir or --rdzv-id.", file=sys.stderr)
    return Path(rt.broadcast_object(f"runs/{cfg.run.name}-{suffix}", "run directory"))


def startup_table(cfg: Config, rt: Runtime, devices: list[str]) -> Table:
    """Launch mode, world, backend, devices and the resolved config, as one compact table."""
    env = rt.env
    table = Table(title="run", show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
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


def _train(cfg: Config, rt: Runtime, task: Task) -> dict:
    configure_determinism(cfg.run.deterministic)
    run_dir = resolve_run_dir(cfg, rt)
    cfg = replace(cfg, run={"dir": str(run_dir)})
    devices = rt.gather_objects(_describe_device(rt.device), "start-up")
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))
        Console(highlight=False).print(startup_table(cfg, rt, devices))
    rt.barrier("run directory")
    summary = Trainer(cfg, rt, task, run_dir).fit()
    if rt.is_main:
        print(f"done: test_acc {summary.get('test_acc', float('nan')):.4f} after {summary['global_step']} steps; "
              f"outputs in {run_dir}")
    return summary


def run_task(task: Task, argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Parse, launch, train; returns the process exit code (0, 2, 3 or PREEMPTED_EXIT_CODE)."""
    args = parse_args(argv, prog or f"python -m trainers.{task.name}")
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    try:
        with distributed(cfg.dist) as rt:
            _train(cfg, rt, task)
        return 0
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except _USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    except CollectiveError as e:
        print(f"error: {e}", file=sys.stderr)
        return COLLECTIVE_EXIT_CODE
