"""The import graph: no cycle inside `cogpipe/`, every third-party import declared.

Static (ast), so it runs in well under a second and imports nothing heavy.

Which imports count for cycles: those a module runs when it is imported (module level,
including inside `try`/`if`) and those under `if TYPE_CHECKING:`. Both say "this module
depends on that one": a type-only import is still a dependency a reader must follow, and
`evaluate` <-> `metrics` was such a circle. Imports inside functions do not count: they
run when the function is called, after every module has loaded, so they can never meet a
half-initialised module, and they are how the orchestrating layer (`pipeline`, `disk`,
`partial`, `config`'s validators) reaches the stages and heavy libraries lazily; counting
them would forbid that layering rather than find a mistake.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIRST_PARTY = {"cogpipe", "tasks", "flows", "cogpipe_tasks", "cogpipe_flows"}


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(body: list[ast.stmt]):
    """Import statements run at import time or under TYPE_CHECKING, not inside functions."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                yield from _imports(getattr(node, field, None) or [])


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """Dotted names an import statement may load: `from a import b` is `a` or `a.b`."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        package = module.split(".") if is_package else module.split(".")[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join(package + ([base] if base else []))
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def import_graph(package: Path) -> dict[str, set[str]]:
    """{module: modules of `package` it imports}, parent packages included (importing
    `a.b.c` runs `a/__init__` and `a/b/__init__`), the root package itself left out."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in _imports(ast.parse(path.read_text(), str(path)).body):
            for target in _targets(node, name, path.name == "__init__.py"):
                while target:
                    found.add(target)
                    target = target.rpartition(".")[0]
        graph[name] = {t for t in found if t in files and t not in (name, package.name)}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None: an iterative depth-first search."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" once left
    for start in sorted(graph):
        if start in state:
            continue
        path, stack = [start], [iter(sorted(graph[start]))]
        state[start] = "open"
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = "done"
                stack.pop()
            elif state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            elif nxt not in state:
                state[nxt] = "open"
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_find_cycle_finds_one_and_only_one():
    """The search itself: a three-module ring is found, a diamond is not a cycle."""
    ring = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(ring) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_import_graph_reads_relative_type_only_and_skips_function_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
    )
    (pkg / "c.py").write_text("def f():\n    import pkg.a\n")
    graph = import_graph(pkg)
    edges = {name: deps for name, deps in graph.items() if deps}
    assert edges == {"pkg.a": {"pkg.sub", "pkg.sub.b"}, "pkg.sub.b": {"pkg.c"}}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_no_import_cycle_inside_cogpipe():
    graph = import_graph(ROOT / "cogpipe")
    assert "cogpipe.pipeline" in graph and graph["cogpipe.evaluate"]  # the walk saw them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _third_party(folders: list[Path]) -> dict[str, str]:
    """{top-level name: a file importing it} over every import, function level included."""
    found = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in FIRST_PARTY:
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def _declared() -> set[str]:
    """Normalised distribution names of pyproject's dependencies and optional ones."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        specs += extra
    return {_normalise(re.match(r"[A-Za-z0-9._-]+", spec).group()) for spec in specs}


def _normalise(distribution: str) -> str:
    return re.sub(r"[-_.]+", "-", distribution).lower()  # PEP 503


def test_every_third_party_import_is_declared():
    """`cogpipe/`, `tasks/` and `flows/` import only what pyproject.toml declares, so an
    install from it alone (the Docker image, a fresh venv) has every module they load."""
    distributions = importlib.metadata.packages_distributions()
    imported = _third_party([ROOT / "cogpipe", ROOT / "tasks", ROOT / "flows"])
    assert "torch" in imported and "pandas" in imported  # the walk saw them
    declared = _declared()
    missing = []
    for name, where in sorted(imported.items()):
        # An import name an installed distribution provides (cv2 -> opencv-python-headless);
        # one not installed here (bitsandbytes on a CPU host) by its own name.
        candidates = {_normalise(d) for d in distributions.get(name, [name])}
        if not candidates & declared:
            missing.append(f"{name} ({where}; distribution {', '.join(sorted(candidates))})")
    assert not missing, "imported but not declared in pyproject.toml: " + "; ".join(missing)
