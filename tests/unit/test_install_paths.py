"""Where things go when the packages run from a checkout or installed: the default
firmware image (out/firmware/ in a checkout, the user's cache otherwise, built atomically),
the folder shared into the guest (only the guest's packages, keyed by content), and
``teeio-vm --qemu-arg``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from qemu_configs import launcher
from teeio import paths
from vfio_user_dev import dsm, firmware_build

ROOT = Path(__file__).resolve().parents[2]


def test_checkout_and_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert paths.checkout_root() == ROOT == paths.PACKAGES_DIR
    assert firmware_build.default_image() == ROOT / "out" / "firmware" / "teeio-fw.elf"
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "c"))
    assert paths.cache_root() == tmp_path / "c"
    monkeypatch.delenv("TEEIO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_root() == tmp_path / "xdg" / "teeio"


def test_atomic_path(tmp_path: Path) -> None:
    final = tmp_path / "d" / "f"
    with paths.atomic_path(final) as tmp:
        tmp.write_text("one")
        assert not final.exists()
    assert final.read_text() == "one"
    with pytest.raises(RuntimeError), paths.atomic_path(final) as tmp:
        tmp.write_text("two")
        raise RuntimeError
    assert final.read_text() == "one" and os.listdir(final.parent) == ["f"]


def test_installed_default_firmware_goes_to_the_cache(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setattr(paths, "checkout_root", lambda: None)
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "cache"))
    key = firmware_build.source_key()
    elf = tmp_path / "cache" / "firmware" / key / "teeio-fw.elf"
    assert firmware_build.default_image() == elf
    path, measurements = dsm.load_firmware(None)
    assert path == elf and len(measurements) == 5
    assert os.listdir(elf.parent) == ["teeio-fw.elf"]         # no temporary left behind
    mtime = elf.stat().st_mtime_ns
    assert firmware_build.ensure_default_image() == elf and elf.stat().st_mtime_ns == mtime


def test_source_key_follows_the_sources(tmp_path: Path) -> None:
    for name in ("fw.c", "link.ld"):
        (tmp_path / name).write_bytes((firmware_build.FIRMWARE_DIR / name).read_bytes())
    assert firmware_build.source_key(tmp_path) == firmware_build.source_key()
    with open(tmp_path / "fw.c", "a") as fh:
        fh.write("\n")
    assert firmware_build.source_key(tmp_path) != firmware_build.source_key()


def test_firmware_cli(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert firmware_build.main(["--out", str(tmp_path / "x.elf")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "x.elf")
    assert firmware_build.main(["--out", str(tmp_path / "y.elf"), "--cc", "no-such-cc"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: C compiler 'no-such-cc' not found") and err.count("\n") == 1
    assert firmware_build.main(["--out", str(tmp_path / "z.elf"),
                                "-D", 'TEEIO_FW_BUILD_ID="' + "x" * 16 + '"']) == 1
    err = capsys.readouterr().err
    assert "at most 16 bytes" in err and err.count("\n") == 1
    assert sorted(os.listdir(tmp_path)) == ["x.elf"]


def _fake_project(root: Path) -> Path:
    for rel, text in (("guest_agent/__init__.py", "a"), ("guest_agent/__main__.py", "b"),
                      ("guest_agent/__pycache__/x.cpython-311.pyc", "c"),
                      ("teeio/__init__.py", "d"), ("teeio/spdm/defs.py", "e"),
                      ("qemu_configs/guest/run.sh", "f"), ("qemu_configs/launcher.py", "g"),
                      ("tsm/__init__.py", "h"), ("vfio_user_dev/__init__.py", "i"),
                      ("cryptography/__init__.py", "j"), ("pyproject.toml", "k")):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def _tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_guest_share_holds_only_the_guests_packages(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "cache"))
    src = _fake_project(tmp_path / "site-packages")
    share = launcher.guest_share(src)
    assert share.parent == tmp_path / "cache" / "guest-share"
    assert _tree(share) == ["guest_agent/__init__.py", "guest_agent/__main__.py",
                            "qemu_configs/guest/run.sh", "teeio/__init__.py",
                            "teeio/spdm/defs.py"]
    assert launcher.guest_share(src) == share                # same content, same folder
    (src / "teeio" / "spdm" / "defs.py").write_text("e2")
    changed = launcher.guest_share(src)
    assert changed != share and (changed / "teeio/spdm/defs.py").read_text() == "e2"
    # a share no boot used for a day goes; the one in use stays
    old = time.time() - launcher.GUEST_SHARE_MAX_AGE - 60
    os.utime(share, (old, old))
    assert launcher.guest_share(src) == changed and not share.exists()
    assert sorted(p.name for p in share.parent.iterdir()) == [changed.name]


def test_guest_share_of_this_checkout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "cache"))
    share = launcher.guest_share()
    assert sorted(p.name for p in share.iterdir()) == ["guest_agent", "qemu_configs", "teeio"]
    assert (share / "qemu_configs" / "guest" / "run.sh").is_file()
    assert (share / "guest_agent" / "__main__.py").is_file()
    assert not list(share.rglob("__pycache__"))


def test_guest_share_missing_package(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "cache"))
    with pytest.raises(launcher.LaunchError, match="guest_agent is missing"):
        launcher.guest_share(tmp_path)


def test_vm_qemu_arg_and_param(monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    def fake_run(opts: launcher.VmOptions) -> launcher.RunResult:
        seen["opts"] = opts
        return launcher.RunResult(True, "ok", Path("/w"), {}, None, None, Path("/w/c"))

    monkeypatch.setattr(launcher, "run_vm", fake_run)
    assert launcher.main(["--qemu-arg=-device", "--qemu-arg", "virtio-rng-pci",
                          "--param", "a=b=c"]) == 0
    assert seen["opts"].extra_qemu_args == ["-device", "virtio-rng-pci"]
    assert seen["opts"].params == {"a": "b=c"}
    capsys.readouterr()
    assert launcher.main(["--param", "nokey"]) == 2         # one line, before any boot
    assert "--param 'nokey': expected K=V" in capsys.readouterr().err
