"""The test suite's own layout, read from the source (AST), never imported:

* no module under tests/ imports a test module (``tests.<folder>.test_*``) or a
  ``conftest.py``: what tests share lives in tests/support/ (or a folder's non-test
  helper module), fixtures in the nearest common ``conftest.py``;
* each fixture name is defined in one place, except the deliberate overrides listed
  below; no fixture is defined in a helper module (it would have to be imported);
* every test asserts something that can fail: an ``assert``, ``pytest.raises`` (or
  ``warns``/``fail``), a ``raise``, or a call of a helper under tests/ that does.
"""

from __future__ import annotations

import ast
import functools
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent

#: (fixture name, module that redefines it) -> why the override is deliberate
OVERRIDES = {
    ("dut", "tests/protocol/test_ide_km_device.py"):
        "IDE_KM alone: the device's DSM without a TDI (no TDISP responder attached)",
    ("machine", "tests/unit/test_link_fidelity.py"):
        "the link fidelity tests need Max_Payload_Size 512 on the platform's link",
    ("rig", "tests/unit/test_root_port.py"):
        "parametrised: each root-port test runs on the fast path and on real TLPs",
}

#: calls that assert by themselves (the attribute name of ``pytest.<name>``)
PYTEST_CHECKS = frozenset({"raises", "warns", "fail", "deprecated_call"})


@dataclass(frozen=True)
class Module:
    path: Path
    name: str                 # dotted, e.g. tests.unit.test_x
    tree: ast.Module

    @property
    def rel(self) -> str:
        return self.path.relative_to(ROOT).as_posix()

    @property
    def is_test(self) -> bool:
        return self.path.name.startswith("test_")

    @property
    def is_conftest(self) -> bool:
        return self.path.name == "conftest.py"


@functools.cache
def modules() -> list[Module]:
    out = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        out.append(Module(path, ".".join(parts), ast.parse(path.read_text(), str(path))))
    return out


def imported_modules(mod: Module) -> list[tuple[int, str]]:
    """(line, dotted name) of every module (or module member) *mod* imports, relative
    imports resolved."""
    package = mod.name.split(".")
    if mod.path.name != "__init__.py":
        package.pop()
    found = []
    for node in ast.walk(mod.tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{a.name}") for a in node.names]
    return found


def is_test_module_name(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "tests" and any(p.startswith("test_") for p in parts[1:])


def is_conftest_name(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "tests" and "conftest" in parts[1:]


def test_no_module_imports_a_test_module_or_a_conftest() -> None:
    bad = sorted({f"{mod.rel}:{line}: imports {name}"
                  for mod in modules() for line, name in imported_modules(mod)
                  if (is_test_module_name(name) or is_conftest_name(name))
                  and name.split(".")[:len(mod.name.split("."))] != mod.name.split(".")})
    assert bad == [], "\n".join(bad)


# -- fixtures -------------------------------------------------------------------------------------

def fixture_name(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    """The fixture name *fn* defines, or None if it is no fixture."""
    for dec in fn.decorator_list:
        call = dec if isinstance(dec, ast.Call) else None
        target = call.func if call else dec
        if ast.unparse(target) in ("pytest.fixture", "fixture"):
            for kw in call.keywords if call else []:
                if kw.arg == "name" and isinstance(kw.value, ast.Constant):
                    return str(kw.value.value)
            return fn.name
    return None


@functools.cache
def fixtures() -> dict[str, list[str]]:
    """Fixture name -> the modules (relative paths) defining it."""
    where: dict[str, list[str]] = defaultdict(list)
    for mod in modules():
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                name = fixture_name(node)
                if name is not None:
                    where[name].append(mod.rel)
    return where


def test_fixtures_live_in_conftest_or_test_modules() -> None:
    helpers = {m.rel for m in modules() if not (m.is_test or m.is_conftest)}
    bad = sorted(f"{path}: defines fixture {name}" for name, paths in fixtures().items()
                 for path in paths if path in helpers)
    assert bad == [], "\n".join(bad)


def test_each_fixture_is_defined_once_but_for_listed_overrides() -> None:
    bad = []
    for name, paths in sorted(fixtures().items()):
        base = [p for p in paths if (name, p) not in OVERRIDES]
        if len(base) > 1:
            bad.append(f"{name} is defined in {len(base)} places: {', '.join(base)}")
    # An override redefines, in a module, a conftest fixture that module would otherwise get.
    for name, path in OVERRIDES:
        base = [p for p in fixtures().get(name, []) if (name, p) not in OVERRIDES]
        if path not in fixtures().get(name, []) or len(base) != 1 \
                or not base[0].endswith("/conftest.py") \
                or not path.startswith(base[0].removesuffix("conftest.py")):
            bad.append(f"listed override {name} in {path} overrides no conftest fixture")
    assert bad == [], "\n".join(bad)


def test_no_fixture_is_imported() -> None:
    """A fixture is never imported from the module defining it (nor shadowed by an
    import, the ``noqa: F811`` way); pytest finds it in a conftest."""
    defined = {mod.name: {node.name for node in ast.walk(mod.tree)
                          if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                          and fixture_name(node) is not None}
               for mod in modules()}
    bad = sorted(f"{mod.rel}:{node.lineno}: imports fixture {node.module}.{a.name}"
                 for mod in modules() for node in ast.walk(mod.tree)
                 if isinstance(node, ast.ImportFrom) and node.module in defined
                 for a in node.names if a.name in defined[node.module])
    bad += [f"{mod.rel}:{n}: {line.strip()}" for mod in modules()
            for n, line in enumerate(mod.path.read_text().splitlines(), 1)
            if re.search(r"#\s*noqa\b.*\bF811\b", line)]
    assert bad == [], "\n".join(bad)


# -- every test asserts ---------------------------------------------------------------------------

def asserts_directly(fn: ast.AST) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Assert | ast.Raise):
            return True
        if isinstance(node, ast.Attribute) and node.attr in PYTEST_CHECKS \
                and isinstance(node.value, ast.Name) and node.value.id == "pytest":
            return True
    return False


def called_names(fn: ast.AST) -> set[str]:
    out = set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name):
                out.add(node.func.id)
            elif isinstance(node.func, ast.Attribute):
                out.add(node.func.attr)
    return out


def asserting_helpers(mods: list[Module]) -> set[str]:
    """Names of functions, methods and classes (their ``__init__``) under tests/ that
    assert, directly or through another such helper.  Calls are matched by name, so a name
    counts only if every helper of that name asserts."""
    defs: dict[str, list[ast.FunctionDef | ast.AsyncFunctionDef]] = defaultdict(list)
    for mod in mods:
        for node in ast.walk(mod.tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) \
                    and not node.name.startswith("__"):
                defs[node.name].append(node)
            elif isinstance(node, ast.ClassDef):
                defs[node.name].extend(n for n in node.body if isinstance(n, ast.FunctionDef)
                                       and n.name == "__init__")
    direct = {id(f) for fns in defs.values() for f in fns if asserts_directly(f)}
    calls = {id(f): called_names(f) for fns in defs.values() for f in fns}
    found: set[str] = set()
    while more := {name for name, fns in defs.items() if fns and name not in found
                   and all(id(f) in direct or calls[id(f)] & found for f in fns)}:
        found |= more
    return found


def test_every_test_asserts_something() -> None:
    mods = modules()
    helpers = asserting_helpers(mods)
    silent = sorted(f"{mod.rel}:{node.lineno}: {node.name}"
                    for mod in mods if mod.is_test for node in ast.walk(mod.tree)
                    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
                    and node.name.startswith("test_")
                    and not asserts_directly(node) and not called_names(node) & helpers)
    assert silent == [], "tests that assert nothing:\n" + "\n".join(silent)


def test_the_checks_see_what_they_look_for() -> None:
    """The scan finds a planted cross import, duplicate fixture and silent test."""
    planted = Module(TESTS / "unit" / "test_planted.py", "tests.unit.test_planted", ast.parse(
        "from tests.protocol.test_x import y\nfrom .test_z import w\n"
        "from tests.conftest import RunningServer\n"))
    names = [n for _, n in imported_modules(planted)]
    assert [n for n in names if is_test_module_name(n)] == [
        "tests.protocol.test_x", "tests.protocol.test_x.y", "tests.unit.test_z",
        "tests.unit.test_z.w"]
    assert [n for n in names if is_conftest_name(n)] == [
        "tests.conftest", "tests.conftest.RunningServer"]
    fn = ast.parse("@pytest.fixture(name='other')\ndef f(): pass\n").body[0]
    assert isinstance(fn, ast.FunctionDef) and fixture_name(fn) == "other"
    silent = ast.parse("def test_x():\n    f()\n").body[0]
    loud = ast.parse("def test_y():\n    with pytest.raises(E):\n        f()\n").body[0]
    assert not asserts_directly(silent) and asserts_directly(loud)
    helpers = Module(TESTS / "support" / "planted.py", "tests.support.planted", ast.parse(
        "def check(x):\n    assert x\n\ndef via():\n    check(1)\n\n"
        "class A:\n    def close(self):\n        assert self\n\n"
        "class B:\n    def close(self):\n        pass\n"))
    assert asserting_helpers([helpers]) == {"check", "via"}    # not close: B's does not
