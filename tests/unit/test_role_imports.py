"""The roles import only :mod:`teeio` and the standard library, never each other.

The device server (``vfio_user_dev``), the host TSM (``tsm``) and the guest agent
(``guest_agent``) are separate programs on separate sides of the trust boundary: what
they share is the protocol cores and the transport in ``teeio``.  Every ``.py`` file of
each role is parsed (not imported) and each import -- ``import``, ``from ... import``,
relative imports resolved, ``importlib.import_module`` / ``__import__`` of a literal name,
in any block (``TYPE_CHECKING`` included) -- must name the standard library, ``teeio``,
the role itself, or a third-party package on the role's allow-list below.  ``teeio``
itself imports no role (nor any other package of the repository).
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("tsm", "vfio_user_dev", "guest_agent")
#: Packages of this repository that are not the shared library: none may be imported by
#: ``teeio``, and a role may import none but itself.
PROJECT_PACKAGES = frozenset(ROLES) | {"qemu_configs", "bench", "tests"}
#: Third-party distributions each package may use (top-level import names), as the code
#: uses them today.  A new one is a deliberate decision: add it here.
ALLOWED_THIRD_PARTY: dict[str, frozenset[str]] = {
    "tsm": frozenset({"cryptography"}),
    "vfio_user_dev": frozenset(),
    "guest_agent": frozenset(),
    # hypothesis: only inside teeio.codec's strategy builders, imported when a test asks
    # for a message strategy (never at import time; not a runtime dependency)
    "teeio": frozenset({"cryptography", "elftools", "hypothesis"}),
}


def _module_name(path: Path, root: Path) -> tuple[str, bool]:
    """The dotted module name of *path* under *root*, and whether it is a package
    (``__init__.py``)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def _resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name of ``from <level dots><name> import ...`` in *module*; ``""`` if
    it climbs above the top-level package."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        return ""
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def imports_of(path: Path, root: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in *path*; the name is ``""`` for a
    relative import that leaves its package and ``"<dynamic>"`` for a dynamic import
    whose target is not a literal."""
    module, is_package = _module_name(path, root)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, _resolve_relative(module, is_package, node.level,
                                                     node.module)
            else:
                yield node.lineno, node.module or ""
        elif isinstance(node, ast.Call):
            fn = node.func
            dynamic = ((isinstance(fn, ast.Name) and fn.id == "__import__")
                       or (isinstance(fn, ast.Attribute) and fn.attr == "import_module"
                           and isinstance(fn.value, ast.Name) and fn.value.id == "importlib"))
            if dynamic:
                arg = node.args[0] if node.args else None
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    yield node.lineno, arg.value
                else:
                    yield node.lineno, "<dynamic>"


def violations(package: str, root: Path = ROOT) -> list[str]:
    """``file:line: message`` for every import of *package* outside what it may use."""
    allowed = {"teeio", package} | ALLOWED_THIRD_PARTY.get(package, frozenset())
    out: list[str] = []
    for path in sorted((root / package).rglob("*.py")):
        where = path.relative_to(root)
        for line, name in sorted(imports_of(path, root)):
            top = name.split(".")[0]
            if name == "<dynamic>":
                why = "dynamic import of a computed name (cannot be checked)"
            elif not top:
                why = "relative import above the top-level package"
            elif top in allowed or top in sys.stdlib_module_names:
                continue
            elif top in ROLES:
                why = f"{package} imports another role"
            elif top in PROJECT_PACKAGES:
                why = f"{package} imports the repository's {top!r} package"
            else:
                why = f"third-party package not on {package}'s allow-list"
            out.append(f"{where}:{line}: {name or '(relative)'}: {why}")
    return out


@pytest.mark.parametrize("package", [*ROLES, "teeio"])
def test_package_imports_only_teeio_the_stdlib_and_its_allow_list(package: str) -> None:
    found = violations(package)
    assert not found, "\n".join(found)


def test_every_package_has_python_files() -> None:
    for package in (*ROLES, "teeio"):
        assert any((ROOT / package).rglob("*.py")), package


def test_the_checker_names_file_and_line(tmp_path: Path) -> None:
    pkg = tmp_path / "tsm" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "tsm" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("from .. import journal\nfrom ... import x\n")
    (pkg / "bad.py").write_text(
        "import os\n"
        "from teeio.ide import IdeKey\n"
        "from tsm.sub import other\n"
        "import cryptography.x509\n"
        "if True:\n"
        "    from vfio_user_dev.platform_ctl import PlatformControlServer\n"
        "import numpy\n"
        "import importlib\n"
        "importlib.import_module('guest_agent.doe')\n"
        "__import__(name)\n")
    found = violations("tsm", tmp_path)
    assert found == [
        "tsm/sub/__init__.py:2: (relative): relative import above the top-level package",
        "tsm/sub/bad.py:6: vfio_user_dev.platform_ctl: tsm imports another role",
        "tsm/sub/bad.py:7: numpy: third-party package not on tsm's allow-list",
        "tsm/sub/bad.py:9: guest_agent.doe: tsm imports another role",
        "tsm/sub/bad.py:10: <dynamic>: dynamic import of a computed name (cannot be checked)",
    ]
    assert violations("guest_agent", tmp_path) == []   # no such directory: nothing to flag
