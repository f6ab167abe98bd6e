"""The structure docs/architecture.md promises, checked on the source (no imports, no torch): imports run only
down the layers, no module imports itself around a circle, and no class in trainers/ grows past 250 lines."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("launcher", "trainers")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text()) for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def _imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """Project modules that ``name`` imports anywhere (module level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule when there is one, else a name of pkg
            targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                       for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, tree, known) for name, tree in modules.items()}


def test_the_launcher_never_imports_the_trainers() -> None:
    upward = {(m, t) for m, targets in _graph().items() if m.startswith("launcher") for t in targets
              if t.startswith("trainers")}
    assert not upward, f"launcher modules import trainer code: {sorted(upward)}"


def test_no_import_circle() -> None:
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            raise AssertionError("import circle: " + " -> ".join(cycle))


def test_no_class_in_the_trainers_runs_over_250_lines() -> None:
    long = [f"{p.relative_to(REPO)}:{n.name} ({n.end_lineno - n.lineno + 1} lines)"  # type: ignore[operator]
            for p in (REPO / "trainers").rglob("*.py") for n in ast.walk(ast.parse(p.read_text()))
            if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > 250]  # type: ignore[operator]
    assert not long, f"split these: {long}"
