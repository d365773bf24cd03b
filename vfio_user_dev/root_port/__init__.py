"""The root port (PCIe 6.x §6.33 IDE, §11.2.1; TDISP §11): the only part of the device
server that maps guest RAM.  :class:`RootPort` is the façade over its parts: ``streams``
(IDE stream ends), ``windows`` (trusted-DMA windows), ``mmio`` (private MMIO), ``ingress``
(checks on the device's TLPs) and ``memory`` (DMA and completions).  Design notes:
docs/root-port-internals.md."""

from vfio_user_dev.root_port.context import RECENT, RootPortError
from vfio_user_dev.root_port.port import RootPort
from vfio_user_dev.root_port.streams import RootPortStream
from vfio_user_dev.root_port.windows import Window

__all__ = ["RECENT", "RootPort", "RootPortError", "RootPortStream", "Window"]
