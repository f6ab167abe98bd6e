"""The recipe every task's ``main()`` follows: config, checks, runtime, run directory, trainer, exit code.

    def main(argv=None) -> int:
        return run_task(MyTask, argv)

Errors reach the user here, in one place: a ``launcher.errors.UserError`` (config, launch environment,
data, checkpoint) becomes its one-paragraph message and exit status 2, without a traceback unless
``run.debug=true`` or ``DISTLAUNCH_TRACEBACK=1``; a failed collective becomes exit status 3.
"""

from __future__ import annotations

import errno
import json
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from launcher.config import fingerprint, load_config, replace, to_yaml
from launcher.env import DistEnv, LaunchError, elastic_error_file, probable_rank, resolve_env, tracebacks_requested
from launcher.errors import USAGE_EXIT_CODE, UserError
from launcher.runtime import (CollectiveError, Runtime, SetupFailed, choose_backend, choose_device,
                              configure_determinism, distributed)
from launcher.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, stop_during_startup
from trainers.core.auto import DeviceTraits, resolve_auto
from trainers.core.cli import parse_args
from trainers.core.config import Config
from trainers.core.data import micro_batch_size
from trainers.core.nonfinite import DIVERGED_EXIT_CODE, Diverged
from trainers.core.rundir import RunDirError, claim
from trainers.core.task import Task
from trainers.core.trainer import Trainer

#: Exit status when a peer rank failed or timed out in a collective.
COLLECTIVE_EXIT_CODE = 3


class DiskFull(UserError):
    """A file of the run could not be written: no space left (or over quota)."""


class Fits(Protocol):
    def fit(self) -> dict[str, Any]: ...


#: Builds the trainer of a run: ``Trainer`` by default, or any class taking (task, rt, run_dir) with ``fit()``.
TrainerFactory = Callable[[Task, Runtime, Path], Fits]


def default_run_dir(cfg: Config, task_name: str) -> Path:
    """runs/<name>-<fingerprint>: a pure function of what the command trains, so re-running it resumes."""
    return Path("runs") / f"{cfg.run.name or task_name}-{fingerprint(cfg)}"


def check_before_launch(cfg: Config, env: DistEnv) -> torch.device:
    """Everything that can fail on its own before the process group starts, checked on every rank,
    so that no rank waits in a rendezvous for a rank that already gave up; returns this rank's device."""
    micro_batch_size(cfg.train.batch_size, env.world_size, cfg.train.grad_accum)
    device = choose_device(env, cfg.dist)
    choose_backend(device, cfg.dist)  # dist.device=cuda or nccl without a GPU
    if cfg.run.debug and env.world_size > 1:
        raise LaunchError(f"run.debug=true runs one process (breakpoints, pdb), but this launch has {env.world_size} "
                          f"ranks ({env.launcher}); start it with plain python, or drop run.debug.")
    return device


def _train(given: Config, env: DistEnv, device: torch.device, task_cls: type[Task],
           trainer: TrainerFactory) -> dict[str, Any]:
    """Resolve the device-dependent settings once, start the process group, claim the run directory, train."""
    cfg, _ = resolve_auto(given, DeviceTraits.of(device))
    configure_determinism(cfg.run.deterministic or cfg.run.debug)
    if cfg.run.debug:
        torch.autograd.set_detect_anomaly(True)  # a NaN names the operation that made it
    with distributed(cfg.dist, env, device) as rt:
        run_dir, held, problem = Path(cfg.run.dir), None, None
        if rt.is_main:  # rank 0 claims the directory and tells the others, so that all stop together on a refusal
            try:
                held = claim(run_dir)
            except RunDirError as e:
                problem = str(e)
        problem = rt.broadcast_object(problem, "run directory")
        if problem:
            raise RunDirError(problem)
        try:
            with rt.agreed("task"):
                task = task_cls(cfg)
                task.given = given  # the user's config, `auto`s included: config.yaml keeps them
            return trainer(task, rt, run_dir).fit()
        except BaseException:
            if held is not None:
                held.withdraw()  # a run refused before it wrote anything leaves no directory behind
            raise


def _report(error: BaseException, cfg: Config | None) -> None:
    """One message per error: rank 0 reports what every rank meets; other ranks say who they are."""
    rank = probable_rank()
    debug = tracebacks_requested() or (cfg is not None and cfg.run.debug)
    same = getattr(error, "same_on_every_rank", False)
    if rank != 0 and same and not debug:
        return
    prefix = f"rank {rank}: " if rank else ""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prefix}error: {error}", file=sys.stderr)


def prefix_warnings(rank: int) -> None:
    """Python warnings of ranks other than 0 say which rank they come from (rank 0's stay as they are)."""
    if rank == 0:
        return
    plain = warnings.formatwarning

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        return f"rank {rank}: " + plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


def _record_for_torchrun(error: BaseException) -> None:
    """torchrun's failure summary then shows this message as the root cause instead of "error_file: <N/A>"
    (the file format is torch.distributed.elastic's error record; the message stands in for the traceback)."""
    path = elastic_error_file()
    if path:
        text = f"{getattr(error, 'kind', type(error).__name__)}: {error}"  # SetupFailed: the failing rank's type
        record = {"message": {"message": text, "extraInfo": {"py_callstack": text, "timestamp": str(int(time.time()))}}}
        Path(path).write_text(json.dumps(record))


def run_task(task: type[Task], argv: Sequence[str] | None = None, *, trainer: TrainerFactory | None = None,
             prog: str | None = None) -> int:
    """Parse, check, launch and train ``task``; returns the process exit code.

    0 finished; 2 a user error (the message says what to change); 3 another rank failed or timed out;
    4 the loss or weights became NaN or infinite (nothing saved from them); 75 stopped by a signal after writing
    a checkpoint (re-run to resume); 130 interrupted at once.
    ``trainer`` replaces the built-in ``Trainer`` (any factory of (task, rt, run_dir) with ``fit()``).
    """
    stop_during_startup()  # until the training loop installs its stop flag
    prefix_warnings(probable_rank())
    args = parse_args(argv, prog or f"python -m trainers.{task.name}", task.config)
    cfg: Config | None = None
    try:
        cfg = load_config(args.config, args.overrides, schema=task.config)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        env = resolve_env()
        device = check_before_launch(cfg, env)
        cfg = replace(cfg, run={"dir": cfg.run.dir or str(default_run_dir(cfg, task.name))})
        _train(cfg, env, device, task, trainer or Trainer)
        return 0
    except Preempted:
        return PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("interrupted: stopped at once, without a new checkpoint (the previous ones are kept); re-run the "
              "same command to resume from the last one.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    except UserError as e:
        _report(e, cfg)
        _record_for_torchrun(e)
        return USAGE_EXIT_CODE
    except CollectiveError as e:
        _report(e, cfg)
        _record_for_torchrun(e)
        return COLLECTIVE_EXIT_CODE
    except SetupFailed as e:  # every rank raises it at once; rank 0 says it once for the job
        if probable_rank() == 0:
            print(e.report(), file=sys.stderr)
        _record_for_torchrun(e)
        return e.exit_code
    except Diverged as e:
        _report(e, cfg)
        _record_for_torchrun(e)
        return DIVERGED_EXIT_CODE
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        full = DiskFull(f"The disk is full ({e.strerror}: {e.filename or 'a file of the run'}). Files are written "
                        "whole or not at all, so nothing saved before is lost: free space or give another run.dir, "
                        "then run the same command again to resume.")
        _report(full, cfg)
        _record_for_torchrun(full)
        return USAGE_EXIT_CODE
