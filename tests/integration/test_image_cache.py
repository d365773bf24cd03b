"""The guest image cache: keyed by recipe, atomic, locked, clear failures."""

from __future__ import annotations

import gzip
import lzma
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qemu_configs import image

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TEEIO_CACHE", str(tmp_path / "a"))
    assert image.cache_root() == tmp_path / "a"
    monkeypatch.delenv("TEEIO_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert image.cache_root() == tmp_path / "xdg" / "teeio"


def test_key_follows_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    before = image.sysroot_key()
    before_initrd = image.initramfs_key()
    recipe = dict(image.SYSROOT_RECIPE, include=[*image.SYSROOT_RECIPE["include"], "strace"])  # type: ignore[list-item]
    monkeypatch.setattr(image, "SYSROOT_RECIPE", recipe)
    assert image.sysroot_key() != before
    assert image.initramfs_key() != before_initrd  # the initramfs is keyed on its sysroot


def _cpio_entries(data: bytes) -> dict[str, bytes]:
    out = {}
    pos = 0
    while True:
        hdr = data[pos:pos + 110]
        assert hdr[:6] == b"070701"
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = data[pos + 110:pos + 110 + namesize - 1].decode()
        pos += 110 + namesize
        pos += -pos % 4
        body = data[pos:pos + filesize]
        pos += filesize
        pos += -pos % 4
        if name == "TRAILER!!!":
            return out
        out[name] = body


def _fake_sysroot(root: Path, release: str = "9.9.9-test") -> None:
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/bin/busybox").write_bytes(b"\x7fELF fake busybox")
    (root / "boot").mkdir()
    (root / f"boot/vmlinuz-{release}").write_bytes(b"kernel")
    mod = root / "lib/modules" / release
    for rel in ("kernel/fs/netfs/netfs.ko.xz", "kernel/net/9p/9pnet.ko.xz",
                "kernel/net/9p/9pnet_virtio.ko.xz", "kernel/fs/9p/9p.ko.xz"):
        (mod / rel).parent.mkdir(parents=True, exist_ok=True)
        (mod / rel).write_bytes(lzma.compress(f"module {rel}".encode()))
    (mod / "modules.dep").write_text(
        "kernel/fs/netfs/netfs.ko.xz:\n"
        "kernel/fs/9p/9p.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n"
        "kernel/net/9p/9pnet.ko.xz:\n"
        "kernel/net/9p/9pnet_virtio.ko.xz: kernel/net/9p/9pnet.ko.xz kernel/fs/netfs/netfs.ko.xz\n")
    (root / ".complete").write_text("{}")


def test_initramfs_holds_busybox_init_and_modules_in_dependency_order(cache: Path) -> None:
    _fake_sysroot(image.paths().sysroot)
    assert not image.is_built()
    path = image.build_initramfs()
    assert image.is_built()
    entries = _cpio_entries(gzip.decompress(path.read_bytes()))
    assert entries["bin/busybox"] == b"\x7fELF fake busybox"
    assert entries["init"] == (image.GUEST_DIR / "init").read_bytes()
    order = entries["modules.order"].decode().split()
    assert set(order) == {"netfs.ko", "9pnet.ko", "9pnet_virtio.ko", "9p.ko"}
    assert order.index("9pnet.ko") < order.index("9p.ko")
    assert order.index("netfs.ko") < order.index("9p.ko")
    assert entries["modules/9p.ko"] == b"module kernel/fs/9p/9p.ko.xz"  # decompressed
    # A second call returns the cached file untouched; FRESH rebuilds it.
    mtime = path.stat().st_mtime_ns
    assert image.build_initramfs() == path and path.stat().st_mtime_ns == mtime
    time.sleep(0.01)
    image.build_initramfs(fresh=True)
    assert path.stat().st_mtime_ns != mtime


def test_missing_module_is_one_clear_error(cache: Path) -> None:
    _fake_sysroot(image.paths().sysroot)
    dep = next((image.paths().sysroot / "lib/modules").glob("*/modules.dep"))
    dep.write_text("kernel/fs/netfs/netfs.ko.xz:\n")
    with pytest.raises(image.ImageError, match="kernel module 9p is missing"):
        image.build_initramfs()


def test_builders_are_serialised_by_the_lock(cache: Path) -> None:
    order: list[str] = []
    with image._locked("sysroot"):
        t = threading.Thread(target=lambda: (image._locked("sysroot").__enter__(),
                                             order.append("second")))
        t.start()
        time.sleep(0.3)
        order.append("first-releases")
    t.join(5)
    assert order == ["first-releases", "second"]


@pytest.mark.skipif(os.geteuid() != 0, reason="building a sysroot needs root")
def test_unreachable_mirror_fails_with_one_sentence(tmp_path: Path) -> None:
    env = dict(os.environ, TEEIO_CACHE=str(tmp_path / "cache"),
               TEEIO_DEBIAN_MIRROR="http://127.0.0.1:9/debian", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qemu_configs.image"], env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the guest sysroot could not be built:"), r.stderr
    assert not list((tmp_path / "cache").glob("sysroot-*")), "no half-built sysroot is kept"


def test_print_reports_paths_and_state(cache: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "qemu_configs.image", "--print"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert '"built": false' in r.stdout and str(cache) in r.stdout
