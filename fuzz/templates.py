"""Valid messages to seed the fuzzers with, recorded from real exchanges.

:func:`rig` builds one device (``Platform``) with its DSM and an SPDM requester with a
secured session, as ``tests/support/tee_rig.py`` does (without the platform socket);
:func:`spdm_transcript` is every clear request and response of a whole connection.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache

from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeObject, pad_dw
from teeio.ide import Direction, KeySet, SubStream
from teeio.ide_km import (
    PCI_SIG_STANDARD_ID,
    KeyProg,
    KSetGo,
    KSetStop,
    Query,
)
from teeio.measurements import DmtfValueType, MeasurementSource
from teeio.pcie.config import Command, Reg
from teeio.spdm import Requester, codec
from teeio.tdisp import codec as tdisp
from teeio.tdisp.codec import function_id
from teeio.tdisp.defs import LockInterfaceFlags
from vfio_user_dev.dsm import DeviceSecurityManager
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciRegion

MEASUREMENTS = (MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware code"),)


@lru_cache(maxsize=1)
def identity() -> pki.Identity:
    return pki.generate_chain("P-384")


@dataclass
class Rig:
    """A device with its DSM; ``req`` holds a secured session ``sid``."""

    machine: Platform
    dsm: DeviceSecurityManager
    req: Requester
    sid: int
    rid: int
    clear: list[tuple[bytes, bytes]] = field(default_factory=list)

    def doe(self, doe_type: int, payload: bytes) -> bytes:
        rsp = self.machine.device.doe.handle_object(
            DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)).encode())
        out = b"" if rsp is None else DoeObject.decode(rsp).payload
        if doe_type == DataObjectType.CMA_SPDM:
            self.clear.append((bytes(payload), out))
        return out

    def new_session(self) -> None:
        """A fresh requester (VCA, certificate) and session, after the old one is gone."""
        self.req = Requester(self.doe, [identity().root], name="fuzz")
        self.req.init_connection()
        self.req.get_digests()
        self.req.get_certificate(0)
        self.sid = self.req.start_session(0)

    def seal(self, app: bytes) -> bytes:
        return self.req.sessions[self.sid].channel.seal(app)

    def close(self) -> None:
        self.dsm.close()
        self.machine.close()


def rig() -> Rig:
    machine = Platform()
    dev = machine.device
    rid = dev.link_end.requester_id
    dsm = DeviceSecurityManager(identity(), MEASUREMENTS, name="fuzz", heartbeat_period=0)
    dsm.attach(dev.doe, dev.ide, requester_id=rid, tdi=dev)
    for off, value in ((Reg.BAR0, 0xFE00_0000), (Reg.BAR0 + 4, 0xFE00_1000),
                       (Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER)):
        machine.region_write(PciRegion.CONFIG, off, value.to_bytes(4, "little"))
    r = Rig(machine, dsm, None, 0, rid)  # type: ignore[arg-type]
    r.new_session()
    return r


@lru_cache(maxsize=1)
def spdm_transcript() -> tuple[tuple[bytes, bytes], ...]:
    """(request, response) of every clear exchange of a whole connection: VCA, digests,
    certificate, measurements, KEY_EXCHANGE (FINISH goes in the session)."""
    r = rig()
    try:
        r.req.get_measurements()
        return tuple(r.clear)
    finally:
        r.close()


def ide_km_objects() -> list[bytes]:
    key = bytes(range(32))
    out = [Query().encode(), Query(1).encode()]
    for ks in KeySet:
        for d in Direction:
            for sub in SubStream:
                out.append(KeyProg(1, ks, d, sub, key, 7).encode())
            out.append(KSetGo(1, ks, d, SubStream.PR).encode())
            out.append(KSetStop(1, ks, d, SubStream.CPL).encode())
    return out


def tdisp_requests(rid: int = 0x0100) -> list[bytes]:
    fid = function_id(rid)
    return [m.encode() for m in (
        tdisp.GetTdispVersion(fid), tdisp.GetTdispCapabilities(fid),
        tdisp.LockInterfaceRequest(fid, LockInterfaceFlags.NO_FW_UPDATE, 1),
        tdisp.GetDeviceInterfaceReport(fid, 0, 0x400), tdisp.GetDeviceInterfaceState(fid),
        tdisp.StartInterfaceRequest(fid, bytes(range(32))), tdisp.StopInterfaceRequest(fid))]


def tdisp_responses(rid: int = 0x0100) -> list[bytes]:
    fid = function_id(rid)
    return [m.encode() for m in (
        tdisp.TdispVersion(fid), tdisp.LockInterfaceResponse(fid, os.urandom(32)),
        tdisp.StartInterfaceResponse(fid), tdisp.StopInterfaceResponse(fid))]


def vendor(version: int, payload: bytes) -> bytes:
    """A PCI-SIG VENDOR_DEFINED_REQUEST carrying *payload* (IDE_KM or TDISP)."""
    return codec.VendorDefinedRequest(version, PCI_SIG_STANDARD_ID,
                                      PCI_SIG_VENDOR_ID.to_bytes(2, "little"), payload).encode()


def session_requests(version: int, rid: int) -> list[bytes]:
    """Application messages a TSM sends inside a session."""
    out = [codec.Heartbeat(version).encode(), codec.KeyUpdate(version, 1, 1).encode(),
           codec.EndSession(version).encode()]
    out += [vendor(version, o) for o in ide_km_objects()[:6]]
    out += [vendor(version, tdisp.to_vendor_payload(tdisp.decode_message(m)))
            for m in tdisp_requests(rid)]
    return out


__all__ = ["Rig", "identity", "ide_km_objects", "rig", "session_requests",
           "spdm_transcript", "tdisp_requests", "tdisp_responses", "vendor"]
