"""The layout's rules, read off the imports: what may depend on what, and no cycles.

The design: `pm_common` (shared by both sides) imports neither `client` nor `server`; the hospital's
`client` and the coordinator's `server` never import each other; neither imports the researcher's
`simulations`, the `pmfl` CLI or `benchmarks`; and no module, counting imports inside functions,
depends on itself through others. docs/architecture.md draws the same packages: a package added or
removed without the picture changing fails here too.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pm_common", "client", "server", "simulations", "pmfl", "benchmarks")
FORBIDDEN = {
    "pm_common": {"client", "server", "simulations", "pmfl", "benchmarks"},
    "client": {"server", "simulations", "pmfl", "benchmarks"},
    "server": {"client", "simulations", "pmfl", "benchmarks"},
}


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _known(name: str) -> str | None:
    """The project module `name` denotes (a function imported from a module: that module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> Iterator[str]:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
                package = package[: len(package) - node.level + 1]
                base = ".".join(package + ([base] if base else []))
            names = [
                f"{base}.{alias.name}" if _known(f"{base}.{alias.name}") else base for alias in node.names
            ]
        else:
            continue
        for name in names:
            known = _known(name)
            if known and known != module:
                yield known


GRAPH = {module: set(_imports(module, path)) for module, path in MODULES.items()}


def test_dependencies_point_one_way() -> None:
    wrong = [
        f"{module} imports {dependency}"
        for module, dependencies in sorted(GRAPH.items())
        for dependency in sorted(dependencies)
        if dependency.split(".")[0] in FORBIDDEN.get(module.split(".")[0], set())
    ]
    assert not wrong, wrong


def _cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in GRAPH:
        if root in index:
            continue
        work = [(root, iter(sorted(GRAPH[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(GRAPH[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_the_cycle_finder_finds_a_planted_cycle(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The check above could pass by finding nothing at all: plant a cycle and see it found."""
    planted = {name: set(deps) for name, deps in GRAPH.items()}
    planted["pm_common.redaction"].add("pm_common.wire.keys")
    planted["pm_common.wire.keys"].add("pm_common.redaction")
    monkeypatch.setattr(__import__(__name__, fromlist=["GRAPH"]), "GRAPH", planted)
    assert ["pm_common.redaction", "pm_common.wire.keys"] in _cycles()


def test_the_architecture_picture_names_every_package() -> None:
    """docs/architecture.md names each package directory (as `dir/`), and names none that is gone."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"(?<![\w/.])((?:pm_common|client|server|simulations)(?:/\w+)*/)", text))
    packages = {
        str(path.parent.relative_to(ROOT)) + "/"
        for top in ("pm_common", "client", "server", "simulations")
        for path in (ROOT / top).rglob("__init__.py")
    }
    assert not packages - named, f"docs/architecture.md does not show {sorted(packages - named)}"
    gone = sorted(p for p in named if not (ROOT / p).is_dir())
    assert not gone, f"docs/architecture.md shows packages that do not exist: {gone}"
