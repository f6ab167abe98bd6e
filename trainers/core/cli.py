"""The command line of a task: ``--config FILE``, ``--print-config``, ``key=value`` overrides, and a
``--help`` that lists every configuration key, generated from the task's schema.

Light on purpose (no torch): a task module calls ``begin_main`` before its heavy imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from launcher.config import leaves, yaml_scalar
from trainers.core.config import Config
from launcher.signals import stop_during_startup


def keys_help(schema: type[Config]) -> str:
    """Every configuration key with its type, default and documentation."""
    lines = ["configuration keys (key=value):"]
    for leaf in leaves(schema):
        kind = getattr(leaf.type, "__name__", str(leaf.type))
        default = yaml_scalar(leaf.default)
        lines.append(f"  {leaf.key} ({kind}, default {'(empty)' if default == '' else default}): "
                     f"{leaf.doc.replace('`', '')}")
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


def begin_main(schema: type[Config], prog: str, argv: Sequence[str] | None = None) -> None:
    """The first thing a task module does when run as a program, before importing torch: a stop signal
    during the start-up that follows (imports, process group, data) now ends the process with the
    "requeue me" exit status, and ``--help`` is answered at once."""
    stop_during_startup()
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        make_parser(prog, schema).print_help()
        sys.exit(0)
