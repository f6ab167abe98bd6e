"""Markdown tables of configuration keys, generated from the schemas so that the README cannot drift.

    python -m launcher.keytable                                # the common keys (trainers.core.config:Config)
    python -m launcher.keytable my_package.task:MyConfig       # what a task adds or changes

A test compares the README's tables with this output.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Sequence

from launcher.config import leaves, yaml_scalar

#: The schema of the keys every task has. Named by string, as tasks are: the launcher imports no trainer code.
COMMON = "trainers.core.config:Config"


def _cell(value: Any) -> str:
    shown = yaml_scalar(value)
    if isinstance(shown, str):
        shown = shown.encode("unicode_escape").decode()  # a newline as \n: one table row stays one line
    return "(empty)" if value == "" else f"`{shown}`"


def key_table(schema: type, base: type | None = None) -> str:
    """One row per key of ``schema``; with ``base``, only the keys it adds or whose default it changes."""
    inherited = {leaf.key: leaf.default for leaf in leaves(base)} if base is not None else {}
    rows = ["| key | default | meaning |", "| --- | --- | --- |"]
    for leaf in leaves(schema):
        if leaf.key in inherited and inherited[leaf.key] == leaf.default:
            continue
        rows.append(f"| `{leaf.key}` | {_cell(leaf.default)} | {leaf.doc} |")
    return "\n".join(rows)


def _schema(spec: str) -> type:
    module, _, name = spec.partition(":")
    schema: type = getattr(importlib.import_module(module), name)
    return schema


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    common = _schema(COMMON)
    print(key_table(_schema(args[0]), common) if args else key_table(common))
    return 0


if __name__ == "__main__":
    sys.exit(main())
