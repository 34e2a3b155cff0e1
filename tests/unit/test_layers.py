"""The package layering, read from the source (ast): who may import whom, and function size.

dump/ and restore/ hold the jobs; they use the daemon's leaf modules
(errors, procutil, caller, imgdir, creds, fdpass, the store, the criu
runner, ...) and get the running daemon only through the runtime protocol
each job declares: never the service, the supervisor, the server or the API.
The API's routes depend on the Service protocol, not on the daemon's
implementation.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("daemon", "api", "dump", "restore")
# The running daemon: what the jobs and the routes must not import.
SERVICE = {
    "criud.daemon.service",
    "criud.daemon.core",
    "criud.daemon.supervisor",
    "criud.daemon.server",
    "criud.daemon.cli",
    "criud.daemon.fdsock",
}
MAX_FUNCTION_LINES = 60


def _modules() -> dict[str, Path]:
    return {
        f"criud.{pkg}.{p.stem}": p for pkg in PACKAGES for p in sorted((ROOT / pkg).glob("*.py"))
    }


def _imports(path: Path) -> set[str]:
    """criud modules path imports, anywhere in it (a deferred import counts too)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("criud."))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("criud."):
            mod = node.module or ""
            # "from criud.dump import fds" imports the module criud.dump.fds.
            subs = {f"{mod}.{a.name}" for a in node.names}
            out.update(subs & set(_modules()) or {mod})
    return out


GRAPH = {name: _imports(path) for name, path in _modules().items()}


def _reaches(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in GRAPH.get(todo.pop(), set()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_the_graph_was_read() -> None:
    assert "criud.restore.job" in GRAPH and "criud.daemon.errors" in GRAPH["criud.restore.job"]


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.split(".")[1] in ("dump", "restore")))
def test_jobs_use_only_the_daemons_leaf_modules(name: str) -> None:
    reached = _reaches(name)
    assert reached & SERVICE == set(), f"{name} reaches the service"
    assert not any(m.startswith("criud.api.") for m in reached), f"{name} reaches the API"


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("criud.dump.")))
def test_dump_does_not_depend_on_restore(name: str) -> None:
    assert not any(m.startswith("criud.restore.") for m in _reaches(name))


@pytest.mark.parametrize("name", sorted(n for n in GRAPH if n.startswith("criud.api.")))
def test_routes_depend_on_the_service_protocol_not_the_daemon(name: str) -> None:
    assert GRAPH[name] & SERVICE == set()


@pytest.mark.parametrize(
    "name", sorted(n for n in GRAPH if n.startswith("criud.daemon.") and n not in SERVICE)
)
def test_the_daemons_leaf_modules_stay_leaves(name: str) -> None:
    assert _reaches(name) & SERVICE == set()


def _long_functions() -> list[str]:
    out: list[str] = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    out.append(f"{name}.{node.name}: {length} lines")
    return out


def test_no_function_is_over_60_lines() -> None:
    assert _long_functions() == []
