"""The layers hold: `ml/` (the torch library) imports neither `app/` nor `worker/`; `app/` never imports
`worker/` (its process entry points); `app/kit` imports no domain; no module imports another that
imports it back, even from inside a function; and the API process never imports torch."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("app", "ml", "worker")
KIT_MAY_IMPORT = ("app.kit", "app.settings", "ml.errors", "ml.data.text")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _runtime_imports(tree: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """Every import that can run (module level or inside functions), minus `if TYPE_CHECKING:` blocks."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node):
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)
        else:
            yield from _runtime_imports(node, module, is_package)


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        targets = set(_runtime_imports(tree, name, path.name == "__init__.py"))
        # A module's own parent packages are imported with it anyway: not an edge.
        graph[name] = {t for t in targets if t in modules and t != name and not name.startswith(t + ".")}
    return graph


GRAPH = _graph()


def _violations(source_prefix: str, allowed: tuple[str, ...], forbidden: tuple[str, ...]) -> list[str]:
    return [f"{src} imports {dst}" for src, dsts in sorted(GRAPH.items()) if src.startswith(source_prefix)
            for dst in sorted(dsts) if dst.startswith(forbidden) and not dst.startswith(allowed)]


def test_ml_imports_neither_the_app_nor_the_workers() -> None:
    assert _violations("ml", (), ("app", "worker")) == []


def test_app_never_imports_worker_entry_points() -> None:
    assert _violations("app", (), ("worker",)) == []


def test_kit_imports_no_domain() -> None:
    assert _violations("app.kit", KIT_MAY_IMPORT, ("app", "ml")) == []


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles() -> None:
    assert _cycles(GRAPH) == []


def test_the_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("statement", [
    "import app.main; app.main.create_app()",
    "import app.cli; import app.cli_user; import app.server",
])
def test_the_api_process_never_imports_torch(statement: str) -> None:
    code = f"import sys; {statement}; sys.exit(3 if 'torch' in sys.modules else 0)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: torch was imported\n{proc.stderr[-2000:]}"


# Job and export statuses ("error" is also an event level and a JSON key, so file statuses are not
# checked here; `app.files.status.FileStatus` owns them all the same).
STATUS_WORDS = {"validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled", "building",
                "ready"}
STATUS_MODULES = {"app.jobs.state"}


def _status_literals(path: Path) -> list[str]:
    """String constants that are a status word, outside docstrings and log/event messages (whole
    constants only: "Job failed: ..." is prose, "failed" is a status)."""
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [f"{path.relative_to(ROOT)}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
            if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in STATUS_WORDS
            and id(n) not in docstrings]


def test_status_strings_live_only_in_the_state_modules() -> None:
    found = [hit for name, path in _modules().items() if name.startswith("app") and name not in STATUS_MODULES
             for hit in _status_literals(path)]
    assert found == []
