"""The host's access to the device's IDE capability registers, served on the platform socket.

Two operations, ``ide_config_read`` and ``ide_config_write`` (registered by
:func:`register`), through which the TSM writes on the host's behalf the config registers a
stream needs besides IDE_KM (PCIe 6.x §7.9.26), on QEMU's config-write path.  The untrusted
host's own path is the host access socket (``host_access.py``).  Their arguments:
docs/ide-and-link.md, "The host's IDE registers on the platform socket".
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
