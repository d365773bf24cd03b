"""The host's access to the device's IDE capability registers, served on the platform socket.

Setting up an IDE stream takes config writes to the device's IDE extended capability
(PCIe 6.x §7.9.26) as well as IDE_KM: Linux's ``drivers/pci/ide.c`` writes a Selective
stream block's RID Association and Control (Stream ID, Enable 0) before the keys are
programmed, and sets Enable afterwards.  On a real platform the host does that through
its own path to the physical function (sysfs config access).  docs/design.md decision 12 plans
such a host access socket for the device server; until it exists, these registers are
reachable as two extra operations of the platform control socket (``platform_ctl.py``),
registered here by :func:`register`:

=====================  ===================================================================
``ide_config_read``    -- → ``{"offset": the capability's config offset, "header": u32,
                       "registers": [u32, ...] (the capability minus its header, as in
                       IDE_KM QUERY_RESP), "streams": [...] (``TeeIoDevice.ide_status``)}``
``ide_config_write``   ``offset`` (absolute config offset, DW-aligned, inside the IDE
                       capability), ``value`` (u32) → ``{"value": the register after it}``
=====================  ===================================================================

A write goes through :meth:`TeeIoDevice.region_write` on the config region -- the very
path QEMU's config writes take -- so the register masks, RW1C bits and the capability's
reactions (Enable → Secure once every key is GO, Stream ID changes...) are those of any
other config write.  Only the IDE capability's window is writable here.

Not faithful: the platform socket needs the TSM's credential, so in this emulator the
TSM writes these registers on the host's behalf (``tsm/ide.py``).  The untrusted host's
own path, on which it can also write them behind the TSM's back (a locked TDI then goes
to ERROR, PCIe 6.x §11.2.6), is the host access socket (``host_access.py``).
"""

from __future__ import annotations

from typing import Any

from teeio.platform_channel import PlatformCtlError
from vfio_user_dev.device import TeeIoDevice
from vfio_user_dev.platform_ctl import PlatformControlServer
from vfio_user_dev.protocol import PciRegion

__all__ = ["OPS", "register"]

OPS = ("ide_config_read", "ide_config_write")


def _int(args: dict[str, Any], name: str, limit: int) -> int:
    v = args.get(name)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit:
        raise PlatformCtlError("bad_args", f"{name!r} must be an integer 0..{limit - 1:#x}")
    return v


def register(server: PlatformControlServer, device: TeeIoDevice) -> None:
    """Add the ``ide_config_read`` / ``ide_config_write`` operations to *server*."""

    def read(_session: object, _seq: int, _args: dict[str, Any]) -> dict[str, Any]:
        cap = device.ide
        raw = device.region_read(PciRegion.CONFIG, cap.offset, cap.end - cap.offset)
        words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
        return {"offset": cap.offset, "header": words[0], "registers": words[1:],
                "streams": device.ide_status()}

    def write(_session: object, _seq: int, args: dict[str, Any]) -> dict[str, Any]:
        offset = _int(args, "offset", 0x1000)
        value = _int(args, "value", 1 << 32)
        cap = device.ide
        if offset % 4 or not cap.offset <= offset < cap.end:
            raise PlatformCtlError("bad_args", f"offset {offset:#x} is not a DW of the IDE "
                                               f"capability ({cap.offset:#x}..{cap.end:#x})")
        device.region_write(PciRegion.CONFIG, offset, value.to_bytes(4, "little"))
        now = device.region_read(PciRegion.CONFIG, offset, 4)
        return {"value": int.from_bytes(now, "little")}

    server.ops["ide_config_read"] = read
    server.ops["ide_config_write"] = write
