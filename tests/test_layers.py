"""Who may import whom (DESIGN.md): the library never imports Prefect or the Prefect layers."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


LIBRARY = [p for p in sorted((ROOT / "cogpipe").rglob("*.py")) if p.name != "cli.py"]


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: p.name)
def test_library_is_plain_python(path):
    bad = imported_modules(path) & {"prefect", "cogpipe_tasks", "cogpipe_flows"}
    assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("path", sorted((ROOT / "tasks").glob("*.py")), ids=lambda p: p.name)
def test_tasks_do_not_import_flows(path):
    assert "cogpipe_flows" not in imported_modules(path)


def test_cli_imports_prefect_lazily():
    """The CLI is the application's entry: `run` and `demo` import the flow inside the command."""
    tree = ast.parse((ROOT / "cogpipe" / "cli.py").read_text())
    top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
    top |= {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in top if m and m.split(".")[0] in {"prefect", "cogpipe_flows"}}
