"""The TSM's command line imports what the chosen command needs, nothing more.

``teeio-tsm`` loads a command's module on dispatch; ``attest``'s options need neither SPDM,
cryptography nor the ELF reader; no command loads a device model.  Each case runs in a
fresh interpreter and reads back ``sys.modules``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from teeio.spdm import defs
from tsm import attest

ROOT = Path(__file__).resolve().parents[2]
COMMANDS = ("attest", "ide", "tdisp", "daemon", "ctl", "status")
HEAVY = ("teeio.spdm", "cryptography", "elftools")
#: Other roles, and the TSM modules of the daemon (control API, journal, GHCx server).
FOREIGN = ("vfio_user_dev", "guest_agent", "qemu_configs", "tsm.daemon", "tsm.control_api",
           "tsm.journal", "tsm.ghcx_server", "tsm.guest_api")


def modules_after(code: str) -> set[str]:
    """``sys.modules`` of a fresh interpreter after running *code* (SystemExit allowed)."""
    script = (f"import sys\ntry:\n    {code}\nexcept SystemExit:\n    pass\n"
              "sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert "MODULES " in proc.stderr, proc.stderr
    return set(proc.stderr.rsplit("MODULES ", 1)[1].split())


def cli(*argv: str) -> str:
    return f"from tsm.__main__ import main; main({list(argv)!r})"


def under(modules: set[str], prefixes: tuple[str, ...]) -> set[str]:
    return {m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes)}


def test_top_level_help_imports_no_command() -> None:
    loaded = modules_after(cli("--help"))
    assert "tsm.__main__" in loaded
    assert not under(loaded, tuple(f"tsm.{c}" for c in COMMANDS) + HEAVY + FOREIGN)


def test_attest_options_need_no_spdm_nor_cryptography() -> None:
    for argv in (("attest", "--help"), ("attest",)):     # help; a usage error
        loaded = modules_after(cli(*argv))
        assert "tsm.attest" in loaded, argv
        assert not under(loaded, HEAVY + FOREIGN + ("tsm.ctl", "tsm.ide", "tsm.tdisp")), argv


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "daemon"])
def test_a_command_loads_no_daemon_and_no_device(command: str) -> None:
    loaded = modules_after(cli(command, "--help"))
    module = "tsm.ctl" if command == "status" else f"tsm.{command}"
    assert module in loaded
    assert not under(loaded, FOREIGN)


def test_measurement_blocks_need_no_elf_reader() -> None:
    loaded = modules_after("import teeio.measurements, teeio.refcheck")
    assert "teeio.measurements" in loaded and not under(loaded, ("elftools",))


def test_the_nonce_size_of_the_options_is_spdms() -> None:
    assert attest.NONCE_SIZE == defs.NONCE_SIZE
