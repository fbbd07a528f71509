"""The import graph: no cycle inside `cogpipe/`, every third-party import declared.

Static (ast), so it runs in well under a second and imports nothing heavy.

Every import statement counts for cycles: at module level (including inside `try`/`if`),
under `if TYPE_CHECKING:` and inside functions. Each says "this module depends on that
one". A type-only import is still a dependency a reader must follow (`evaluate` <->
`metrics` was such a circle). An import inside a function cannot meet a half-initialised
module, but a circle through one is a circle all the same: a lower layer (config's
validators, preflight, the workspace) that imports upward at call time ties every module
of the circle together, so none can be read, tested or changed on its own, and moving
the import to the top is one edit away from a real import-time failure. Lazy imports
stay allowed where they only defer a cost (torch, a stage module the CLI may not need);
they must point down the layers like any other import.

The one reach upward by name is the stage registry (`cogpipe.stages`): its specs import
`cogpipe.<stage>` with `importlib.import_module` at the first call, because the stage
modules read the registry (`stage_keys`, `upstream_results`). That is the documented
registry, not an import statement, and is not counted.
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


def _imports(tree: ast.Module):
    """Every import statement of a module: at module level, under TYPE_CHECKING and inside
    functions and classes."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node


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
        for node in _imports(ast.parse(path.read_text(), str(path))):
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


def test_import_graph_reads_relative_type_only_and_function_imports(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg import c\n"
    )
    (pkg / "c.py").write_text("import importlib\nimportlib.import_module('pkg.a')\n")
    graph = import_graph(pkg)
    edges = {name: deps for name, deps in graph.items() if deps}
    assert edges == {"pkg.a": {"pkg.sub", "pkg.sub.b"}, "pkg.sub.b": {"pkg.c"}}
    assert find_cycle(graph) is None
    (pkg / "c.py").write_text("import pkg.a\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (pkg / "c.py").write_text("class C:\n    def f(self):\n        from pkg import a\n")
    assert import_graph(pkg)["pkg.c"] == {"pkg.a"}  # an import inside a method counts
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]


def test_no_import_cycle_inside_cogpipe():
    graph = import_graph(ROOT / "cogpipe")
    assert "cogpipe.pipeline" in graph and graph["cogpipe.evaluate"]  # the walk saw them
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _named_imports(tree: ast.Module) -> list[int]:
    """Lines that import a `cogpipe.` module by a written name (`import_module("cogpipe.x")`,
    `import_module(f"cogpipe.{stage}")`, `__import__`): imports the graph does not see."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not node.args:
            continue
        func = node.func
        called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        first = node.args[0]
        if isinstance(first, ast.JoinedStr) and first.values:
            first = first.values[0]
        written = first.value if isinstance(first, ast.Constant) else None
        if called in ("import_module", "__import__") and str(written).startswith("cogpipe"):
            lines.append(node.lineno)
    return lines


def test_only_the_stage_registry_imports_cogpipe_modules_by_name():
    """A name in a string hides an edge from the cycle test; the stage registry is the one
    place allowed to (its module docstring says why)."""
    found = {}
    for path in sorted((ROOT / "cogpipe").rglob("*.py")):
        lines = _named_imports(ast.parse(path.read_text(), str(path)))
        if lines:
            found[str(path.relative_to(ROOT))] = lines
    assert list(found) == ["cogpipe/stages.py"], found


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


def test_config_imports_nothing_of_cogpipe():
    """The config is the bottom layer: every module reads it, so it reads none of them
    (short model names, `hub_id`, live in it; fingerprints are put in keys by the stages)."""
    graph = import_graph(ROOT / "cogpipe")
    assert graph["cogpipe.config"] == set()
