"""The import rules of defang's layers, checked on the source (AST: nothing is imported).

ARCHITECTURE.md explains the layers; ``RULES`` is their executable form: for each unit
(a package or module prefix), the other units it may import.  ``check`` reads a source
tree and returns one line per breach:

- an import of a unit the rules do not allow (a wrong-way arrow);
- an import circle among modules, counting the imports inside functions too: a
  function-level import is fine for what it is for (loading code only when it is used,
  as the CLI does for each command and the part actions for the rewriting code), never to
  dodge a circle that the same import at the top would make;
- an import of another module's private name (``from x import _y``);
- the old top-level name ``workers`` (it installs as ``defang.workers``).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

#: where each package's files are, relative to the repository (package-dir in pyproject)
SOURCES = {"defang": "defang", "defang.workers": "workers"}

CORE = "defang.core"
ENGINES = {"defang.workers.mime", "defang.workers.stores", "defang.workers.checks"}
API = "defang.workers.api"
WORKER = "defang.workers"
DAEMONS = {"defang.frontend", "defang.multiplexor", "defang.supervisor"}

#: unit -> the units it may import besides itself (the longest matching prefix is a
#: module's unit)
RULES: dict[str, set[str]] = {
    CORE: set(),
    **{engine: {CORE} for engine in ENGINES},
    API: {CORE, *ENGINES},
    WORKER: {CORE, *ENGINES, API},
    **{daemon: {CORE} for daemon in DAEMONS},
    "defang.cli": {CORE, *ENGINES, API, WORKER, *DAEMONS},
    "defang.testbed": set(),
    "defang": {CORE, "defang.cli"},  # the public namespace (lazily more: see defang._LAZY)
}


@dataclass(frozen=True)
class Import:
    importer: str
    target: str  # the module of ours imported
    line: int
    in_function: bool
    private_name: str | None = None


def unit_of(module: str) -> str:
    best = ""
    for unit in RULES:
        if (module == unit or module.startswith(unit + ".")) and len(unit) > len(best):
            best = unit
    return best


def modules(repo: Path) -> dict[str, Path]:
    """Module name -> file, for every .py file of our packages."""
    found: dict[str, Path] = {}
    for package, folder in SOURCES.items():
        root = repo / folder
        for path in sorted(root.rglob("*.py")):
            if package == "defang" and path.relative_to(root).parts[0] == "workers":
                continue
            rel = path.relative_to(root).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _imports(module: str, path: Path, known: dict[str, Path], errors: list[str]) -> list[Import]:
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import):
                for alias in child.names:
                    _record(alias.name, None, child.lineno, nested)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (child.level - 1)]
                    base = ".".join([*anchor, base] if base else anchor)
                for alias in child.names:
                    _record(base, alias.name, child.lineno, nested)
            visit(child, nested)

    def _record(base: str, name: str | None, line: int, in_function: bool) -> None:
        if base == "workers" or base.startswith("workers."):
            errors.append(f"{path}:{line}: imports {base!r}: the worker side is defang.workers")
            return
        if base != "defang" and not base.startswith("defang."):
            return
        if name is not None and f"{base}.{name}" in known:
            out.append(Import(module, f"{base}.{name}", line, in_function))
        elif base in known:
            private = name if name and name.startswith("_") else None
            out.append(Import(module, base, line, in_function, private))

    visit(tree, False)
    return out


def check(repo: Path) -> list[str]:
    """Every breach of the rules in the tree at ``repo``; [] when there is none."""
    known = modules(repo)
    errors: list[str] = []
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, path in known.items():
        for imp in _imports(module, path, known, errors):
            where = f"{path}:{imp.line}"
            mine, theirs = unit_of(module), unit_of(imp.target)
            if theirs != mine and theirs not in RULES[mine]:
                errors.append(f"{where}: {module} ({mine}) imports {imp.target} ({theirs}): "
                              "a wrong-way arrow")
            if imp.target == "defang":
                errors.append(f"{where}: {module} imports the public namespace 'defang': import the module")
            if imp.private_name:
                errors.append(f"{where}: {module} imports the private name {imp.private_name} of "
                              f"{imp.target}")
            if imp.target != module:
                graph[module].add(imp.target)
    errors += [f"import circle: {' -> '.join(c)}" for c in circles(graph)]
    return errors


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path for each circle found (depth-first, each module explored once)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                found.append([*path[path.index(nxt):], nxt])
            elif nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found
