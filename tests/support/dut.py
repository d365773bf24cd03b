"""A device under test driven the way the TSM drives it, in-process: the device's DSM
answering SPDM over its DOE dispatcher, IDE_KM (PCIe 6.x §6.33.3) in a secured session,
and TDISP when a TDI is attached."""

from __future__ import annotations

from dataclasses import dataclass

from teeio import pki
from teeio.doe import PCI_SIG_VENDOR_ID, DoeObject, pad_dw
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import PCI_SIG_STANDARD_ID, IdeKmClient
from teeio.measurements import DmtfValueType, MeasurementSource
from teeio.spdm import Requester
from vfio_user_dev.device import IDE_CAP, TeeIoDevice
from vfio_user_dev.dsm import DeviceSecurityManager
from vfio_user_dev.protocol import PciRegion

MEASUREMENTS = (MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware code"),)
SEL0 = IDE_CAP + 0x14                     # selective block 0 (after the Link block)
SEL0_CTL, SEL0_STS = SEL0 + 4, SEL0 + 8


@dataclass
class Dut:
    device: TeeIoDevice
    dsm: DeviceSecurityManager
    identity: pki.Identity

    def send(self, doe_type: int, payload: bytes) -> bytes:
        rsp = self.device.doe.handle_object(
            DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)).encode())
        return b"" if rsp is None else DoeObject.decode(rsp).payload

    def raw(self, doe_type: int, payload: bytes) -> bytes | None:
        """One DOE object to the device: the response payload, or None (no response)."""
        rsp = self.device.doe.handle_object(
            DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)).encode())
        return None if rsp is None else DoeObject.decode(rsp).payload

    def requester(self) -> Requester:
        req = Requester(self.send, [self.identity.root], name="tsm")
        req.init_connection()
        req.get_digests()
        req.get_certificate(0)
        return req

    def cfg_write(self, off: int, value: int) -> None:
        self.device.region_write(PciRegion.CONFIG, off, value.to_bytes(4, "little"))

    def cfg_read(self, off: int) -> int:
        return int.from_bytes(self.device.region_read(PciRegion.CONFIG, off, 4), "little")

    def state(self) -> int:
        return self.cfg_read(SEL0_STS) & 0xF


def attach(device: TeeIoDevice, identity: pki.Identity, *, tdi: bool = False) -> Dut:
    """A DSM on *device*'s DOE and IDE; with *tdi*, also its TDISP responder for the
    device's TDI, which hears the device's security events."""
    dsm = DeviceSecurityManager(identity, MEASUREMENTS, name="dsm")
    if tdi:
        dsm.attach(device.doe, device.ide, requester_id=device.link_end.requester_id,
                   tdi=device)
        device.security_listeners.append(dsm.security_event)
    else:
        dsm.attach(device.doe, device.ide, requester_id=device.link_end.requester_id)
    return Dut(device, dsm, identity)


def km(req: Requester, sid: int, port: int = 0) -> IdeKmClient:
    return IdeKmClient(lambda p: req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, p,
                                                    sid), port)


def vendor(req: Requester, payload: bytes, sid: int | None) -> bytes:
    return req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, payload, sid)


def program_pr_keys(c: IdeKmClient, stream: int = 0) -> None:
    """What spdm-emu does before LOCK: K0 Rx and Tx PR keys of stream 0, then K_SET_GO."""
    c.query()
    for d in Direction:
        c.key_prog(stream, KeySet.K0, d, SubStream.PR, IdeKey.generate())
    for d in Direction:
        c.k_set_go(stream, KeySet.K0, d, SubStream.PR)
