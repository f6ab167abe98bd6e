"""``python -m launcher <command>``: submit runs, and tools around them.

    python -m launcher submit [flags] -m MODULE [--config FILE] [key=value ...]   submit training to SLURM
    python -m launcher report RUN_DIR [RUN_DIR ...] [--out PNG]   plot and summarise runs
    python -m launcher keys [module:ConfigClass]                  the configuration keys as a markdown table
    python -m launcher export RUN_DIR [--step N] [--out PATH]     a checkpoint's weights as a plain model.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

from launcher.errors import USAGE_EXIT_CODE, UserError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launcher", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="command")
    from launcher.submit import add_parser as add_submit

    add_submit(commands)
    report = commands.add_parser("report", help="plot training loss, evaluation metrics, learning rate and "
                                 "throughput of runs, and print a summary table")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    report.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/report.png for one "
                        "run, ./report.png for several)")
    keys = commands.add_parser("keys", help="the configuration keys of a schema as a markdown table")
    keys.add_argument("schema", nargs="?", default=None, help="module:Class, e.g. trainers.cifar:CifarConfig "
                      "(default: the keys every task has)")
    exporting = commands.add_parser("export", help="write the weights of a checkpoint (single-file or sharded, "
                                    "written at any world size) as a plain state dict that model.load_state_dict "
                                    "takes")
    exporting.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    exporting.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    exporting.add_argument("--out", type=Path, default=None, help="file to write (default: RUN_DIR/model-step-N.pt)")
    args = parser.parse_args(argv)
    try:
        if args.command == "submit":
            from launcher.submit import submit

            return submit(args)
        if args.command == "export":
            from launcher.export import export

            export(args.run_dir, args.step, args.out)
        elif args.command == "report":
            from launcher.report import report as make_report

            make_report(args.runs, args.out)
        else:
            from launcher.keytable import main as keytable

            keytable([args.schema] if args.schema else [])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return USAGE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
