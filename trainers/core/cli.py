"""The command line of a task: ``--config FILE``, ``--print-config``, ``key=value`` overrides, a ``--help`` that
lists every configuration key (generated from the task's schema), and how errors reach the terminal.

Light on purpose (no torch): a task module calls ``begin_main`` before its heavy imports, so that ``--help``,
``--print-config`` and every configuration error answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

from launcher.config import leaves, load_config, replace, yaml_scalar
from launcher.env import DistEnv, LaunchError, elastic_error_file, probable_rank, resolve_env, tracebacks_requested
from launcher.errors import USAGE_EXIT_CODE, UserError
from launcher.signals import stop_during_startup
from trainers.core.config import Config, micro_batch_size
from trainers.core.rundir import default_run_dir

#: The toolkit's own code: frames there are dropped from the top of a traceback of the user's code.
_TOOLKIT = (str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[2] / "launcher"))


def _plain(doc: str) -> str:
    """A key's documentation without markdown (backticks, **bold**), as a terminal shows it."""
    return re.sub(r"\*\*(.+?)\*\*", r"\1", doc).replace("`", "")


def _type_name(kind: Any) -> str:
    """The kind of value a user types (``int``, ``float``, ``str``, ``bool``, ``list``), never an internal class
    name: an enum of words (``Precision``) is a ``str``, a tuple a ``list``, ``bool | str`` a switch with ``auto``."""
    if isinstance(kind, type):
        return "str" if issubclass(kind, str) else kind.__name__
    text = str(kind)
    return "list" if "tuple" in text else "bool or auto" if "bool" in text else text


def keys_help(schema: type[Config]) -> str:
    """Every configuration key with its type, default and documentation."""
    lines = ["configuration keys (key=value):"]
    for leaf in leaves(schema):
        default = yaml_scalar(leaf.default)
        default = default.encode("unicode_escape").decode() if isinstance(default, str) else default
        lines.append(f"  {leaf.key} ({_type_name(leaf.type)}, default {'(empty)' if default == '' else default}): "
                     f"{_plain(leaf.doc)}")
    return "\n".join(lines)


def make_parser(prog: str, schema: type[Config] = Config) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Train; settings come from --config and key=value overrides (see README).",
        epilog=keys_help(schema), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=None, help="YAML file with settings (configs/*.yaml)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. train.epochs=3 optim.lr=0.05")
    return parser


def parse_args(argv: Sequence[str] | None, prog: str, schema: type[Config] = Config) -> argparse.Namespace:
    return make_parser(prog, schema).parse_args(argv)


def settings(args: argparse.Namespace, schema: type[Config], task_name: str) -> Config:
    """The validated config of a command, with ``run.dir`` filled in (the default run directory is a function of
    the settings, so that re-running the command resumes its run)."""
    cfg = load_config(args.config, args.overrides, schema=schema)
    return replace(cfg, run={"dir": cfg.run.dir or str(default_run_dir(cfg, task_name))})


def check_launch(cfg: Config, env: DistEnv) -> None:
    """The settings against the launch (no torch needed): the global batch must divide over the ranks and
    accumulation steps, and run.debug is for one process."""
    micro_batch_size(cfg.train.batch_size, env.world_size, cfg.train.grad_accum)
    if cfg.run.debug and env.world_size > 1:
        raise LaunchError(f"run.debug=true runs one process (breakpoints, pdb), but this launch has {env.world_size} "
                          f"ranks ({env.launcher}); start it with plain python, or drop run.debug.")


def begin_main(schema: type[Config], prog: str, name: str, argv: Sequence[str] | None = None) -> None:
    """The first thing a task module does when run as a program, before importing torch: a stop signal during
    the start-up that follows now ends the process with the "requeue me" exit status, and ``--help`` and any
    error in the settings are answered at once (exit 0, or 2 with the message). The few checks that need torch
    (a torchvision model name) run once it is loaded; so does ``--print-config``, which shows what would run."""
    stop_during_startup()
    args = make_parser(prog, schema).parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        check_launch(settings(args, schema, name), resolve_env())
    except UserError as e:
        report_error(e, debug=tracebacks_requested())
        record_for_torchrun(e)
        sys.exit(USAGE_EXIT_CODE)


def user_traceback(error: BaseException) -> str:
    """The traceback of ``error`` from the first frame outside the toolkit (the user's task code) on: the
    toolkit's own frames above it (run_task, the trainer) say nothing about the bug. All frames when the error
    comes from the toolkit itself."""
    te = traceback.TracebackException.from_exception(error)
    first = next((i for i, frame in enumerate(te.stack) if not frame.filename.startswith(_TOOLKIT)), 0)
    te.stack = traceback.StackSummary.from_list(list(te.stack)[first:])
    return "".join(te.format())


def report_error(error: BaseException, debug: bool = False) -> None:
    """One message per error: rank 0 reports what every rank meets; other ranks say who they are."""
    rank = probable_rank()
    if rank != 0 and getattr(error, "same_on_every_rank", False) and not debug:
        _let_rank0_report()
        return
    prefix = f"rank {rank}: " if rank else ""
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    print(f"{prefix}error: {error}", file=sys.stderr)


def _let_rank0_report(seconds: float = 3.0) -> None:
    """Under torchrun, a rank other than 0 that meets an error every rank meets leaves the report to rank 0 and
    waits (at most ``seconds``) until rank 0 has recorded it: torchrun stops every worker as soon as one exits,
    which could otherwise cut rank 0 short of saying why. Only rank 0's own node can see its error file."""
    mine = elastic_error_file()
    if not mine or os.environ.get("GROUP_RANK", "0") != "0":
        return
    path = Path(mine)  # .../attempt_<n>/<local rank>/error.json
    theirs = path.parent.parent / "0" / path.name
    deadline = time.monotonic() + seconds
    while not theirs.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def report_bug(error: BaseException) -> None:
    """An unexpected error (a bug, most often in the task's code). Under torchrun the traceback goes to its error
    file, and its failure summary prints it: rank 0's in full (a bug usually strikes every rank alike), the
    others' as their last frame only; each rank prints one line. Elsewhere the traceback is printed, trimmed to
    the user's frames."""
    rank = probable_rank()
    text = user_traceback(error)
    if record_for_torchrun(error, text if rank == 0 else _last_frame(error)):
        print(f"{f'rank {rank}: ' if rank else ''}error: {type(error).__name__}: {error} (the traceback is in "
              "torchrun's failure summary)", file=sys.stderr)
    else:
        print(text, end="", file=sys.stderr)


def _last_frame(error: BaseException) -> str:
    """Where ``error`` was raised and what it is, in three lines."""
    frames = traceback.extract_tb(error.__traceback__)
    where = "".join(traceback.format_list(frames[-1:]))
    return f"{where}{type(error).__name__}: {error}\n"


def record_for_torchrun(error: BaseException, callstack: str | None = None) -> bool:
    """Write torchrun's error file, so that its failure summary names this error as the root cause instead of
    "error_file: <N/A>" (the format is torch.distributed.elastic's error record); False outside torchrun."""
    path = elastic_error_file()
    if not path:
        return False
    text = f"{getattr(error, 'kind', type(error).__name__)}: {error}"  # SetupFailed: the failing rank's type
    record = {"message": {"message": text, "extraInfo": {"py_callstack": callstack or text,
                                                         "timestamp": str(int(time.time()))}}}
    Path(path).write_text(json.dumps(record))
    return True
