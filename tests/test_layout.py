"""The package layout (README, "Architecture"): no import cycles, the deprecated flat paths, package data."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib

import memedit

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"memedit": ROOT / "memedit", "memedit_cli": ROOT / "cli"}


def modules() -> dict[str, Path]:
    """Every module of memedit and memedit_cli: dotted name -> file."""
    out = {}
    for top, folder in PACKAGES.items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([top, *parts])] = f
    return out


def module_level_imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The modules ``name`` imports when it is imported (not inside functions, not under ``if TYPE_CHECKING``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try, ast.With)):
                visit(getattr(node, "body", []) + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                      + [s for h in getattr(node, "handlers", []) for s in h.body])
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{a.name}" for a in node.names)  # `from pkg import module`

    visit(ast.parse(path.read_text()).body)
    return {m for m in found if m in known and m != name}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle in ``graph`` (as the list of modules around it), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := dfs(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := dfs(m)):
            return found
    return None


def test_no_module_level_import_cycles():
    known = modules()
    graph = {m: module_level_imports(m, f, known) for m, f in known.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 50  # the walk saw the code
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_command_modules_do_not_import_the_app_module():
    known = modules()
    for m, f in known.items():
        if m.startswith("memedit_cli.") and m not in ("memedit_cli.app", "memedit_cli.__main__"):
            assert "memedit_cli.app" not in module_level_imports(m, f, known), m


def test_the_library_does_not_import_the_cli():
    for m, f in modules().items():
        if m == "memedit" or m.startswith("memedit."):
            tree = ast.parse(f.read_text())
            names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
            names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
            assert not [n for n in names if n.startswith(("memedit_cli", "typer", "rich"))], m


@pytest.mark.parametrize("old", sorted(memedit.MOVED))
def test_old_flat_paths_import_the_moved_module(old):
    new = importlib.import_module(memedit.new_name(f"memedit.{old}"))
    sys.modules.pop(f"memedit.{old}", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = importlib.import_module(f"memedit.{old}")
    assert alias is new
    assert any(issubclass(w.category, DeprecationWarning) and f"memedit.{old} moved to" in str(w.message)
               for w in caught)
    assert new.__spec__.name == new.__name__  # the real module keeps its own spec


def test_old_nested_path_is_the_same_module():
    from memedit.storage.importers import lingua

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from memedit.importers import lingua as old
    assert old is lingua


def test_memedit_trace_stays_the_function():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import memedit.trace  # noqa: F401  (the deprecated module path)
        from memedit.trace import Trace
    from memedit.tracing.trace import Trace as T

    assert Trace is T
    assert callable(memedit.trace) and memedit.trace.__module__ == "memedit"


def test_python_dash_m_old_path_runs_the_moved_module():
    r = subprocess.run([sys.executable, "-m", "memedit.audit", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Audit how the memory is used" in r.stdout


def test_every_package_is_installed_with_its_data():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    on_disk = {m for m, f in modules().items() if f.name == "__init__.py"}
    assert on_disk <= listed, sorted(on_disk - listed)
    from memedit.auditing.report import SITE
    from memedit.storage.checkpoint import BUNDLED

    assert (SITE / "index.html").is_file() and (BUNDLED / "config.json").is_file()
    assert set(cfg["package-data"]) == {"memedit.data.demo", "memedit.auditing.report_site"}


def test_cited_files_are_in_the_repository():
    """Docstrings and comments cite files of this repository (docs/, memedit/...), and those files exist."""
    import re

    # (memedit/edits.js and the like are files of a model folder's memedit/ state, not of this repository)
    cited = re.compile(r"\b(docs/[\w/.-]+\.md|(?:memedit|cli|tests|benchmarks|examples)/[\w/.-]+\.py)\b")
    missing = []
    for m, f in modules().items():
        text = f.read_text()
        assert "shared/" not in text.replace("#shared/", ""), f"{m} cites a document outside the repository"
        missing += [f"{m}: {p}" for p in cited.findall(text) if not (ROOT / p).exists()]
    assert not missing, missing
