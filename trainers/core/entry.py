"""The recipe every task's ``main()`` follows: config, checks, runtime, run directory, trainer, exit code.

    def main(argv=None) -> int:
        return run_task(MyTask, argv)

Errors reach the user here, in one place: a ``launcher.errors.UserError`` (config, launch environment,
data, checkpoint) becomes its one-paragraph message and exit status 2, without a traceback unless
``run.debug=true`` or ``DISTLAUNCH_TRACEBACK=1``; a failed collective becomes exit status 3.
"""

from __future__ import annotations

import errno
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import torch

from launcher.config import fingerprint, to_yaml
from launcher.env import DistEnv, probable_rank, resolve_env, tracebacks_requested
from launcher.errors import USAGE_EXIT_CODE, UserError
from launcher.runtime import (CollectiveError, Runtime, SetupFailed, choose_backend, choose_device,
                              configure_determinism, distributed)
from launcher.signals import INTERRUPTED_EXIT_CODE, PREEMPTED_EXIT_CODE, Preempted, stop_during_startup
from trainers.core.auto import DeviceTraits, resolve_auto
from trainers.core.cli import check_launch, parse_args, record_for_torchrun, report_bug, report_error, settings
from trainers.core.config import Config
from trainers.core.nonfinite import DIVERGED_EXIT_CODE, Diverged
from trainers.core.evaluation import describe
from trainers.core.rundir import RunDirError, claim, finished_record
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


def check_before_launch(cfg: Config, env: DistEnv) -> torch.device:
    """Everything that can fail on its own before the process group starts, checked on every rank,
    so that no rank waits in a rendezvous for a rank that already gave up; returns this rank's device."""
    check_launch(cfg, env)  # (also checked before torch is imported, when the task runs as a program)
    device = choose_device(env, cfg.dist)
    choose_backend(device, cfg.dist)  # dist.device=cuda or nccl without a GPU
    return device


def _already_finished(run_dir: Path, end: dict[str, Any]) -> str:
    metrics = describe({k: v for k, v in end.items() if k.startswith("test_")})
    return (f"This run has already finished: step {end['step']}, {metrics} ({run_dir}).\n"
            f"Its weights are {run_dir / 'model.pt'}; `python -m launcher report {run_dir}` shows how it went.\n"
            "To train a new run with these settings, give it a name of its own: run.name=NAME (or run.dir=DIR).")


def _train(given: Config, env: DistEnv, device: torch.device, task_cls: type[Task],
           trainer: TrainerFactory) -> dict[str, Any]:
    """Resolve the device-dependent settings once, start the process group, claim the run directory, train."""
    cfg, _ = resolve_auto(given, DeviceTraits.of(device))
    configure_determinism(cfg.run.deterministic or cfg.run.debug)
    if cfg.run.debug:
        torch.autograd.set_detect_anomaly(True)  # a NaN names the operation that made it
    with distributed(cfg.dist, env, device) as rt:
        run_dir, held, problem, finished = Path(cfg.run.dir), None, None, None
        if rt.is_main:  # rank 0 claims the directory and tells the others, so that all stop together on a refusal
            try:
                held = claim(run_dir)
                finished = finished_record(run_dir, fingerprint(given)) if cfg.checkpoint.resume == "auto" else None
            except RunDirError as e:
                problem = str(e)
        problem, finished = rt.broadcast_object((problem, finished), "run directory")
        if problem:
            raise RunDirError(problem)
        if finished is not None:  # the same command again: say so, train and rewrite nothing
            if rt.is_main:
                print(_already_finished(run_dir, finished))
            return finished
        try:
            with rt.agreed("task"):
                task = task_cls(cfg)
                task.given = given  # the user's config, `auto`s included: config.yaml keeps them
            return trainer(task, rt, run_dir).fit()
        except BaseException:
            if held is not None:
                held.withdraw()  # a run refused before it wrote anything leaves no directory behind
            raise


def prefix_warnings(rank: int) -> None:
    """Python warnings of ranks other than 0 say which rank they come from (rank 0's stay as they are)."""
    if rank == 0:
        return
    plain = warnings.formatwarning

    def formatwarning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
        return f"rank {rank}: " + plain(message, category, filename, lineno, line)

    warnings.formatwarning = formatwarning


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
        cfg = settings(args, task.config, task.name)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        env = resolve_env()
        device = check_before_launch(cfg, env)
        _train(cfg, env, device, task, trainer or Trainer)
        return 0
    except BaseException as e:  # noqa: BLE001 - every way a run ends has its exit status and one message
        return _ending(e, cfg)


def _ending(error: BaseException, cfg: Config | None) -> int:
    """The exit status of a run that ended by ``error``, after saying why (once for the job where possible)."""
    debug = tracebacks_requested() or (cfg is not None and cfg.run.debug)
    if isinstance(error, Preempted):
        return PREEMPTED_EXIT_CODE
    if isinstance(error, KeyboardInterrupt):
        print("interrupted: stopped at once, without a new checkpoint (the earlier ones are kept); run the same "
              "command again to resume from the last one.", file=sys.stderr)
        return INTERRUPTED_EXIT_CODE
    if isinstance(error, SetupFailed):  # every rank raises it at once; rank 0 says it once for the job
        if probable_rank() == 0:
            print(error.report(), file=sys.stderr)
        record_for_torchrun(error, error.traceback_text or None)
        return error.exit_code
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        error = DiskFull(f"The disk is full ({error.strerror}: {error.filename or 'a file of the run'}). Files are "
                         "written whole or not at all, so nothing saved before is lost: free space or give another "
                         "run.dir, then run the same command again to resume.")
    codes: list[tuple[type[BaseException], int]] = [(UserError, USAGE_EXIT_CODE), (CollectiveError, COLLECTIVE_EXIT_CODE),
                                                     (Diverged, DIVERGED_EXIT_CODE)]
    code = next((code for kind, code in codes if isinstance(error, kind)), None)
    if code is None:
        if isinstance(error, SystemExit):
            raise error
        if debug:  # run.debug / DISTLAUNCH_TRACEBACK: the whole story
            traceback.print_exception(error, file=sys.stderr)
        else:
            report_bug(error)
        return 1
    report_error(error, debug)
    record_for_torchrun(error)
    return code
