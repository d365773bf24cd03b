"""The ctypes layer of the libvfio-user backend, without the library: declarations, the
missing-library sentence, callbacks that turn exceptions into errno, the IRQ sink."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import mmap
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from teeio.device_regs import Irq, R
from vfio_user_dev import libvfio_user as lvu
from vfio_user_dev.__main__ import main as device_main
from vfio_user_dev.config_space import MSIX_CAP, MSIX_ENABLE
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.irq import IrqController
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import DmaFlags, PciIrq, PciRegion, ProtocolError

ROOT = Path(__file__).resolve().parents[2]

# -- declarations -----------------------------------------------------------------------------

class FakeLib:
    """Stands in for the CDLL: every attribute is a plain object that records what
    ``declare`` sets on it."""

    def __init__(self) -> None:
        self.functions: dict[str, SimpleNamespace] = {}

    def __getattr__(self, name: str) -> SimpleNamespace:
        return self.functions.setdefault(name, SimpleNamespace())


def test_declare_sets_restype_and_argtypes_of_every_function() -> None:
    lib = FakeLib()
    lvu.declare(lib)
    assert set(lib.functions) == set(lvu.SIGNATURES)
    for name, fn in lib.functions.items():
        assert hasattr(fn, "restype") and hasattr(fn, "argtypes"), name
        assert isinstance(fn.argtypes, list), name


def test_pointers_and_sizes_are_not_ints() -> None:
    sig = lvu.SIGNATURES
    assert sig["vfu_create_ctx"][0] is ctypes.c_void_p      # a vfu_ctx_t *, not a 32-bit int
    assert sig["dma_sg_size"][0] is ctypes.c_size_t
    assert sig["vfu_destroy_ctx"][0] is None
    assert sig["vfu_pci_set_id"][0] is None
    for name, (_restype, argtypes) in sig.items():
        if name.startswith("vfu_") and name != "vfu_create_ctx":
            assert argtypes[0] is ctypes.c_void_p, f"{name}: the context is a pointer"
    assert sig["vfu_setup_region"][1][2] is ctypes.c_size_t          # size
    assert sig["vfu_setup_region"][1][8] is ctypes.c_uint64          # offset
    assert sig["vfu_addr_to_sgl"][1][1:3] == [ctypes.c_void_p, ctypes.c_size_t]
    assert sig["vfu_sgl_read"][1][3] is ctypes.c_void_p              # the data buffer


def test_callback_types_match_the_header() -> None:
    # ssize_t (vfu_ctx_t *, char *buf, size_t count, loff_t offset, bool is_write)
    assert lvu.RegionAccessCb._restype_ is ctypes.c_ssize_t
    assert lvu.RegionAccessCb._argtypes_ == (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                             ctypes.c_int64, ctypes.c_bool)
    use_errno = ctypes._FUNCFLAG_USE_ERRNO  # type: ignore[attr-defined]
    for cb in (lvu.RegionAccessCb, lvu.QuiesceCb, lvu.ResetCb):
        assert cb._flags_ & use_errno, cb            # errno set in Python reaches C
    assert lvu.DmaCb._restype_ is None and lvu.IrqStateCb._restype_ is None


def test_dma_info_layout() -> None:
    info = lvu.VfuDmaInfo
    assert ctypes.sizeof(info) == 56
    assert [getattr(info, f).offset for f in ("iova", "vaddr", "mapping", "page_size", "prot")] \
        == [0, 16, 24, 40, 48]


# -- without the library ------------------------------------------------------------------------

def test_missing_library_is_one_sentence_saying_how_to_point_to_it(tmp_path: Any) -> None:
    with pytest.raises(lvu.LibraryMissing) as exc:
        lvu.load(str(tmp_path / "libvfio-user.so.0"))
    text = str(exc.value)
    assert "\n" not in text
    assert "libvfio-user.so.0" in text
    assert "TEEIO_LIBVFIO_USER=/path/libvfio-user.so.0" in text


def test_missing_library_names_the_unset_variable() -> None:
    if ctypes.util.find_library("vfio-user"):
        pytest.skip("a libvfio-user is on the loader's search path here")
    # In a fresh process with a clean environment: dlopen by soname would find a copy an
    # earlier test loaded into this one by path (glibc matches loaded objects' SONAME).
    code = ("from vfio_user_dev import libvfio_user as lvu\n"
            "try:\n    lvu.load()\nexcept lvu.LibraryMissing as exc:\n    print(exc)\n"
            "else:\n    print('LOADED')\n")
    env = {"PATH": os.defpath, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=60, check=True)
    out = res.stdout.strip()
    assert "\n" not in out
    assert "TEEIO_LIBVFIO_USER is not set and the loader found none" in out
    assert "TEEIO_LIBVFIO_USER=/path/libvfio-user.so.0" in out


def test_a_library_without_the_functions_is_refused() -> None:
    libc = ctypes.util.find_library("c")
    assert libc is not None
    with pytest.raises(lvu.LibraryMissing, match="lacks a function"):
        lvu.load(libc)


def test_device_cli_without_the_library(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(lvu.ENV_VAR, str(tmp_path / "nowhere.so"))
    sock = tmp_path / "vfio-user.sock"
    assert device_main(["--socket", str(sock), "--backend", "libvfio-user"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the libvfio-user backend needs libvfio-user.so.0")
    assert "\n" not in err and "TEEIO_LIBVFIO_USER=" in err
    assert not sock.exists()


# -- callbacks: exceptions become errno, never escape into C -------------------------------------

@pytest.fixture
def callbacks(machine: Platform) -> lvu.DeviceCallbacks:
    return lvu.DeviceCallbacks(machine, on_lost_client=lambda: None)


def region_call(cb: lvu.DeviceCallbacks, index: int, buf: ctypes.Array[ctypes.c_char],
                offset: int, write: bool) -> int:
    """Call the region callback through its C function pointer, as the library would."""
    return int(cb.region[index](None, ctypes.addressof(buf), len(buf), offset, write))


def test_region_callbacks_serve_the_device(callbacks: lvu.DeviceCallbacks) -> None:
    buf = ctypes.create_string_buffer(4)
    assert region_call(callbacks, PciRegion.CONFIG, buf, 0, False) == 4
    assert buf.raw == bytes.fromhex("3412107e")          # vendor 1234, device 7E10
    buf = ctypes.create_string_buffer(b"\x78\x56\x34\x12", 4)
    assert region_call(callbacks, PciRegion.BAR0, buf, 0x008, True) == 4   # SCRATCH
    assert callbacks.device.r[0x008] == 0x12345678


@pytest.mark.parametrize("raised,err", [
    (RuntimeError("a bug in the device model"), errno.EIO),
    (ProtocolError(errno.EINVAL, "refused"), errno.EINVAL),
    (DmaFault("no map"), errno.EFAULT),
])
def test_exception_in_region_callback_becomes_errno(
        callbacks: lvu.DeviceCallbacks, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, raised: Exception, err: int) -> None:
    def broken(*_args: Any, **_kw: Any) -> bytes:
        raise raised
    monkeypatch.setattr(callbacks.platform, "region_read", broken)
    caplog.set_level(logging.DEBUG, logger=lvu.log.name)
    ctypes.set_errno(0)
    buf = ctypes.create_string_buffer(4)
    assert region_call(callbacks, PciRegion.CONFIG, buf, 0, False) == -1
    assert ctypes.get_errno() == err
    if err == errno.EIO:      # a bug: logged with its traceback
        rec = next(r for r in caplog.records if "region_access failed" in r.getMessage())
        assert rec.exc_info is not None and rec.exc_info[1] is raised


def test_short_region_read_is_eio_not_garbage(callbacks: lvu.DeviceCallbacks,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(callbacks.platform, "region_read", lambda *_a, **_k: b"\1\2")
    buf = ctypes.create_string_buffer(4)
    assert region_call(callbacks, PciRegion.BAR1, buf, 0, False) == -1
    assert ctypes.get_errno() == errno.EIO


def test_reset_callback(callbacks: lvu.DeviceCallbacks, device: TeeIoDevice) -> None:
    lost: list[bool] = []
    callbacks.on_lost_client = lambda: lost.append(True)
    generation = device.generation
    assert callbacks.reset(None, lvu.VfuResetType.VFU_RESET_DEVICE) == 0
    assert device.generation == generation + 1
    assert callbacks.reset(None, lvu.VfuResetType.VFU_RESET_LOST_CONN) == 0
    assert lost == [True]
    ctypes.set_errno(0)
    assert callbacks.reset(None, 42) == -1
    assert ctypes.get_errno() == errno.EINVAL
    assert callbacks.quiesce(None) == 0


def dma_info(iova: int, size: int, vaddr: int | None, prot: int) -> lvu.VfuDmaInfo:
    info = lvu.VfuDmaInfo()
    info.iova.iov_base, info.iova.iov_len = iova, size
    info.vaddr = vaddr
    info.prot = prot
    return info


def test_dma_register_maps_the_library_mapping(callbacks: lvu.DeviceCallbacks,
                                               machine: Platform) -> None:
    fd = os.memfd_create("lvu-unit")
    os.ftruncate(fd, 0x2000)
    mem = mmap.mmap(fd, 0x2000)
    try:
        vaddr = ctypes.addressof(ctypes.c_char.from_buffer(mem)) + 0x1000
        info = dma_info(0x10_0000, 0x1000, vaddr, mmap.PROT_READ | mmap.PROT_WRITE)
        callbacks.dma_register(None, ctypes.pointer(info))
        callbacks.dma_register(None, ctypes.pointer(info))   # announced again: no error
        assert machine.dma.snapshot() == [(0x10_0000, 0x1000, DmaFlags.READ | DmaFlags.WRITE,
                                          True)]
        machine.dma.write(0x10_0010, b"hello")
        assert mem[0x1010:0x1015] == b"hello"                # the same memory
        st = os.fstat(fd)
        (backing,) = machine.dma.backing(0x10_0000, 0x1000)
        assert backing.inode == (st.st_dev, st.st_ino) and backing.fd_offset == 0x1000
        callbacks.dma_unregister(None, ctypes.pointer(info))
        assert machine.dma.snapshot() == []
    finally:
        mem.close()
        os.close(fd)


def test_exception_in_void_callback_is_logged(callbacks: lvu.DeviceCallbacks,
                                              caplog: pytest.LogCaptureFixture) -> None:
    info = dma_info(0x20_0000, 0x1000, None, mmap.PROT_READ)
    callbacks.dma_unregister(None, ctypes.pointer(info))      # never mapped: ENOENT inside
    rec = next(r for r in caplog.records if "_dma_unregister failed" in r.getMessage())
    assert isinstance(rec.exc_info[1] if rec.exc_info else None, ProtocolError)


def test_irq_state_callback_masks_and_replays(callbacks: lvu.DeviceCallbacks,
                                              device: TeeIoDevice) -> None:
    callbacks.irq_state[PciIrq.MSIX](None, 0, 2, True)
    assert device.irq.masked[PciIrq.MSIX][:3] == [True, True, False]
    device.irq.pending[PciIrq.MSIX][1] = True
    fired: list[tuple[int, int]] = []
    device.irq.sink = SimpleNamespace(ready=lambda i, v: True, automask=True,
                                      signal=lambda i, v: fired.append((i, v)))  # type: ignore[assignment]
    callbacks.irq_state[PciIrq.MSIX](None, 1, 1, False)
    assert fired == [(PciIrq.MSIX, 1)] and not device.irq.pending[PciIrq.MSIX][1]


def test_log_callback_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=lvu.liblog.name)
    cb = lvu.LogFn(lvu.DeviceCallbacks._log)
    cb(None, 3, b"something failed: Invalid argument")
    cb(None, 99, None)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.ERROR, "something failed: Invalid argument"), (logging.INFO, "")]


# -- the IRQ sink: delivery reported back to the controller ---------------------------------------

class RecordingSink:
    def __init__(self, irq: IrqController, deliver: bool, ready: bool = True,
                 automask: bool = True) -> None:
        self.irq, self.deliver, self.is_ready = irq, deliver, ready
        self.automask = automask
        self.signals: list[tuple[int, int]] = []

    def ready(self, index: int, vector: int) -> bool:
        return self.is_ready

    def signal(self, index: int, vector: int) -> None:
        self.signals.append((index, vector))
        (self.irq.delivered if self.deliver else self.irq.undelivered)(index, vector)


def test_sink_delivery_counts_and_automasks_intx() -> None:
    irq = IrqController(4, lambda: True)
    irq.sink = sink = RecordingSink(irq, deliver=True)
    irq.set_intx(True)
    assert sink.signals == [(PciIrq.INTX, 0)] and irq.masked[PciIrq.INTX][0]
    assert irq.signalled_by_type == {"intx": 1, "msix": 0}
    irq.mask(PciIrq.INTX, range(1), False)     # the client's UNMASK: still asserted, again
    assert len(sink.signals) == 2 and irq.signalled == 2


def test_sink_undelivered_leaves_intx_unmasked_and_msix_pending() -> None:
    irq = IrqController(4, lambda: True)
    irq.sink = RecordingSink(irq, deliver=False)
    irq.set_intx(True)
    assert not irq.masked[PciIrq.INTX][0] and irq.signalled == 0
    irq.raise_msix(2)
    assert irq.pending[PciIrq.MSIX][2]
    irq.sink = RecordingSink(irq, deliver=True, ready=False)
    assert not irq.msix_ready(0)
    irq.raise_msix(3)
    assert irq.pending[PciIrq.MSIX][3]


def test_library_sink_follows_msix_enable(device: TeeIoDevice) -> None:
    sink = lvu.LibIrqSink(SimpleNamespace(device=device))  # type: ignore[arg-type]
    assert sink.ready(PciIrq.INTX, 0) and not sink.ready(PciIrq.MSIX, 0)
    device.region_write(PciRegion.CONFIG, MSIX_CAP + 2, MSIX_ENABLE.to_bytes(2, "little"))
    assert sink.ready(PciIrq.MSIX, 0) and not sink.ready(PciIrq.INTX, 0)
    assert not sink.ready(PciIrq.ERR, 0)


def test_the_library_has_every_declared_function() -> None:
    from tests.support.servers import libvfio_user_missing
    if (why := libvfio_user_missing()) is not None:
        pytest.skip(f"libvfio-user leg: {why}")
    lib = lvu.load(os.environ[lvu.ENV_VAR])
    for name, (restype, argtypes) in lvu.SIGNATURES.items():
        fn = getattr(lib, name)
        assert fn.restype is restype and fn.argtypes == argtypes, name
    assert int(lib.dma_sg_size()) > 0


def test_library_sink_does_not_automask(device: TeeIoDevice) -> None:
    assert lvu.LibIrqSink.automask is False


# -- callbacks: BaseException, quiesce ------------------------------------------------------------

@pytest.mark.parametrize("raised", [KeyboardInterrupt, SystemExit])
def test_base_exception_in_reset_is_an_error_not_success(
        callbacks: lvu.DeviceCallbacks, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, raised: type[BaseException]) -> None:
    def interrupted(*_a: Any) -> None:
        raise raised
    monkeypatch.setattr(callbacks.device, "reset", interrupted)
    ctypes.set_errno(0)
    # through the C function pointer, as the library calls it: ctypes alone would print
    # the exception and return 0 (a successful reset)
    assert callbacks.reset(None, lvu.VfuResetType.VFU_RESET_PCI_FLR) == -1
    assert ctypes.get_errno() == errno.EIO
    rec = next(r for r in caplog.records if "_reset failed" in r.getMessage())
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], raised)


def test_base_exception_in_void_callback_is_logged(callbacks: lvu.DeviceCallbacks,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    def interrupted(*_a: Any) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(callbacks.platform.dma, "unmap", interrupted)
    info = dma_info(0x20_0000, 0x1000, None, mmap.PROT_READ)
    callbacks.dma_unregister(None, ctypes.pointer(info))
    rec = next(r for r in caplog.records if "_dma_unregister failed" in r.getMessage())
    assert rec.exc_info is not None and isinstance(rec.exc_info[1], KeyboardInterrupt)


def test_quiesce_never_answers_ebusy(callbacks: lvu.DeviceCallbacks,
                                     device: TeeIoDevice) -> None:
    # The library would need vfu_device_quiesced after an EBUSY, which nothing here calls:
    # quiesce answers 0 at once, even while the device is busy (its lock held elsewhere).
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with device._lock:
            held.set()
            release.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5)
        for _ in range(3):
            ctypes.set_errno(0)
            started = time.monotonic()
            assert callbacks.quiesce(None) == 0
            assert time.monotonic() - started < 1
            assert ctypes.get_errno() != errno.EBUSY
    finally:
        release.set()
        t.join()


# -- INTx without automask (the library drops QEMU's unmask eventfd) ------------------------------

class IntxSink(RecordingSink):
    """A sink for a function without MSI-X Enable: only INTx can be delivered."""

    def ready(self, index: int, vector: int) -> bool:
        return index == PciIrq.INTX


def _event(device: TeeIoDevice) -> None:
    """A job completion: DMA_DONE raised in INT_STATUS."""
    with device._lock:
        device.r[R.INT_STATUS] |= Irq.DMA_DONE
        device.engine.update_irq(Irq.DMA_DONE)


def _ack(device: TeeIoDevice) -> None:
    with device._lock:
        device.r[R.INT_STATUS] = 0
        device.engine.update_irq(0)


def test_intx_keeps_coming_without_unmasks(callbacks: lvu.DeviceCallbacks,
                                           device: TeeIoDevice) -> None:
    # Under KVM, QEMU registers an INTx unmask eventfd; the library makes that one UNMASK
    # callback and drops the fd, so no UNMASK follows the guest's EOIs.
    device.irq.sink = sink = IntxSink(device.irq, deliver=True, automask=False)
    device.r[R.INT_ENABLE] = Irq.DMA_DONE
    callbacks.irq_state[PciIrq.INTX](None, 0, 1, False)      # the one UNMASK, at setup
    assert sink.signals == []
    for n in range(1, 4):                                     # acknowledged each time
        _event(device)
        assert len(sink.signals) == n and not device.irq.masked[PciIrq.INTX][0]
        _ack(device)
    _event(device)                    # not acknowledged: the line stays high ...
    _event(device)                    # ... and a new event re-evaluates it: delivered
    assert len(sink.signals) == 5
    assert sink.signals == [(PciIrq.INTX, 0)] * 5
    assert device.irq.signalled_by_type["intx"] == 5
    # a late UNMASK (TCG: QEMU sends one after the EOI) with the line high: once more
    callbacks.irq_state[PciIrq.INTX](None, 0, 1, False)
    assert len(sink.signals) == 6
    _ack(device)
    callbacks.irq_state[PciIrq.INTX](None, 0, 1, False)
    assert len(sink.signals) == 6


def test_intx_automask_kept_for_an_automasking_sink(device: TeeIoDevice) -> None:
    device.irq.sink = sink = IntxSink(device.irq, deliver=True, automask=True)
    device.r[R.INT_ENABLE] = Irq.DMA_DONE
    _event(device)
    _event(device)
    assert len(sink.signals) == 1 and device.irq.masked[PciIrq.INTX][0]
