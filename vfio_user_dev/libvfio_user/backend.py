"""The libvfio-user backend: the same :class:`~vfio_user_dev.platform.Platform` as the
pure-Python server (``server.py``), served by the field's C library (docs/design.md
decision 1) on a UNIX socket, one client at a time (vfio-user protocol spec, QEMU
docs/interop/vfio-user.rst).  The context set-up, the run thread, interrupts and DMA to
memory the library did not map.  Threads, quiesce, socket DMA and the differences from the
Python server: docs/device-internals.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import mmap
import os
import select
import socket
import threading
from typing import Any

from teeio.pcie.config import Reg
from teeio.transport import remove_stale_socket
from vfio_user_dev.dma import DmaFault
from vfio_user_dev.libvfio_user.bindings import (
    LIBVFIO_USER_FLAG_ATTACH_NB,
    LIBVFIO_USER_MAX_DMA_REGIONS,
    PCI_HEADER_TYPE_NORMAL,
    VFU_SGL_DIRECT_ACCESS,
    VfuDevType,
    VfuPciType,
    VfuRegionFlag,
    VfuTrans,
    load,
    oserror,
    syslog_level,
)
from vfio_user_dev.libvfio_user.callbacks import DeviceCallbacks, liblog
from vfio_user_dev.platform import Platform
from vfio_user_dev.protocol import PciIrq, PciRegion, RegionFlags

log = logging.getLogger("vfio_user_dev.libvfio_user")     # the backend's one log

SOCKET_DMA_OPTION = "--libvfio-user-socket-dma"


class LibVfioUserServer:
    """Serves *device* on the UNIX socket *path* through libvfio-user, one client at a
    time; the same interface as :class:`vfio_user_dev.server.Server` (``serve_forever``,
    ``close``, ``clients``).  *socket_dma*: reach memory without an fd with DMA_READ/
    DMA_WRITE messages despite the risk (docs/device-internals.md, Socket DMA); refused
    otherwise."""

    def __init__(self, path: str, platform: Platform, lib: Any | None = None, *,
                 socket_dma: bool = False) -> None:
        self.path = path
        self.platform = platform
        self.device = platform.device
        self.lib = lib if lib is not None else load()
        self.socket_dma = socket_dma
        self.clients = 0
        self.max_clients: int | None = None
        self._lock = threading.RLock()          # the context lock (docs/device-internals.md)
        self._stop = threading.Event()
        self._attached = False
        self._socket_dma_refusal_logged = False
        # Interrupts waiting for the context lock: (index, vector, device generation).
        # _queue_lock also guards the wake pipe's fds (written, read, closed under it).
        self._pending_irqs: list[tuple[int, int, int]] = []
        self._queue_lock = threading.Lock()
        # Our own dup of the client connection (made under the context lock when it is
        # attached): close() shuts it down without asking the library, which it may not
        # call unlocked; closed when the client is lost and when the context is destroyed.
        self._conn: socket.socket | None = None
        self._conn_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._sg_size = int(self.lib.dma_sg_size())
        self.callbacks = DeviceCallbacks(platform, self._lost_client)
        remove_stale_socket(path)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        ctx = self.lib.vfu_create_ctx(VfuTrans.VFU_TRANS_SOCK, path.encode(),
                                      LIBVFIO_USER_FLAG_ATTACH_NB, None,
                                      VfuDevType.VFU_DEV_TYPE_PCI)
        if not ctx:
            err = oserror(f"vfu_create_ctx({path})")
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise err
        self._ctx: int | None = ctx
        try:
            self._setup(ctx)
        except BaseException:
            self._destroy()
            raise
        self._irq_sink = LibIrqSink(self)
        self.device.irq.sink = self._irq_sink

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise oserror(what)

    def _setup(self, ctx: int) -> None:
        lib, cb, dev = self.lib, self.callbacks, self.device
        self._check(lib.vfu_setup_log(ctx, cb.log, syslog_level(liblog)), "vfu_setup_log")
        self._check(lib.vfu_pci_init(ctx, VfuPciType.VFU_PCI_TYPE_EXPRESS,
                                     PCI_HEADER_TYPE_NORMAL, 0), "vfu_pci_init")
        cfg = dev.config
        lib.vfu_pci_set_id(ctx, cfg.get(Reg.VENDOR_ID, 2), cfg.get(Reg.DEVICE_ID, 2),
                           cfg.get(Reg.SUBSYSTEM_VENDOR_ID, 2), cfg.get(Reg.SUBSYSTEM_ID, 2))
        klass = cfg.get(Reg.CLASS_CODE, 3)
        lib.vfu_pci_set_class(ctx, klass >> 16, (klass >> 8) & 0xFF, klass & 0xFF)
        for index, spec in dev.REGIONS.items():
            flags = VfuRegionFlag(0)
            if spec.flags & RegionFlags.READ:
                flags |= VfuRegionFlag.VFU_REGION_FLAG_READ
            if spec.flags & RegionFlags.WRITE:
                flags |= VfuRegionFlag.VFU_REGION_FLAG_WRITE
            # Config space: every access to the device's callback.  BARs: memory, no fd,
            # so never mappable: every access traps (docs/design.md decision 7).
            flags |= (VfuRegionFlag.VFU_REGION_FLAG_ALWAYS_CB if index == PciRegion.CONFIG
                      else VfuRegionFlag.VFU_REGION_FLAG_MEM)
            self._check(lib.vfu_setup_region(ctx, int(index), spec.size, cb.region[int(index)],
                                             int(flags), None, 0, -1, 0),
                        f"vfu_setup_region({PciRegion(index).name})")
        self._check(lib.vfu_setup_device_reset_cb(ctx, cb.reset), "vfu_setup_device_reset_cb")
        lib.vfu_setup_device_quiesce_cb(ctx, cb.quiesce)
        self._check(lib.vfu_setup_device_dma(ctx, LIBVFIO_USER_MAX_DMA_REGIONS,
                                             cb.dma_register, cb.dma_unregister),
                    "vfu_setup_device_dma")
        for irq, count in dev.irq.counts.items():
            self._check(lib.vfu_setup_device_nr_irqs(ctx, int(irq), count),
                        f"vfu_setup_device_nr_irqs({PciIrq(irq).name})")
        for irq, state_cb in cb.irq_state.items():
            self._check(lib.vfu_setup_irq_state_callback(ctx, irq, state_cb),
                        f"vfu_setup_irq_state_callback({PciIrq(irq).name})")
        self._check(lib.vfu_realize_ctx(ctx), "vfu_realize_ctx")

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        """Start the run thread (vfu_attach_ctx, vfu_run_ctx)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="libvfio-user", daemon=True)
            self._thread.start()

    def serve_forever(self, max_clients: int | None = None) -> None:
        self.max_clients = max_clients
        log.info("listening on %s (libvfio-user)", self.path)
        self.start()
        assert self._thread is not None
        while self._thread.is_alive():
            self._thread.join(0.2)      # in steps, so that signal handlers run

    def close(self) -> None:
        self._stop.set()
        self._wake()
        thread = self._thread
        if thread is None:
            with self._lock:
                self._destroy()
            return
        if thread is threading.current_thread():
            return
        thread.join(2)
        if thread.is_alive():
            # Stuck inside the library waiting for a client that sends nothing: shut the
            # connection down under it, through our own dup (the library is not asked).
            self._shutdown_conn()
            thread.join(5)
            if thread.is_alive():
                log.error("libvfio-user run thread did not stop within 7 s of close(); "
                          "leaving it (a daemon thread) and the context behind")

    def _shutdown_conn(self) -> None:
        """Shut the client connection down (both directions) through our dup: the library
        then sees the client gone and resets."""
        with self._conn_lock:
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)

    def _close_conn(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _wake(self) -> None:
        with self._queue_lock:
            self._wake_locked()

    def _wake_locked(self) -> None:
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):      # full (non-blocking): already woken
                os.write(self._wake_w, b"!")

    def _destroy(self) -> None:
        """Destroy the context (under the lock, or before any thread runs): the library
        unregisters the DMA maps, resets, closes the eventfds and removes the socket."""
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            self.lib.vfu_destroy_ctx(ctx)
        self._close_conn()
        if self.device.irq.sink is getattr(self, "_irq_sink", None):
            self.device.irq.sink = None
        with self._queue_lock:
            self._pending_irqs.clear()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)
            self._wake_r = self._wake_w = -1

    # -- the run thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                with self._lock:
                    assert self._ctx is not None
                    fd = int(self.lib.vfu_get_poll_fd(self._ctx))
                wake = self._wake_r     # closed only by _destroy, on this thread
                try:
                    ready, _, _ = select.select([fd, wake], [], [])
                except OSError:
                    continue        # the fd went away under us (a reset in a DMA call)
                if wake in ready:
                    with self._queue_lock, contextlib.suppress(BlockingIOError):
                        os.read(wake, 4096)
                with self._lock:
                    self._flush_irqs()
                if self._stop.is_set() or fd not in ready:
                    continue
                if not self._attached:
                    self._attach()
                else:
                    self._serve()
                if (self.max_clients is not None and self.clients >= self.max_clients
                        and not self._attached):
                    break
        except Exception:
            log.exception("libvfio-user run thread failed")
        finally:
            with self._lock:
                self._destroy()

    def _attach(self) -> None:
        with self._lock:
            assert self._ctx is not None
            self.clients += 1       # counted when accepted, as the Python server does
            if self.lib.vfu_attach_ctx(self._ctx) < 0:
                self.clients -= 1
                err = ctypes.get_errno()
                if err not in (errno.EAGAIN, errno.EWOULDBLOCK):
                    log.warning("client not attached: %s", os.strerror(err))
                return
            self._attached = True
            self.platform.events.emit("client_connected", client=self.clients,
                                    transport="libvfio-user")
            self.platform.dma.remote_read = self._remote_read
            self.platform.dma.remote_write = self._remote_write
            fd = int(self.lib.vfu_get_poll_fd(self._ctx))
            try:
                conn = socket.socket(fileno=os.dup(fd))
            except OSError as exc:
                log.warning("no dup of the client connection (fd %d): %s", fd, exc)
            else:
                with self._conn_lock:
                    old, self._conn = self._conn, conn
                if old is not None:
                    old.close()
        log.info("client connected (libvfio-user negotiated VERSION)")

    def _serve(self) -> None:
        """Handle the requests waiting on the socket, one per call and lock hold."""
        while not self._stop.is_set():
            with self._lock:
                if self._ctx is None or not self._attached:
                    return
                rc = int(self.lib.vfu_run_ctx(self._ctx))
                err = ctypes.get_errno()
                self._flush_irqs()
            if rc == 0:
                return
            if rc < 0:
                if err == errno.ENOTCONN:
                    log.info("client disconnected")
                else:
                    log.warning("vfu_run_ctx: %s", os.strerror(err))
                return

    def _lost_client(self) -> None:
        """The library's VFU_RESET_LOST_CONN: the client is gone (its DMA maps were
        unregistered just before); drop its state and reset the device, as the Python
        server does.  Also called when the context is destroyed."""
        if not self._attached:
            return
        self._attached = False
        self._close_conn()
        with self._queue_lock:
            # An interrupt queued for the lost client must not reach the next one (as a
            # PBA bit set when it turns out undeliverable); entries also carry the device
            # generation, which the reset below moves on, for any queued after this.
            self._pending_irqs.clear()
            self._wake_locked()     # the run thread polls another fd now (a reset may
                                    # come from a DMA call on the engine thread)
        self.platform.dma.remote_read = None
        self.platform.dma.remote_write = None
        self.callbacks.ops.client_gone("connection lost", self.clients)

    # -- interrupts ---------------------------------------------------------------------------
    def trigger(self, index: int, vector: int) -> None:
        """vfu_irq_trigger now if the context lock is free (or ours), else on the run
        thread; the IRQ controller hears the outcome."""
        if self._lock.acquire(blocking=False):
            try:
                self._trigger_now(index, vector)
            finally:
                self._lock.release()
            return
        with self._queue_lock:
            self._pending_irqs.append((index, vector, self.device.generation))
            if len(self._pending_irqs) == 1:    # empty -> non-empty: wake the run thread
                self._wake_locked()

    def _flush_irqs(self) -> None:
        """Trigger the queued interrupts (under the context lock); one queued before a
        reset of the device (or the loss of its client) is dropped silently."""
        with self._queue_lock:
            pending, self._pending_irqs = self._pending_irqs, []
        for index, vector, generation in pending:
            if generation != self.device.generation:
                log.debug("queued %s %d dropped: the device was reset since",
                          PciIrq(index).name, vector)
                continue
            self._trigger_now(index, vector)

    def _trigger_now(self, index: int, vector: int) -> None:
        irq = self.device.irq
        if self._ctx is None or not self._attached:
            irq.undelivered(index, vector)
            return
        if self.lib.vfu_irq_trigger(self._ctx, vector) < 0:
            err = ctypes.get_errno()
            log.debug("vfu_irq_trigger(%s %d): %s", PciIrq(index).name, vector,
                      os.strerror(err))
            irq.undelivered(index, vector)
            return
        irq.delivered(index, vector)

    # -- DMA to memory the library did not map (vfu_sgl_read / vfu_sgl_write) ----------------
    def _sgl(self, address: int, length: int, prot: int) -> ctypes.Array[ctypes.c_char]:
        """One scatter/gather entry for guest *address*+*length* (under the lock)."""
        assert self._ctx is not None
        sg = ctypes.create_string_buffer(self._sg_size)
        n = int(self.lib.vfu_addr_to_sgl(self._ctx, address, length, sg, 1, prot))
        if n == 1:
            return sg
        if n < -1:
            raise DmaFault(f"DMA {address:#x}+{length:#x} spans {-n - 1} library regions")
        raise DmaFault(f"DMA {address:#x}+{length:#x}: {os.strerror(ctypes.get_errno())}")

    def _refuse_socket_dma(self, what: str, address: int, length: int) -> DmaFault:
        if not self._socket_dma_refusal_logged:
            self._socket_dma_refusal_logged = True
            log.error("DMA to guest memory without an fd (DMA_MAP without one: QEMU without "
                      "share=on guest RAM) refused: libvfio-user would send DMA_READ/"
                      "DMA_WRITE and take a client command sent meanwhile for the reply, "
                      "desynchronising the connection (libvfio-user issue 279); the job "
                      "ends with FAULT. Share guest RAM as an fd, use the python backend, "
                      "or accept the risk with %s", SOCKET_DMA_OPTION)
        return DmaFault(f"DMA {what} {address:#x}+{length:#x}: memory without an fd, socket "
                        f"DMA refused on the libvfio-user backend ({SOCKET_DMA_OPTION})")

    def _sgl_failed(self, call: str, address: int, length: int) -> DmaFault:
        """The DmaFault for a failed vfu_sgl_*; a reply out of step (EPROTO, EINVAL)
        shuts the connection down, so that the library resets rather than reading on."""
        err = ctypes.get_errno()
        if err in (errno.EPROTO, errno.EINVAL):
            log.error("%s %#x+%#x: %s: the connection is out of step; shutting it down",
                      call, address, length, os.strerror(err))
            self._shutdown_conn()
        return DmaFault(f"{call} {address:#x}+{length:#x}: {os.strerror(err) or 'failed'}")

    def _remote_read(self, address: int, length: int) -> bytes:
        if not self.socket_dma:
            raise self._refuse_socket_dma("read", address, length)
        with self._lock:
            if self._ctx is None or not self._attached:
                raise DmaFault(f"DMA read at {address:#x}: no client")
            sg = self._sgl(address, length, mmap.PROT_READ)
            buf = ctypes.create_string_buffer(length)
            if self.lib.vfu_sgl_read(self._ctx, sg, 1, buf, VFU_SGL_DIRECT_ACCESS) < 0:
                raise self._sgl_failed("vfu_sgl_read", address, length)
            return buf.raw

    def _remote_write(self, address: int, data: bytes) -> None:
        if not self.socket_dma:
            raise self._refuse_socket_dma("write", address, len(data))
        with self._lock:
            if self._ctx is None or not self._attached:
                raise DmaFault(f"DMA write at {address:#x}: no client")
            sg = self._sgl(address, len(data), mmap.PROT_WRITE)
            buf = ctypes.create_string_buffer(data, len(data))
            if self.lib.vfu_sgl_write(self._ctx, sg, 1, buf, VFU_SGL_DIRECT_ACCESS) < 0:
                raise self._sgl_failed("vfu_sgl_write", address, len(data))


class LibIrqSink:
    """The IRQ controller's sink when the library holds the client's eventfds.  The
    library keeps one eventfd array for INTx and MSI-X, so the device uses MSI-X when
    MSI-X Enable is set in its config space and INTx otherwise (PCIe 6.x §7.7.2.2)."""

    automask = False    # the library drops QEMU's INTx unmask eventfd (docs/device-internals.md)

    def __init__(self, server: LibVfioUserServer) -> None:
        self.server = server

    def ready(self, index: int, vector: int) -> bool:
        msix = self.server.device.msix_enabled()
        return msix if index == PciIrq.MSIX else index == PciIrq.INTX and not msix

    def signal(self, index: int, vector: int) -> None:
        self.server.trigger(index, vector)
