"""The guest's API: the GHCx requests of the VMs bound to a TDI (docs/ghcx.md).

This module owns each bound VM's GHCx server (:meth:`GuestApiMixin._serve_vm`) and the
requests it brings (:meth:`GuestApiMixin.ghcx_request`): TDI_LOCK, TDI_INFO,
GET_EVIDENCE, TDI_ACCEPT, DMA_ACCEPT, DMA_RELEASE, TDI_STOP and STATUS, one handler
each (``ghcx_*``, typed bodies of :mod:`teeio.ghcx.messages` in and out); and the LOCK
and STOP of a TDI (:meth:`GuestApiMixin.lock_tdi`, :meth:`GuestApiMixin.stop_tdi`) that the
host's control API uses too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from teeio.ghcx import MessageError, MsgType
from teeio.ghcx.body import Body
from teeio.ghcx.messages import (
    DmaAccept,
    DmaAcceptResponse,
    DmaRelease,
    DmaReleaseResponse,
    GetEvidence,
    GetEvidenceResponse,
    RequestBody,
    Status,
    StatusResponse,
    TdiAccept,
    TdiAcceptResponse,
    TdiInfo,
    TdiInfoResponse,
    TdiLock,
    TdiLockResponse,
    TdiStop,
    TdiStopResponse,
    Window,
    decode_request,
)
from teeio.platform_channel import PlatformCtlError, StreamState
from teeio.spdm.defs import MEAS_OP_ALL
from teeio.tdisp.defs import TdiState
from tsm.device import LINK_ERRORS, DeviceError, DeviceLink, one_line
from tsm.ghcx_server import GhcxFailure, GhcxServer
from tsm.lifecycle import Input, Step
from tsm.registry import DeviceBusy, DeviceEntry, Registry, VmBinding
from tsm.tdi import lock_flags, read_report
from tsm.tdisp import TdispRequestError

log = logging.getLogger("tsm.daemon")      # the daemon's log, whichever part writes it

#: Trusted-DMA windows one VM may hold at once (DMA_ACCEPT beyond it: ``refused``).
MAX_WINDOWS_PER_VM = 64

#: A GHCx request's handler: the VM, its device (``op`` held), the typed request → the
#: typed response.
Handler = Callable[[VmBinding, DeviceEntry, Any], Body]


def _decode(mtype: MsgType, payload: dict[str, Any]) -> RequestBody[Any]:
    """The typed request; a payload that is not one is answered ``bad_request``."""
    try:
        return decode_request(mtype, payload)
    except MessageError as exc:
        raise GhcxFailure(exc.code, str(exc)) from None


class GuestApiMixin(Registry):
    """The GHCx requests, and LOCK and STOP of a TDI."""

    if TYPE_CHECKING:      # the daemon's own (tsm/daemon.py) and its other parts'
        def _revoke(self, dev: DeviceEntry, vm: VmBinding, wid: int, reason: str) -> None: ...
        def _mmio_private(self, dev: DeviceEntry, enable: bool) -> None: ...
        def _journal_tdi(self, dev: DeviceEntry, source: str = "tsm") -> None: ...
        def _journal_stream(self, dev: DeviceEntry, state: StreamState, reason: str | None,
                            source: str = "tsm") -> None: ...
        def _allow(self, dev: DeviceEntry, what: Input) -> Step: ...

        def _learn(self, dev: DeviceEntry, what: Input, reason: str, source: str) -> bool: ...
        def _take(self, dev: DeviceEntry, row: Step, reason: str | None,
                  source: str) -> None: ...
        def _refresh_state(self, dev: DeviceEntry, journal: bool = False) -> None: ...

    def _serve_vm(self, vm: VmBinding) -> None:
        """Start *vm*'s GHCx server on its socket, with its secret and this boot's id."""
        secret = vm.secret_handle().read()
        vm.server = GhcxServer(vm.vm, vm.ghcx_socket, secret, self.boot_id,
                               self.ghcx_request).start()

    def ghcx_request(self, vm_id: str, op: str, payload: dict[str, Any]) -> dict[str, Any]:
        """One decrypted guest request (docs/ghcx.md "Messages") → its response payload;
        raises GhcxFailure for an error response.

        Runs under the device's ``op`` only (:class:`~tsm.registry.Registry`): another
        VM's device stalled does not delay it.  STATUS takes no lock at all and answers
        even while its own device is busy."""

        def find() -> tuple[VmBinding | None, DeviceEntry]:
            vm = self.vms.get(vm_id)
            if vm is None or vm.device not in self.devices:
                raise GhcxFailure("refused", f"VM {vm_id} is not bound to a TDI")
            return vm, self.devices[vm.device]

        handlers: dict[MsgType, Handler] = {
            MsgType.TDI_LOCK: self.ghcx_lock, MsgType.TDI_INFO: self.ghcx_info,
            MsgType.GET_EVIDENCE: self.ghcx_evidence, MsgType.TDI_ACCEPT: self.ghcx_accept,
            MsgType.DMA_ACCEPT: self.ghcx_dma_accept,
            MsgType.DMA_RELEASE: self.ghcx_dma_release, MsgType.TDI_STOP: self.ghcx_stop}
        with self.lock:
            vm, dev = find()
        mtype = MsgType.__members__.get(op)
        if mtype is MsgType.STATUS:
            status = _decode(mtype, payload)
            assert vm is not None and isinstance(status, Status)
            return self.ghcx_status(vm, dev, status).encode()
        fn = handlers.get(mtype) if mtype is not None else None
        if fn is None or mtype is None:
            raise GhcxFailure("unknown_request", f"no request {op}")
        try:
            with self._held(find) as (held_vm, dev):
                assert held_vm is not None
                return fn(held_vm, dev, _decode(mtype, payload)).encode()
        except DeviceBusy as exc:
            self._count("ghcx_busy")
            raise GhcxFailure("state", str(exc)) from None
        except GhcxFailure as exc:
            self._count(f"ghcx_{exc.code}")
            raise
        except MessageError:
            self._count("ghcx_internal")
            raise       # a response the TSM could not build: answered `internal`
        except TdispRequestError as exc:
            self._count("ghcx_device")
            raise GhcxFailure("device", f"{exc.request}: {exc.code_name}") from None
        except (*LINK_ERRORS, DeviceError) as exc:
            self._count("ghcx_device")
            raise GhcxFailure("device", one_line(exc)) from None

    def _session(self, dev: DeviceEntry) -> DeviceLink:
        """*dev*'s link if its SPDM session is up, else GhcxFailure ``state``."""
        if not dev.link.session_up:
            why = dev.last_error or dev.tdi.reason or "not connected"
            raise GhcxFailure("state", f"device {dev.config.name} has no SPDM session ({why})")
        return dev.link

    # -- the requests ------------------------------------------------------------------------
    def ghcx_lock(self, vm: VmBinding, dev: DeviceEntry, req: TdiLock) -> TdiLockResponse:
        """TDI_LOCK: :meth:`lock_tdi`; the new state and lock epoch."""
        self.lock_tdi(dev, vm)
        return TdiLockResponse(state=dev.tdi.state, lock_epoch=dev.tdi.lock_epoch)

    def lock_tdi(self, dev: DeviceEntry, vm: VmBinding) -> None:
        """LOCK_INTERFACE_REQUEST (PCIe 6.x §11.3.6: NO_FW_UPDATE, DEFAULT_STREAM_ID = the
        stream, the VM's MMIO reporting offset), then the whole report (§11.3.8), then
        lock_epoch + 1, journaled."""
        link = self._session(dev)
        self._allow(dev, Input.LOCK)
        epoch = dev.tdi.lock_epoch + 1
        flags = lock_flags(link.lock_flags)
        if link.ensure_stream():
            self._journal_stream(dev, StreamState.SECURE, "set up again before LOCK: the "
                                 "device's keys had been invalidated (reset)")
        with link.lock:
            client = link.tdisp_client()
            nonce = client.lock(flags, dev.config.stream_id, vm.mmio_reporting_offset)
            try:
                report: bytes | None = read_report(client)
            except BaseException:
                report = None        # locked all the same: recorded, then the error
                raise
            finally:
                dev.tdi.locked(epoch, int(flags), nonce, report, link.cert_chain)
                self._journal_tdi(dev)
        log.info("TDI %s: CONFIG_LOCKED for VM %s, lock epoch %d", dev.config.name, vm.vm,
                 dev.tdi.lock_epoch)

    def ghcx_info(self, vm: VmBinding, dev: DeviceEntry, req: TdiInfo) -> TdiInfoResponse:
        """TDI_INFO: the TDI and stream as the device says now (if connected), then the
        TDI info object."""
        if dev.link.session_up:
            self._refresh_state(dev)
            live = dev.link.stream_state()
            if live != dev.stream_state:
                self._journal_stream(dev, live, "as both ends report it now")
        return self._info(dev, vm)

    def _info(self, dev: DeviceEntry, vm: VmBinding) -> TdiInfoResponse:
        """The TDI info object of docs/ghcx.md for *vm*."""
        return dev.tdi.info(dev.config.stream_id, dev.stream_state, self.boot_id,
                            vm.mmio_reporting_offset)

    def ghcx_evidence(self, vm: VmBinding, dev: DeviceEntry,
                      req: GetEvidence) -> GetEvidenceResponse:
        """GET_EVIDENCE: signed measurements with the guest's nonce, under a LOCK, with
        the certificate chain and the TDI report."""
        link = self._session(dev)
        self._allow(dev, Input.EVIDENCE)
        if not dev.tdi.report:
            raise GhcxFailure("state", f"TDI {dev.config.name} is {dev.tdi.state.name}: "
                                       "evidence is given under a LOCK")
        with link.lock:
            assert link.requester is not None
            # DSP0274 §10.11: all blocks, signed, with exactly the guest's nonce; outside
            # the session, so L1 = VCA || GET_MEASUREMENTS || MEASUREMENTS of this
            # connection, which the guest re-checks.
            result = link.requester.get_measurements(MEAS_OP_ALL, nonce=req.nonce,
                                                     signed=True)
        dev.tdi.evidence(result)
        return GetEvidenceResponse(cert_chain=link.cert_chain, vca=result.vca,
                                   measurements=result.transcript, report=dev.tdi.report)

    def ghcx_accept(self, vm: VmBinding, dev: DeviceEntry,
                    req: TdiAccept) -> TdiAcceptResponse:
        """TDI_ACCEPT: START_INTERFACE if the digests and lock epoch the guest verified
        are still current, then private MMIO opened (or the TDI stopped again)."""
        epoch = req.lock_epoch
        link = self._session(dev)
        tdi = dev.tdi
        row = self._allow(dev, Input.ACCEPT)
        if epoch != tdi.lock_epoch:
            raise GhcxFailure("mismatch", f"lock epoch {epoch} is not the current one "
                                          f"({tdi.lock_epoch}): the TDI was locked again")
        if tdi.digest_transcript is None:
            raise GhcxFailure("mismatch", "no evidence was fetched under this lock")
        differ = req.digests.differ(tdi.info_digests())
        if differ:
            raise GhcxFailure("mismatch", f"digests differ from the current ones: "
                                          f"{', '.join(differ)}")
        assert tdi.start_nonce is not None
        with link.lock:
            link.tdisp_client().start(tdi.start_nonce)     # §11.3.10, LOCK's nonce
        tdi.start_nonce = None
        self._take(dev, row, None, "tsm")
        try:
            self._mmio_private(dev, True)
        except (PlatformCtlError, DeviceError) as exc:
            # fail safe: a TDI whose private MMIO could not be opened does not stay in RUN
            log.error("TDI %s: private MMIO not opened (%s): stopping it", dev.config.name,
                      exc)
            try:
                self.stop_tdi(dev, vm, "private MMIO could not be opened")
            except (GhcxFailure, TdispRequestError, *LINK_ERRORS, DeviceError):
                pass        # logged, and the TDI is ERROR: refused all the same
            raise GhcxFailure("refused", f"private MMIO could not be opened: "
                                         f"{one_line(exc)}") from None
        log.info("TDI %s: RUN (accepted by VM %s, lock epoch %d)", dev.config.name, vm.vm,
                 tdi.lock_epoch)
        return TdiAcceptResponse(state=tdi.state, dma_stream=dev.config.stream_id)

    def ghcx_dma_accept(self, vm: VmBinding, dev: DeviceEntry,
                        req: DmaAccept) -> DmaAcceptResponse:
        """DMA_ACCEPT: a trusted-DMA window authorised at the platform, journaled."""
        base, size, access = req.base, req.size, req.access
        self._allow(dev, Input.DMA_ACCEPT)
        if len(vm.windows) >= MAX_WINDOWS_PER_VM:
            raise GhcxFailure("refused", f"VM {vm.vm} already has {len(vm.windows)} DMA "
                                         f"windows (at most {MAX_WINDOWS_PER_VM}): release "
                                         "one first")
        try:
            w = dev.link.platform_call("window_authorise", requester_id=dev.requester_id,
                                       stream_id=dev.config.stream_id, base=base, size=size,
                                       access=access)
        except PlatformCtlError as exc:
            raise GhcxFailure("refused", exc.message) from None
        wid = w.get("window_id", w.get("id"))
        if isinstance(wid, bool) or not isinstance(wid, int):
            raise GhcxFailure("internal", "the platform returned a window without an id")
        vm.windows[wid] = {"base": base, "size": size, "access": access}
        self.journal.append("window", window_id=wid, vm=vm.vm, device=dev.config.name,
                            base=base, size=size, access=access)
        return DmaAcceptResponse(window_id=wid)

    def ghcx_dma_release(self, vm: VmBinding, dev: DeviceEntry,
                         req: DmaRelease) -> DmaReleaseResponse:
        """DMA_RELEASE: one of the VM's windows revoked at the platform, journaled."""
        wid = req.window_id
        if wid not in vm.windows:
            raise GhcxFailure("refused", f"window {wid} is not one of this VM's")
        try:
            dev.link.platform_call("window_revoke", window_id=wid)
        except PlatformCtlError as exc:
            raise GhcxFailure("refused", f"window {wid}: {exc.message}") from None
        del vm.windows[wid]
        self.journal.append("window_revoked", window_id=wid, reason="released by the guest")
        return DmaReleaseResponse()

    def ghcx_stop(self, vm: VmBinding, dev: DeviceEntry, req: TdiStop) -> TdiStopResponse:
        """TDI_STOP: :meth:`stop_tdi`; the new state."""
        self.stop_tdi(dev, vm, "stopped by the guest")
        return TdiStopResponse(state=dev.tdi.state)

    def stop_tdi(self, dev: DeviceEntry, vm: VmBinding | None, why: str) -> None:
        """Revoke the VM's windows, close private MMIO, STOP_INTERFACE (§11.3.12).

        The platform steps are best effort (logged and counted): whatever they do,
        STOP_INTERFACE is sent, since it is what really takes the TDI out of RUN (the
        device scrubs and refuses DMA).  If the STOP cannot be sent or fails, the record
        goes to ERROR (fail-safe: nothing can be accepted or started until a STOP works)
        and the error is raised."""
        row = self._allow(dev, Input.STOP)
        if vm is not None:
            for wid in sorted(vm.windows):
                self._revoke(dev, vm, wid, why)
        if dev.tdi.mmio_private or dev.tdi.state is TdiState.RUN:
            try:
                self._mmio_private(dev, False)
            except (PlatformCtlError, DeviceError) as exc:
                self._count("platform_errors")
                log.error("TDI %s: cannot close private MMIO (%s); sending STOP all the same",
                          dev.config.name, one_line(exc))
        try:
            link = self._session(dev)
            with link.lock:
                link.tdisp_client().stop()
        except (GhcxFailure, TdispRequestError, *LINK_ERRORS, DeviceError) as exc:
            self._count("stop_failures")
            text = exc.message if isinstance(exc, GhcxFailure) else one_line(exc)
            self._learn(dev, Input.STOP_FAILED, f"STOP failed ({why}): {text}", "tsm")
            log.error("TDI %s: STOP_INTERFACE failed (%s): %s; the TDI is %s",
                      dev.config.name, why, text, dev.tdi.state.name)
            raise
        self._take(dev, row, None, "tsm")
        log.info("TDI %s: CONFIG_UNLOCKED (%s)", dev.config.name, why)

    def ghcx_status(self, vm: VmBinding, dev: DeviceEntry, req: Status) -> StatusResponse:
        """STATUS: the boot id, the TDI's state and the VM's windows (no lock taken)."""
        windows = tuple(Window(window_id=k, base=v["base"], size=v["size"], access=v["access"])
                        for k, v in sorted(dict(vm.windows).items()))
        return StatusResponse(boot_id=self.boot_id, vm_id=vm.vm, tdi=dev.config.name,
                              state=dev.tdi.state, windows=windows)

