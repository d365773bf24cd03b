"""A device with its DSM, root port, platform socket and guest memory, driven the way the
TSM drives it in-process (tsm.ide.SelectiveStream, tsm.tdisp.TdispClient over an SPDM
secured session; PCIe 6.x §6.33 IDE, TDISP 1.0)."""

from __future__ import annotations

import os
import secrets
import threading
from pathlib import Path

from teeio import pki
from teeio.device_regs import R, St
from teeio.doe import PCI_SIG_VENDOR_ID, DoeObject, pad_dw
from teeio.ide_km import PCI_SIG_STANDARD_ID, IdeKmClient
from teeio.measurements import DmtfValueType, MeasurementSource
from teeio.pcie.config import Command, Reg
from teeio.platform_channel import PlatformClient
from teeio.spdm import Requester
from teeio.tdisp.codec import function_id
from teeio.tdisp.defs import LockInterfaceFlags, TdiState
from tsm.ide import SelectiveStream
from tsm.tdisp import TdispClient
from vfio_user_dev import ide_host
from vfio_user_dev.dsm import DeviceSecurityManager
from vfio_user_dev.link.capture import CaptureWriter, read_capture
from vfio_user_dev.personality import PersonalityFactory
from vfio_user_dev.personality.accelerator import AcceleratorPersonality
from vfio_user_dev.platform import Platform
from vfio_user_dev.platform_ctl import PlatformControlServer
from vfio_user_dev.protocol import DmaFlags, PciRegion

GUEST = 0x1_0000_0000
GUEST_SIZE = 0x20000
WIN = GUEST + 0x10000          # the TVM's private buffer (a trusted-DMA window in RUN)
WIN_SIZE = 0x4000
SID = 1                        # the Selective IDE stream the TSM sets up (block 0)
BAR0_ADDR, BAR1_ADDR = 0xFE00_0000, 0xFE00_1000
MEASUREMENTS = (MeasurementSource(1, DmtfValueType.MUTABLE_FIRMWARE, b"firmware code"),)


class FakeClock:
    """An injectable monotonic clock (seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class TeeRig:
    """One device with its DSM, root port, platform socket and guest memory; the TSM's
    side of every step."""

    def __init__(self, tmp: Path, identity: pki.Identity, *, capture: bool = False,
                 heartbeat_period: int = 60,
                 personality: PersonalityFactory = AcceleratorPersonality) -> None:
        self.clock = FakeClock()
        self.capture_path = tmp / "link.pcap" if capture else None
        self.machine = Platform(capture=CaptureWriter(self.capture_path)
                                if self.capture_path else None, personality=personality)
        self.device = self.machine.device
        self.rid = self.device.link_end.requester_id
        self.fd = os.memfd_create("tee-guest")
        os.ftruncate(self.fd, GUEST_SIZE)
        self.machine.dma.map(GUEST, GUEST_SIZE, DmaFlags.READ | DmaFlags.WRITE, 0,
                            os.dup(self.fd))
        self.identity = identity
        self.dsm = DeviceSecurityManager(identity, MEASUREMENTS, name="dsm",
                                         heartbeat_period=heartbeat_period, clock=self.clock)
        self.dsm.attach(self.device.doe, self.device.ide, requester_id=self.rid,
                        tdi=self.device)
        token = secrets.token_bytes(32)
        self.platform = PlatformControlServer(str(tmp / "platform.sock"), token,
                                              self.machine.root_port, self.machine.link)
        ide_host.register(self.platform, self.device)
        self.platform.start()
        self.rp = PlatformClient(str(tmp / "platform.sock"), token)
        # The VMM assigned the BARs and enabled the function.
        self.cfg_write(Reg.BAR0, BAR0_ADDR)            # (a 64-bit BAR0's upper half: 0)
        self.msix_addr = max(BAR1_ADDR, BAR0_ADDR + self.device.layout.bar0_size)
        self.cfg_write(Reg.BAR0 + 4 * self.device.msix_bar, self.msix_addr)
        self.cfg_write(Reg.COMMAND, Command.MEMORY_SPACE | Command.BUS_MASTER)
        self.req = self.requester()
        self.sid = self.req.start_session(0)
        self.tdisp = TdispClient(self.req, self.sid, function_id(self.rid))
        self.stream: SelectiveStream | None = None
        self.window_id: int | None = None
        self._done = threading.Event()
        self.device.listeners.append(lambda _dev: self._done.set())

    # -- plumbing ---------------------------------------------------------------------------
    def doe(self, doe_type: int, payload: bytes) -> bytes:
        rsp = self.device.doe.handle_object(
            DoeObject(PCI_SIG_VENDOR_ID, doe_type, pad_dw(payload)).encode())
        return b"" if rsp is None else DoeObject.decode(rsp).payload

    def requester(self) -> Requester:
        req = Requester(self.doe, [self.identity.root], name="tsm")
        req.init_connection()
        req.get_digests()
        req.get_certificate(0)
        return req

    def km(self, sid: int | None = None) -> IdeKmClient:
        s = self.sid if sid is None else sid
        return IdeKmClient(lambda p: self.req.vendor_request(PCI_SIG_STANDARD_ID,
                                                             PCI_SIG_VENDOR_ID, p, s), 0)

    def cfg_write(self, off: int, value: int, size: int = 4) -> None:
        self.machine.region_write(PciRegion.CONFIG, off, value.to_bytes(size, "little"))

    def cfg_read(self, off: int, size: int = 4) -> int:
        return int.from_bytes(self.machine.region_read(PciRegion.CONFIG, off, size), "little")

    def mem(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    def poke(self, offset: int, data: bytes) -> None:
        os.pwrite(self.fd, data, offset)

    def records(self) -> list[bytes]:
        assert self.capture_path is not None and self.machine.link.capture is not None
        self.machine.link.capture.flush()
        return [r.data for r in read_capture(self.capture_path)]

    # -- MMIO: the VMM's (QEMU's region access) and the host's (always T=0) -------------------
    def bar0_read(self, off: int, host: bool = False) -> int:
        return int.from_bytes(self.machine.region_read(PciRegion.BAR0, off, 4, host=host),
                              "little")

    def bar0_write(self, off: int, value: int, host: bool = False) -> None:
        self.machine.region_write(PciRegion.BAR0, off, value.to_bytes(4, "little"), host=host)

    # -- the TSM's steps ----------------------------------------------------------------------
    def setup_stream(self) -> SelectiveStream:
        self.stream = SelectiveStream(self.rp, self.km(), stream_id=SID, block=0,
                                      out=lambda _line: None)
        self.stream.setup()
        return self.stream

    def lock(self, flags: int = LockInterfaceFlags.NO_FW_UPDATE) -> bytes:
        if self.stream is None:
            self.setup_stream()
        return self.tdisp.lock(flags, SID)

    def run(self, flags: int = LockInterfaceFlags.NO_FW_UPDATE) -> None:
        """What the TSM does up to the TVM's use: stream, LOCK, START, window, private
        MMIO."""
        self.tdisp.start(self.lock(flags))
        self.window_id = int(self.rp.call("window_authorise", requester_id=self.rid,
                                          stream_id=SID, base=WIN, size=WIN_SIZE,
                                          access="rw")["id"])
        self.private_mmio(True)

    def private_mmio(self, enable: bool) -> None:
        self.rp.call("mmio_private", requester_id=self.rid, stream_id=SID, enable=enable)

    def state(self) -> TdiState:
        return self.device.tdi_state()

    # -- DMA --------------------------------------------------------------------------------
    def dma_direct(self, op: int, src: int, dst: int, length: int,
                   pattern: int = 0) -> int:
        """Start a job in the engine directly (as if the registers had been written) and
        wait for it: the STATUS register after it."""
        dev = self.device
        self._done.clear()
        with dev._lock:
            for reg, v in ((R.DMA_SRC_LO, src & 0xFFFFFFFF), (R.DMA_SRC_HI, src >> 32),
                           (R.DMA_DST_LO, dst & 0xFFFFFFFF), (R.DMA_DST_HI, dst >> 32),
                           (R.DMA_LEN, length), (R.DMA_PATTERN, pattern)):
                dev.r[reg] = v
            dev.engine.start_job(op)
        assert self._done.wait(10), "DMA job did not finish"
        return dev.r[R.STATUS]

    def dma_mmio(self, op: int, src: int, dst: int, length: int, pattern: int = 0,
                 host: bool = False) -> None:
        """Program and start a job through BAR0 (QEMU's path, or the host's)."""
        self._done.clear()
        for reg, v in ((R.DMA_SRC_LO, src & 0xFFFFFFFF), (R.DMA_SRC_HI, src >> 32),
                       (R.DMA_DST_LO, dst & 0xFFFFFFFF), (R.DMA_DST_HI, dst >> 32),
                       (R.DMA_LEN, length), (R.DMA_PATTERN, pattern)):
            self.bar0_write(reg, v, host)
        self.bar0_write(R.DMA_CMD, 1 << 31 | op, host)

    def wait_job(self) -> int:
        assert self._done.wait(10), "DMA job did not finish"
        return self.device.r[R.STATUS]

    def close(self) -> None:
        self.rp.close()
        self.platform.close()
        self.dsm.close()
        self.machine.close()
        self.machine.dma.clear()
        os.close(self.fd)


def status_error(status: int) -> int | None:
    """STATUS.ERROR_CODE, or None if the job succeeded."""
    if status & St.DONE:
        return None
    assert status & St.ERROR, f"job neither done nor failed: STATUS {status:#x}"
    return status >> 8 & 0xFF
