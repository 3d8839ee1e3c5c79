"""The package layout (README, "Architecture"): the import graph, counting imports inside functions too, points one
way through the layers; the package data and every module install with the wheel; the CLI starts fast."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

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


def all_imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """Every import of ``name`` at any level: (imported module of memedit or memedit_cli, line, inside a function).
    ``from pkg import x`` counts as importing ``pkg.x`` when that is a module, else ``pkg``; ``if TYPE_CHECKING``
    blocks are skipped (they never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: list[tuple[str, int, bool]] = []

    def walk(node, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for s in child.orelse:
                    walk(s, in_function)
                continue
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, child.lineno, in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    up = package.split(".")[: len(package.split(".")) - (child.level - 1)]
                    base = ".".join(up + ([child.module] if child.module else []))
                for a in child.names:
                    out.append((f"{base}.{a.name}" if f"{base}.{a.name}" in known else base, child.lineno, in_function))
            walk(child, inside)

    walk(ast.parse(path.read_text()), False)
    return [(m, line, f) for m, line, f in out if m in known and m != name]


def import_graph(known: dict[str, Path], exempt: set[tuple[str, str]] = frozenset()) -> dict[str, set[str]]:
    """module -> the modules it imports, counting imports inside functions."""
    return {m: {t for t, _, _ in all_imports(m, f, known) if (m, t) not in exempt} for m, f in known.items()}


def largest_circle(graph: dict[str, set[str]]) -> list[str]:
    """The largest set of modules that all reach each other through imports (a strongly connected component)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    best: list[str] = []

    def visit(v: str) -> None:
        nonlocal best
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            best = max(best, sorted(comp), key=len)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return best


# Layers, lowest first (README, "Architecture"): a module may import its own layer or a lower one. The capabilities
# share a layer (they may use each other, without cycles). ``memedit`` itself is the package's facade (load, trace,
# edit), above the capabilities; the CLI is on top. ``limits`` holds the refusals every layer shares and imports
# only ``errors``; ``version`` is a constant.
LAYERS = [
    {"memedit.errors", "memedit.limits", "memedit.version"},
    {"memedit.lm"},
    {"memedit.storage"},
    {"memedit.tracing"},
    {"memedit.editing", "memedit.keyspace", "memedit.auditing", "memedit.world", "memedit.data"},
    {"memedit"},
    {"memedit_cli"},
]
EXEMPT_EDGES: set[tuple[str, str]] = set()  # (importer, imported) edges a cycle check may skip: none
# Imported inside functions on purpose: optional or slow-to-import dependencies (each with a reason comment).
LAZY = ("faiss", "matplotlib", "h5py", "sentencepiece", "tiktoken", "torch.distributed.checkpoint")


def layer(module: str) -> int:
    """The index in LAYERS of the group ``module`` belongs to (its longest matching package)."""
    best = None
    for n, group in enumerate(LAYERS):
        for g in group:
            if (module == g or module.startswith(g + ".")) and (best is None or len(g) > len(best[1])):
                best = (n, g)
    assert best is not None, f"{module} is in no layer: add its package to LAYERS"
    return best[0]


def test_no_module_level_import_cycles():
    known = modules()
    graph = {m: module_level_imports(m, f, known) for m, f in known.items()}
    assert len(graph) > 50 and sum(map(len, graph.values())) > 50  # the walk saw the code
    assert cycle(graph) is None, " -> ".join(cycle(graph))


def test_no_import_cycle_counting_imports_inside_functions():
    known = modules()
    graph = import_graph(known, EXEMPT_EDGES)
    assert cycle(graph) is None, " -> ".join(cycle(graph))
    assert len(largest_circle(graph)) == 1


def test_the_cycle_check_finds_a_cycle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    assert largest_circle({"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"e"}, "e": {"c"}}) == ["c", "d", "e"]


def test_the_walk_counts_imports_inside_functions(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("from .a import x\n\ndef g():\n    from .b import y\n    return lambda: __import__('c')\n\n"
                 "class C:\n    def h(self):\n        import p.b\n")
    known = {"p.m": f, "p.a": f, "p.b": f}
    assert sorted(all_imports("p.m", f, known)) == [("p.a", 1, False), ("p.b", 4, True), ("p.b", 9, True)]


def test_no_package_imports_one_above_it():
    known = modules()
    up = [f"{m}:{line} imports {t}" for m, f in known.items() for t, line, _ in all_imports(m, f, known)
          if layer(t) > layer(m)]
    assert not up, up
    # the check can fail: the layers are ordered as the README draws them
    assert layer("memedit.storage.store") < layer("memedit.tracing.trace") < layer("memedit.editing.patch")
    assert layer("memedit") > layer("memedit.editing.api") and layer("memedit_cli.app") > layer("memedit")


def test_lm_imports_only_errors():
    known = modules()
    for m, f in known.items():
        if m.startswith("memedit.lm"):
            outside = {t for t, _, _ in all_imports(m, f, known) if not t.startswith("memedit.lm")}
            assert outside <= {"memedit.errors", "memedit.limits"}, (m, outside)
    assert {t for t, _, _ in all_imports("memedit.limits", known["memedit.limits"], known)} <= {"memedit.errors"}


def function_level_imports(path: Path) -> list[tuple[ast.Import | ast.ImportFrom, str]]:
    """(import statement inside a function, the source line above it and its own) of a module."""
    text = path.read_text()
    lines = ["", *text.splitlines()]
    out = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    out.append((inner, lines[inner.lineno - 1] + "\n" + lines[inner.lineno]))
    return list({id(n): (n, t) for n, t in out}.values())  # a nested function's imports once


def test_imports_inside_functions_are_lazy_on_purpose():
    """In the library, an import inside a function is an optional or slow dependency with a reason comment; the
    package's facade (memedit/__init__.py) and the CLI import lazily for start-up time."""
    bad = []
    for m, f in modules().items():
        if not m.startswith("memedit."):
            continue
        for node, around in function_level_imports(f):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            lazy = not getattr(node, "level", 0) and all(any(n == z or n.startswith(z + ".") for z in LAZY)
                                                         for n in names)
            if not (lazy and "#" in around):
                bad.append(f"{f.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, bad


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


# ---- function size, the one patch format, the CLI's start-up and defaults, the installed wheel -----------------
LONG_OK: set[str] = set()  # files whose functions may run over 100 lines: none


def long_functions(limit: int = 100) -> list[str]:
    out = []
    for f in (ROOT / "memedit").rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit:
                out.append(f"{f.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    return out


def test_no_function_in_the_library_is_over_100_lines():
    assert long_functions(10), "the walk saw the functions"
    assert not [f for f in long_functions() if f.split(":")[0] not in LONG_OK], long_functions()


def test_one_patch_format_is_written():
    """The only patch format string is in storage/patch.py (the written one, and the one of memedit < 0.2's key
    patches that it still reads)."""
    where = {m for m, f in modules().items() if '"memedit-patch"' in f.read_text() or '"memedit-row-patch"' in
             f.read_text()}
    assert where == {"memedit.storage.patch"}
    from memedit.storage import patch

    assert patch.PATCH_FORMAT == "memedit-patch" and patch.LEGACY_KEY_FORMAT == "memedit-row-patch"


def test_help_is_fast_and_the_config_modules_do_not_import_torch():
    code = ("import sys, time; t = time.perf_counter(); import memedit_cli.app, memedit.keyspace.config; "
            "print(time.perf_counter() - t, 'torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    seconds, torch_loaded = r.stdout.split()
    assert r.returncode == 0 and torch_loaded == "False", r.stderr
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run([sys.executable, "-m", "memedit_cli", "--help"], capture_output=True, text=True, timeout=60)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    assert r.returncode == 0 and "keys" in r.stdout
    # CPU seconds of the child, not wall time (a busy machine stretches that): ~0.4 s; importing torch alone ~2.8 s
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    assert cpu < 1.5, cpu


def cli_defaults(fn) -> dict:
    """{parameter: default} of a typer command function (options declared in its signature)."""
    import inspect

    params = inspect.signature(fn).parameters.items()
    return {n: p.default for n, p in params if p.default is not inspect.Parameter.empty}


def default_mismatches(fn, config, names: dict[str, str] | None = None) -> list[str]:
    """CLI options of ``fn`` whose default differs from the config field of the same name (or ``names[option]``)."""
    from dataclasses import fields

    values = {f.name: getattr(config, f.name) for f in fields(config)}
    names = names or {}
    out = []
    for option, default in cli_defaults(fn).items():
        field = names.get(option, option)
        if field in values and default != values[field]:
            out.append(f"{fn.__name__} --{option.replace('_', '-')}: {default!r}, config {field} = {values[field]!r}")
    return out


def test_cli_defaults_are_read_from_the_config_classes():
    from memedit_cli import keys

    from memedit.keyspace.config import KEYS

    compared = set(cli_defaults(keys.adapt_cmd)) | set(cli_defaults(keys.route_cmd))
    assert {"steps", "batch_size", "lr", "margin", "eval_facts"} <= compared
    assert not default_mismatches(keys.adapt_cmd, KEYS) + default_mismatches(keys.route_cmd, KEYS)
    from memedit_cli import edit_cmd

    from memedit.editing.config import BACKGROUND_BATCH, BACKGROUND_MAX_BATCHES, FORGETTING_SAMPLE, EditConfig

    edit_opts = cli_defaults(edit_cmd.edit)
    assert {"adaptive", "protect", "optimizer", "ranking"} <= set(edit_opts)
    # an option whose default is None means "the config's" (the edit fills it in from EditConfig)
    assert not [m for m in default_mismatches(edit_cmd.edit, EditConfig()) if ": None, config" not in m]
    # options whose default is None mean "the config's": they must exist in the config under the same name
    assert {o for o, d in edit_opts.items() if d is None} >= {"top_t", "lr", "steps", "contrast", "max_collateral"}
    assert edit_opts["forgetting_sample"] == FORGETTING_SAMPLE
    bg_opts = cli_defaults(edit_cmd.background)
    assert (bg_opts["batch_size"], bg_opts["max_batches"]) == (BACKGROUND_BATCH, BACKGROUND_MAX_BATCHES)

    def wrong(steps: int = 21, lr: float = 0.3) -> None: ...

    assert default_mismatches(wrong, KEYS) == ["wrong --steps: 21, config steps = 20"]  # the check can fail


@pytest.mark.skipif(sys.platform != "linux", reason="builds the wheel with the local pip")
def test_the_wheel_installs_every_module(tmp_path):
    """Build the wheel (not the editable tree), install it into a folder, and import every module from there."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    r = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    [wheel] = wheels.glob("memedit-*.whl")
    r = subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    names = sorted(modules())
    code = ("import importlib, sys; import memedit, memedit_cli; "
            f"assert memedit.__file__.startswith({str(target)!r}), memedit.__file__; "
            f"[importlib.import_module(m) for m in {names!r} if m != 'memedit_cli.__main__']; "
            "from memedit.storage.checkpoint import BUNDLED; from memedit.auditing.report import SITE; "
            "assert (BUNDLED / 'config.json').is_file() and (SITE / 'index.html').is_file(); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**__import__("os").environ, "PYTHONPATH": str(target)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
