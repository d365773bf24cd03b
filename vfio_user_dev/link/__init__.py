"""The emulated PCIe link between the device and its root port (PCIe 6.x §2 TLPs, §6.33
IDE, §11.2.1 the T bit), with taps.

* :mod:`.interfaces` -- what both ends share: directions, IDs, errors, the root port's side;
* :mod:`.wire` -- :class:`Link`: bursts of TLPs both ways through the taps;
* :mod:`.endpoint` -- :class:`LinkEndpoint`: the device's end (DMA requester, MMIO completer);
* :mod:`.reads`, :mod:`.tags` -- outstanding reads, their tags and completions;
* :mod:`.streams` -- the IDE stream at each end;
* :mod:`.faults` -- fault injection; :mod:`.capture` -- pcapng capture files;
* :mod:`.capture_cli` -- ``python -m vfio_user_dev.link FILE`` lists a capture.

TLP sizing (MPS / MRRS / RCB) and wire-byte helpers live in :mod:`teeio.tlp`; they are
re-exported here for the importers of old.
"""

from __future__ import annotations

from teeio.tlp import (
    RCB,
    TLP_SIZES,
    check_tlp_size,
    completion_spans,
    count_completions,
    count_pieces,
    count_read_tlps,
    is_protected,
    peek,
    prefix_stream_id,
    split,
)
from vfio_user_dev.link.capture import (
    CaptureFlags,
    CaptureRecord,
    CaptureWriter,
    iter_tlps,
    pcapng_header,
    pcapng_packet,
    read_capture,
)
from vfio_user_dev.link.capture_cli import main
from vfio_user_dev.link.endpoint import LinkEndpoint
from vfio_user_dev.link.faults import Fault, FaultKind, TlpView
from vfio_user_dev.link.interfaces import (
    DEFAULT_MPS,
    DEFAULT_MRRS,
    DEFAULT_REQUESTER_ID,
    ROOT_PORT_ID,
    IdeFailEvent,
    LinkDirection,
    LinkError,
    LinkFault,
    MmioCompleter,
    MmioRequest,
    RootPortPort,
    RootPortReply,
)
from vfio_user_dev.link.streams import (
    CapStreamPort,
    IdeStreamEnd,
    StreamPort,
    capability_streams,
)
from vfio_user_dev.link.tags import MAX_OUTSTANDING, TAGS_5BIT, TagAllocator, read_headers
from vfio_user_dev.link.wire import Link

__all__ = [
    "DEFAULT_MPS", "DEFAULT_MRRS", "DEFAULT_REQUESTER_ID", "MAX_OUTSTANDING", "RCB",
    "ROOT_PORT_ID", "TAGS_5BIT", "TLP_SIZES", "CapStreamPort", "CaptureFlags",
    "CaptureRecord", "CaptureWriter", "Fault", "FaultKind", "IdeFailEvent", "IdeStreamEnd",
    "Link", "LinkDirection", "LinkEndpoint", "LinkError", "LinkFault", "MmioCompleter",
    "MmioRequest", "RootPortPort", "RootPortReply", "StreamPort", "TagAllocator", "TlpView",
    "capability_streams", "check_tlp_size", "completion_spans", "count_completions",
    "count_pieces", "count_read_tlps", "is_protected", "iter_tlps", "main", "pcapng_header",
    "pcapng_packet", "peek", "prefix_stream_id", "read_capture", "read_headers", "split",
]
