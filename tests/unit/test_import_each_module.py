"""Every module imports alone, and the project's import graph has no cycle.

* Alone: each module of ``teeio``, ``vfio_user_dev``, ``tsm`` and ``guest_agent`` is
  imported in a process of its own in which no module of the project was ever loaded: a
  fresh interpreter (this file run as a script) loads only the standard library and the
  third-party modules the project imports, then forks one child per module, which checks
  that ``sys.modules`` holds nothing of the project and imports the module.  A module that
  works only when something else was imported first fails here.
* Statically: the graph of intra-project imports at module level (``if``/``try`` blocks
  and ``TYPE_CHECKING`` included; imports inside functions are deferred on purpose) is
  built from the AST and must have no cycle; a cycle is reported as ``a -> b -> a``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("teeio", "vfio_user_dev", "tsm", "guest_agent")
#: Every top-level package of the repository (never preloaded by the fork server).
PROJECT = frozenset(PACKAGES) | {"qemu_configs", "bench", "fuzz", "tests"}

#: Found in other owners' modules when this check was added, each to be fixed there; an
#: entry that no longer applies fails the test (remove it then), a new finding fails too.
KNOWN_CYCLES = frozenset({
    frozenset({"vfio_user_dev.nvme.admin", "vfio_user_dev.nvme.controller"}),
    frozenset({"vfio_user_dev.device", "vfio_user_dev.dma_engine"}),
})
#: module -> why it does not import alone (same rule as above).
KNOWN_IMPORT_FAILURES: dict[str, str] = {}


# -- modules and their module-level imports ---------------------------------------------------

def modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file of *packages* under *root*."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def _type_checking(test: ast.expr) -> bool:
    return ((isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _module_level(body: list[ast.stmt], typing_only: bool = False
                  ) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """(import, whether only for type checkers) of each import statement at module level:
    the body and its ``if``/``try``/``with`` blocks, not function or class bodies."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node, typing_only
        elif isinstance(node, ast.If):
            yield from _module_level(node.body, typing_only or _type_checking(node.test))
            yield from _module_level(node.orelse, typing_only)
        elif isinstance(node, ast.With | ast.AsyncWith | ast.For | ast.While):
            yield from _module_level(node.body, typing_only)
            yield from _module_level(getattr(node, "orelse", []), typing_only)
        elif isinstance(node, ast.Try | ast.TryStar):
            for block in (node.body, node.orelse, node.finalbody):
                yield from _module_level(block, typing_only)
            for handler in node.handlers:
                yield from _module_level(handler.body, typing_only)


def _absolute(module: str, is_package: bool, level: int, name: str | None) -> str:
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[:len(package) - (level - 1)] if level - 1 < len(package) else []
    return ".".join(base + ([name] if name else []))


#: module -> {imported project module: True if only under ``if TYPE_CHECKING``}
Graph = dict[str, dict[str, bool]]


def import_graph(mods: dict[str, Path]) -> Graph:
    """module -> the project modules its module-level imports name (``from a import b``
    names ``a.b`` when that is a module, else ``a``), each marked type-checking-only or
    not."""
    graph: Graph = {}

    def known(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    for mod, path in mods.items():
        is_package = path.name == "__init__.py"
        edges: dict[str, bool] = {}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node, typing_only in _module_level(tree.body):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = (_absolute(mod, is_package, node.level, node.module) if node.level
                        else node.module or "")
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base
                           for a in node.names]
            for target in map(known, targets):
                if target is not None and target != mod:
                    edges[target] = edges.get(target, True) and typing_only
        graph[mod] = edges
    return graph


def describe(graph: Graph, cycle: list[str]) -> str:
    """``a -> b -(TYPE_CHECKING)-> a``."""
    out = cycle[0]
    for v, w in zip(cycle, cycle[1:], strict=False):
        out += f" -(TYPE_CHECKING)-> {w}" if graph[v][w] else f" -> {w}"
    return out


def cycles(graph: Graph) -> list[list[str]]:
    """One cycle (``[a, b, ..., a]``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:        # Tarjan, iterative over each node's edges
        work = [(v, iter(sorted(graph.get(v, ()))))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                scc = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    scc.add(w)
                    if w == node:
                        break
                if len(scc) > 1:
                    found.append(_cycle_in(graph, scc))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _cycle_in(graph: Graph, scc: set[str]) -> list[str]:
    """A shortest cycle through the smallest-named module of *scc* (breadth-first)."""
    start = min(scc)
    parent: dict[str, str] = {}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v].keys() & scc):
            if w == start:
                path = [v]
                while path[-1] != start:
                    path.append(parent[path[-1]])
                return [*reversed(path), start]
            if w not in parent:
                parent[w] = v
                queue.append(w)
    raise AssertionError(f"no cycle in {sorted(scc)}")


# -- importing each module alone -------------------------------------------------------------

def _third_party(mods: dict[str, Path]) -> set[str]:
    """The non-project modules the project imports anywhere (preloaded by the server)."""
    names: set[str] = set()
    for path in mods.values():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names.add(node.module)
    return {n for n in names if n.split(".")[0] not in PROJECT}


def serve(root: Path, names: list[str], workers: int) -> dict[str, str]:
    """Fork server (run in a fresh interpreter): import each of *names* in a child of its
    own; returns module -> traceback for those that failed."""
    mods = modules(root)
    for name in sorted(_third_party(mods)):
        with contextlib.suppress(Exception):    # optional: the child meets it again
            importlib.import_module(name)
    assert not [m for m in sys.modules if m.split(".")[0] in PROJECT], "project preloaded"
    with tempfile.TemporaryDirectory(prefix="teeio-import-") as cache:
        # Compiled once, into a private cache (PYTHONDONTWRITEBYTECODE may be set).
        sys.pycache_prefix = cache
        sys.dont_write_bytecode = False
        for path in mods.values():
            src = str(path.resolve())
            py_compile.compile(src, cfile=importlib.util.cache_from_source(src), doraise=True)
        return _fork_each(names, workers)


def _fork_each(names: list[str], workers: int) -> dict[str, str]:
    failed: dict[str, str] = {}
    running: dict[int, tuple[str, int]] = {}

    def reap() -> None:
        pid, status = os.wait()
        name, fd = running.pop(pid)
        with os.fdopen(fd) as f:
            text = f.read()
        if status:
            failed[name] = text or f"exit status {status}"

    for name in names:
        while len(running) >= workers:
            reap()
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:                                       # the child
            os.close(rfd)
            code = 0
            try:
                loaded = [m for m in sys.modules if m.split(".")[0] in PROJECT]
                if loaded:
                    raise AssertionError(f"project modules already loaded: {loaded}")
                importlib.import_module(name)
            except BaseException:
                os.write(wfd, traceback.format_exc().encode())
                code = 1
            os._exit(code)
        os.close(wfd)
        running[pid] = (name, rfd)
    while running:
        reap()
    return failed


def import_alone(root: Path, names: list[str], workers: int = 0) -> dict[str, str]:
    """Run :func:`serve` in a fresh interpreter; module -> traceback of each failure."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, __file__, str(root), str(workers or max(2, os.cpu_count() or 2)),
         *names], capture_output=True, text=True, env=env, cwd=root, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, str] = json.loads(proc.stdout)
    return result


# -- the tests -------------------------------------------------------------------------------

def test_every_module_imports_alone() -> None:
    names = sorted(modules(ROOT))
    assert len(names) > 50 and "teeio.tdisp.responder" in names
    failed = import_alone(ROOT, names)
    new = {m: tb for m, tb in failed.items() if m not in KNOWN_IMPORT_FAILURES}
    assert not new, "\n\n".join(f"import {m} alone:\n{tb}" for m, tb in new.items())
    assert set(failed) == set(KNOWN_IMPORT_FAILURES), "fixed: remove from KNOWN_IMPORT_FAILURES"


def test_no_import_cycle() -> None:
    graph = import_graph(modules(ROOT))
    assert graph["vfio_user_dev.dsm"].keys() >= {"teeio.tdisp.responder", "teeio.ide_km"}
    found = {frozenset(c): describe(graph, c) for c in cycles(graph)}
    new = [text for members, text in found.items() if members not in KNOWN_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(new)
    assert found.keys() == KNOWN_CYCLES, "fixed: remove from KNOWN_CYCLES"


def _package(tmp: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp


def test_the_checks_catch_a_cycle_and_an_order_dependent_import(tmp_path: Path) -> None:
    root = _package(tmp_path, {
        "tsm/__init__.py": "",
        "tsm/a.py": "from tsm.b import B\nA = 1\n",
        "tsm/b.py": "from tsm import a\nB = a.A\n",            # needs a loaded first
        "tsm/c.py": "import typing\nif typing.TYPE_CHECKING:\n    from tsm.d import D\n",
        "tsm/d.py": "from . import c\nD = 1\n",
        "tsm/e.py": "def f() -> None:\n    from tsm import a\n",   # deferred: no edge
        "teeio/__init__.py": "", "vfio_user_dev/__init__.py": "",
        "guest_agent/__init__.py": "",
    })
    graph = import_graph(modules(root))
    assert graph["tsm.e"] == {} and graph["tsm.d"] == {"tsm.c": False}
    assert [describe(graph, c) for c in cycles(graph)] == [
        "tsm.a -> tsm.b -> tsm.a", "tsm.c -(TYPE_CHECKING)-> tsm.d -> tsm.c"]
    failed = import_alone(root, ["tsm.a", "tsm.b", "tsm.c", "tsm.e"], workers=2)
    assert set(failed) == {"tsm.a", "tsm.b"}
    assert "partially initialized module" in failed["tsm.b"]


if __name__ == "__main__":
    print(json.dumps(serve(Path(sys.argv[1]), sys.argv[3:], int(sys.argv[2]))))
