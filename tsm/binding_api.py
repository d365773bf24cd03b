"""Binding a VM to a TDI over the control socket: ``bind`` and ``unbind`` (the VM's
GHCx socket and its secret's file, opened through its directory's fd; docs/tdisp-and-tsm.md,
"The control socket, request by request")."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from teeio.ghcx import SECRET_SIZE
from teeio.tdisp.defs import TdiState
from tsm.ctl import CtlError
from tsm.device import LINK_ERRORS, DeviceError, one_line
from tsm.ghcx_server import GhcxFailure
from tsm.registry import (
    VM_ID_RE,
    DeviceEntry,
    Registry,
    SecretFile,
    VmBinding,
    _abs,
    _arg,
    _name,
)
from tsm.tdisp import TdispRequestError

log = logging.getLogger("tsm.daemon")      # the daemon's log, whichever part writes it


def _same_path(a: str | None, b: str | None) -> bool:
    """*a* and *b* name the same file: the same resolved path, or the same inode."""
    if a is None or b is None:
        return False
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


class BindingApiMixin(Registry):
    """``bind`` and ``unbind``."""

    if TYPE_CHECKING:      # the daemon's own (tsm/daemon.py) and its other parts'
        def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None: ...
        def _serve_vm(self, vm: VmBinding) -> None: ...
        def stop_tdi(self, dev: DeviceEntry, vm: VmBinding | None, why: str) -> None: ...
        def _device(self, args: dict[str, Any], busy: str | None = None
                    ) -> contextlib.AbstractContextManager[
                        tuple[VmBinding | None, DeviceEntry]]: ...
        def _vm(self, args: dict[str, Any]) -> contextlib.AbstractContextManager[
                tuple[VmBinding | None, DeviceEntry]]: ...

    def ctl_bind(self, args: dict[str, Any]) -> dict[str, Any]:
        """``bind``: a VM to a device's TDI, with a fresh secret and a GHCx socket.
        Under the device's ``op`` and the daemon lock throughout: no device I/O, only the
        secret file and the GHCx socket (local, quick)."""
        vm_id = _name(args, "vm", VM_ID_RE)
        with self._device(args) as (_, dev), self.lock:
            return self._bind(vm_id, dev, args)

    def _bind(self, vm_id: str, dev: DeviceEntry, args: dict[str, Any]) -> dict[str, Any]:
        """VM *vm_id* bound to *dev* (its ``op`` and the daemon lock held), journaled."""
        if vm_id in self.vms:
            raise CtlError("failed", f"VM {vm_id} is already bound to "
                                     f"{self.vms[vm_id].device}")
        if dev.tdi.vm:
            raise CtlError("failed", f"TDI {dev.config.name} is already bound to VM "
                                     f"{dev.tdi.vm}")
        sock = _abs(_arg(args, "ghcx_socket", str))
        for other in self.devices.values():
            if _same_path(sock, other.config.doe_socket) or \
                    _same_path(sock, other.config.platform_socket):
                raise CtlError("bad_args", f"GHCx socket {sock} is device "
                                           f"{other.config.name}'s socket: refused")
        secret_file = _arg(args, "secret_file", str, None)
        secret_path = (Path(_abs(secret_file)) if secret_file
                       else self.state_dir.absolute() / "vms" / f"{vm_id}.secret")
        offset = _arg(args, "mmio_reporting_offset", int, 0)
        if not 0 <= offset < 1 << 64 or offset & 0xFFF:
            raise CtlError("bad_args", "mmio_reporting_offset must be a 4 KiB multiple, "
                                       "0..2^64-1")
        self._check_secret_name(secret_path)
        secret = self._open_secret(secret_path)
        vm = VmBinding(vm_id, dev.config.name, sock, str(secret_path), offset, secret=secret)
        try:
            self._check_secret_path(secret)
            try:
                secret.write()
            except OSError as exc:
                raise CtlError("failed", f"secret file {secret_path}: "
                                         f"{exc.strerror or exc}") from None
            try:
                self._serve_vm(vm)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    secret.unlink()        # in the directory opened above, wherever it is
                raise CtlError("failed", f"GHCx socket {sock}: {exc.strerror or exc}") from None
        except BaseException:
            vm.close_secret()
            raise
        with self._tables_lock:
            self.vms[vm_id] = vm
        dev.tdi.vm = vm_id
        self.journal.append("vm", vm=vm_id, device=dev.config.name, ghcx_socket=sock,
                            secret_file=str(secret_path), mmio_reporting_offset=offset)
        return {"vm": vm_id, "device": dev.config.name, "ghcx_socket": sock,
                "secret_file": str(secret_path)}

    def _check_secret_name(self, path: Path) -> None:
        """Before anything is made: a path that resolves inside the state directory, not
        directly under its ``vms/``, is refused (re-checked on the opened directory)."""
        real = Path(os.path.realpath(path.parent)) / path.name
        state = Path(os.path.realpath(self.state_dir))
        if real.is_relative_to(state) and real.parent != state / "vms":
            raise CtlError("bad_args", f"secret file {path}: inside the state directory "
                                       f"{state} only directly under {state / 'vms'}")

    def _ghcx_owner(self, path: str | None) -> str | None:
        """The VM whose GHCx socket (served by this daemon) *path* is, if any: connecting
        to it would replace that VM's connection.  Under the daemon lock."""
        for vm in self.vms.values():
            if _same_path(path, vm.ghcx_socket):
                return vm.vm
        return None

    def _open_secret(self, path: Path) -> SecretFile:
        """``bind``'s secret file, its directory opened once (:class:`SecretFile`, missing
        directories made 0700, never through a symlink)."""
        try:
            return SecretFile(path, create=True)
        except OSError as exc:
            raise CtlError("failed", f"secret file {path}: {exc.strerror or exc}") from None

    def _check_secret_path(self, secret: SecretFile) -> None:
        """``bind --secret-file``: not inside the state directory except its ``vms/`` (the
        journal, the control socket live there), not another VM's, and an existing file is
        only replaced if it looks like a secret of ours (regular, 0600, 32 bytes).  Checked
        on the directory already opened, which every later access goes through."""
        path = secret.path
        try:
            here = os.fstat(secret.dir_fd)
            state = os.stat(self.state_dir)
            vms = os.stat(self.state_dir / "vms") if (self.state_dir / "vms").is_dir() else None
        except OSError as exc:
            raise CtlError("failed", f"secret file {path}: {exc.strerror or exc}") from None
        real_dir = Path(os.path.realpath(Path(path).parent))
        if ((real_dir.is_relative_to(os.path.realpath(self.state_dir))
             or (here.st_dev, here.st_ino) == (state.st_dev, state.st_ino))
                and (vms is None or (here.st_dev, here.st_ino) != (vms.st_dev, vms.st_ino))):
            st = Path(os.path.realpath(self.state_dir))
            raise CtlError("bad_args", f"secret file {path}: inside the state directory "
                                       f"{st} only directly under {st / 'vms'}")
        mine = secret.identity()
        for other in self.vms.values():
            try:
                theirs = other.secret_handle().identity()
            except OSError:
                continue
            if theirs == mine:
                raise CtlError("failed", f"secret file {path} is VM {other.vm}'s")
        try:
            st_ = secret.lstat()
        except OSError as exc:
            raise CtlError("failed", f"secret file {path}: {exc.strerror or exc}") from None
        if st_ is None:
            return
        if (not stat.S_ISREG(st_.st_mode) or st_.st_size != SECRET_SIZE
                or st_.st_mode & 0o077):
            raise CtlError("failed", f"secret file {path} exists and is not a GHCx secret "
                                     f"(a 0600 file of {SECRET_SIZE} bytes): not overwritten")

    def ctl_unbind(self, args: dict[str, Any]) -> dict[str, Any]:
        """``unbind``: STOP the TDI if needed and revoke the VM's windows, best effort; the VM is
        forgotten whatever failed, and the result lists what did (``failed``)."""
        with self._vm(args) as (held, dev):
            assert held is not None
            return self._unbind(held, dev)

    def _unbind(self, vm: VmBinding, dev: DeviceEntry) -> dict[str, Any]:
        """*vm* unbound from *dev* (its ``op`` held), best effort, journaled."""
        why = f"VM {vm.vm} unbound"
        failed: list[str] = []
        if dev.tdi.state is not TdiState.CONFIG_UNLOCKED:
            try:
                self.stop_tdi(dev, vm, why)
            except GhcxFailure as exc:
                failed.append(f"STOP: {exc.message}")
            except TdispRequestError as exc:
                failed.append(f"STOP: device: {exc.request}: {exc.code_name}")
            except (*LINK_ERRORS, DeviceError) as exc:
                failed.append(f"STOP: {one_line(exc)}")
        for wid in sorted(vm.windows):
            self._revoke(dev, vm, wid, why)
        if vm.windows:
            failed.append("windows not revoked at the platform: "
                          + ", ".join(map(str, sorted(vm.windows))))
        if vm.server is not None:
            vm.server.close()
            vm.server = None
        try:       # through the directory opened at bind (or replay): never re-resolved
            vm.secret_handle().unlink()
        except OSError as exc:
            failed.append(f"secret file {vm.secret_file}: {exc.strerror or exc}")
        vm.close_secret()
        with self.lock, self._tables_lock:
            del self.vms[vm.vm]
            dev.tdi.vm = None
        self.journal.append("vm_removed", vm=vm.vm, failed=failed or None)
        if failed:
            self._count("unbind_failures")
            log.warning("VM %s unbound, but: %s", vm.vm, "; ".join(failed))
        return {"vm": vm.vm, "unbound": True, "failed": failed}
