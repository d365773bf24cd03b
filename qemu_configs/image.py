"""Guest image: a Debian 13 sysroot (QEMU, guest kernel, python3) plus a 9p initramfs.

docs/design.md decisions 2-4.  One cache, one resolver: ``$TEEIO_CACHE`` or
``$XDG_CACHE_HOME/teeio`` (default ``~/.cache/teeio``).  Each artefact lives in a
folder named by the hash of its recipe; it is built in a temporary folder under a
lock and renamed into place, so a half-built image is never used and two builders
never race.  ``--fresh`` (``make image FRESH=1``) rebuilds even when cached.
"""

from __future__ import annotations

import argparse
import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qemu_configs.mirror import MirrorNotFound, host_apt_proxy_options, host_debian_mirror
from teeio import paths as paths_mod

GUEST_DIR = Path(__file__).parent / "guest"
BUILDER_VERSION = 1

SYSROOT_RECIPE: dict[str, object] = {
    "builder": BUILDER_VERSION,
    "tool": "mmdebstrap --variant=apt --mode=root",
    "suite": "trixie",
    "extra_suites": ["trixie-backports"],
    "include": [
        "linux-image-amd64/trixie-backports",
        "qemu-system-x86/trixie-backports",
        "qemu-system-common/trixie-backports",
        "qemu-system-data/trixie-backports",
        "seabios/trixie-backports",
        "ipxe-qemu",
        "python3",
        "python3-cryptography",
        "python3-pyelftools",
        "pciutils",
        "busybox-static",
        "kmod",
        # a stock NVMe driver's user space: nvme list / id-ctrl, filesystems, fio
        "nvme-cli",
        "e2fsprogs",
        "fio",
    ],
}
# Modules the initramfs needs to mount a 9p root (9p.ko pulls netfs and 9pnet).
INITRAMFS_MODULES = ["9p", "9pnet_virtio"]


class ImageError(RuntimeError):
    """A build step failed; the message is one sentence for the user."""


def cache_root() -> Path:
    return paths_mod.cache_root()


def _hash(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sysroot_key() -> str:
    return _hash(SYSROOT_RECIPE)


def initramfs_key() -> str:
    init = (GUEST_DIR / "init").read_bytes()
    return _hash({"sysroot": sysroot_key(), "modules": INITRAMFS_MODULES,
                  "init": hashlib.sha256(init).hexdigest(), "builder": BUILDER_VERSION})


@dataclass(frozen=True)
class GuestImage:
    sysroot: Path
    initramfs: Path

    @property
    def kernel(self) -> Path:
        kernels = sorted((self.sysroot / "boot").glob("vmlinuz-*"))
        if not kernels:
            raise ImageError(f"no kernel in {self.sysroot}/boot; rebuild with 'make image FRESH=1'")
        return kernels[-1]

    @property
    def kernel_release(self) -> str:
        return self.kernel.name.removeprefix("vmlinuz-")

    @property
    def loader(self) -> Path:
        return self.sysroot / "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"

    def qemu_argv0(self) -> list[str]:
        """QEMU run through the sysroot's own dynamic loader (no chroot; decision 2)."""
        s = self.sysroot
        return [str(self.loader), "--library-path",
                f"{s}/usr/lib/x86_64-linux-gnu:{s}/lib/x86_64-linux-gnu",
                str(s / "usr/bin/qemu-system-x86_64"),
                "-L", str(s / "usr/share/qemu"), "-L", str(s / "usr/share/seabios")]


def paths() -> GuestImage:
    root = cache_root()
    return GuestImage(root / f"sysroot-{sysroot_key()}",
                      root / f"initramfs-{initramfs_key()}" / "initramfs.cpio.gz")


def is_built() -> bool:
    p = paths()
    return (p.sysroot / ".complete").is_file() and p.initramfs.is_file()


def _say(msg: str) -> None:
    print(f"[image] {msg}", file=sys.stderr, flush=True)


@contextmanager
def _locked(name: str) -> Iterator[None]:
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _say(f"waiting for another build of {name} to finish ...")
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _ensure_mmdebstrap() -> None:
    if shutil.which("mmdebstrap"):
        return
    if os.geteuid() != 0:
        raise ImageError("mmdebstrap is missing and installing it needs root: "
                         "run 'apt-get install mmdebstrap' as root")
    _say("installing mmdebstrap on the host (apt-get) ...")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "mmdebstrap"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["no output"])[-1]
            raise ImageError(f"could not install mmdebstrap ({' '.join(cmd)}: {last})")


def _replace(tmp: Path, final: Path) -> None:
    if final.exists():
        old = final.with_name(final.name + f".old-{os.getpid()}")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)


def build_sysroot(fresh: bool = False) -> Path:
    final = paths().sysroot
    with _locked("sysroot"):
        if (final / ".complete").is_file() and not fresh:
            return final
        if os.geteuid() != 0:
            raise ImageError("building the guest sysroot needs root (mmdebstrap --mode=root)")
        _ensure_mmdebstrap()
        try:
            mirror = host_debian_mirror()
        except MirrorNotFound as exc:
            raise ImageError(str(exc)) from None
        suites = [str(SYSROOT_RECIPE["suite"]), *SYSROOT_RECIPE["extra_suites"]]  # type: ignore[misc]
        sources = [f"deb {mirror} {s} main" for s in suites]
        tmp = Path(tempfile.mkdtemp(prefix="sysroot-build-", dir=cache_root()))
        target = tmp / "root"
        cmd = ["mmdebstrap", "--variant=apt", "--mode=root",
               "--include=" + ",".join(SYSROOT_RECIPE["include"]),  # type: ignore[arg-type]
               ]
        for opt in host_apt_proxy_options():
            cmd.append(f"--aptopt={opt}")
        cmd += [str(SYSROOT_RECIPE["suite"]), str(target), *sources]
        _say(f"building the Debian 13 sysroot from the host's mirror ({mirror}); "
             "about a minute and ~200 MB of downloads ...")
        t0 = time.monotonic()
        log = tmp / "mmdebstrap.log"
        with open(log, "w") as logf:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if line.startswith("I: "):
                    _say(f"  {time.monotonic() - t0:5.0f}s {line[3:].strip()}")
            rc = proc.wait()
        if rc != 0:
            text = log.read_text(errors="replace")
            reason = _first_failure(text)
            kept = cache_root() / "last-failed-mmdebstrap.log"
            shutil.copy(log, kept)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ImageError(f"the guest sysroot could not be built: {reason} (full log: {kept})")
        (target / ".complete").write_text(json.dumps(SYSROOT_RECIPE, sort_keys=True))
        _replace(target, final)
        shutil.rmtree(tmp, ignore_errors=True)
        _say(f"sysroot ready in {time.monotonic() - t0:.0f}s: {final}")
        return final


def _first_failure(text: str) -> str:
    for line in text.splitlines():
        low = line.lower()
        if any(k in low for k in ("unable to locate", "failed to fetch", "could not resolve",
                                  "temporary failure", "connection failed", "not found",
                                  "unable to fetch", "has no installation candidate")):
            return line.strip().removeprefix("E: ").removeprefix("W: ")
    for line in reversed(text.splitlines()):
        if line.startswith("E: "):
            return line[3:].strip()
    return "mmdebstrap failed"


# --- initramfs: a tiny cpio ("newc") written here, no cpio binary needed -------------

def _cpio_entry(out: io.BytesIO, name: str, mode: int, data: bytes = b"", ino: int = 0) -> None:
    nameb = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(nameb), 0))
    out.write(hdr.encode() + nameb)
    out.write(b"\0" * (-(110 + len(nameb)) % 4))
    out.write(data)
    out.write(b"\0" * (-len(data) % 4))


def _module_order(sysroot: Path, release: str, wanted: list[str]) -> list[Path]:
    moddir = sysroot / "lib/modules" / release
    deps: dict[str, list[str]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
    by_name = {Path(p).name.split(".ko")[0]: p for p in deps}
    order: list[str] = []

    def visit(p: str) -> None:
        for d in deps.get(p, []):
            visit(d)
        if p not in order:
            order.append(p)

    for w in wanted:
        if w not in by_name:
            raise ImageError(f"kernel module {w} is missing from the guest kernel {release}")
        visit(by_name[w])
    return [moddir / p for p in order]


def build_initramfs(fresh: bool = False) -> Path:
    img = paths()
    final_dir = img.initramfs.parent
    with _locked("initramfs"):
        if img.initramfs.is_file() and not fresh:
            return img.initramfs
        busybox = img.sysroot / "usr/bin/busybox"
        if not busybox.is_file():
            raise ImageError(f"busybox-static is missing from {img.sysroot}")
        out = io.BytesIO()
        ino = 1
        for d in ("bin", "dev", "proc", "sys", "newroot", "modules"):
            _cpio_entry(out, d, 0o040755, ino=ino)
            ino += 1
        _cpio_entry(out, "bin/busybox", 0o100755, busybox.read_bytes(), ino=ino)
        ino += 1
        _cpio_entry(out, "init", 0o100755, (GUEST_DIR / "init").read_bytes(), ino=ino)
        ino += 1
        names = []
        for mod in _module_order(img.sysroot, img.kernel_release, INITRAMFS_MODULES):
            raw = mod.read_bytes()
            if mod.name.endswith(".xz"):
                raw = lzma.decompress(raw)
            elif mod.name.endswith(".zst"):
                raise ImageError("zstd-compressed kernel modules are not supported")
            name = mod.name.split(".ko")[0] + ".ko"
            names.append(name)
            _cpio_entry(out, f"modules/{name}", 0o100644, raw, ino=ino)
            ino += 1
        _cpio_entry(out, "modules.order", 0o100644, ("\n".join(names) + "\n").encode(), ino=ino)
        _cpio_entry(out, "TRAILER!!!", 0)
        tmp = Path(tempfile.mkdtemp(prefix="initramfs-build-", dir=cache_root()))
        (tmp / "initramfs.cpio.gz").write_bytes(gzip.compress(out.getvalue(), mtime=0))
        _replace(tmp, final_dir)
        _say(f"initramfs ready: {img.initramfs}")
        return img.initramfs


def ensure_image(fresh: bool = False) -> GuestImage:
    build_sysroot(fresh=fresh)
    build_initramfs(fresh=fresh)
    return paths()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="teeio-image",
                                 description="Build (or locate) the cached guest image.")
    ap.add_argument("--fresh", action="store_true", help="rebuild even when cached")
    ap.add_argument("--print", action="store_true", help="print the cached paths and exit")
    ns = ap.parse_args(argv)
    if ns.print:
        p = paths()
        print(json.dumps({"sysroot": str(p.sysroot), "initramfs": str(p.initramfs),
                          "built": is_built()}, indent=2))
        return 0
    try:
        t0 = time.monotonic()
        was_built = is_built()
        img = ensure_image(fresh=ns.fresh)
    except ImageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "cached" if was_built and not ns.fresh else "built"
    _say(f"guest image {state} ({time.monotonic() - t0:.1f}s): kernel {img.kernel_release}, "
         f"sysroot {img.sysroot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
