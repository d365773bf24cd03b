"""Transaction Layer Packets, non-flit mode (PCIe 6.x §2.2), with the IDE TLP prefix
(§6.33.4) that carries the T bit (§11.2.1) and the Stream ID.

* :mod:`.fields` -- header field encodings (Fmt/Type, Completion Status, byte enables);
* :mod:`.prefix` -- the IDE prefix and the framing of an IDE TLP on the wire;
* :mod:`.packet` -- :class:`Tlp`: one TLP, built, encoded and decoded;
* :mod:`.build_runs` / :mod:`.parse_runs` -- runs of TLPs as bytes (the link's fast path);
* :mod:`.sizing` -- MPS / MRRS / RCB splitting arithmetic (§2.2.7, §2.3.1.1).
"""

from __future__ import annotations

from .build_runs import completion_parts, memory_read_headers, memory_write_parts
from .fields import (
    ADDR32_LIMIT,
    MAX_PAYLOAD,
    CplStatus,
    TlpDecodeError,
    TlpError,
    TlpType,
    byte_span,
)
from .packet import Tlp, peek
from .parse_runs import (
    CompletionFields,
    CompletionRun,
    RequestFields,
    RequestRun,
    cpl_payload_length,
    parse_ide_completion_runs,
    parse_ide_completions,
    parse_ide_request_runs,
    parse_ide_requests,
)
from .prefix import (
    IDE_PREFIX_BYTE0,
    MAC_BYTES,
    PREFIX_LEN,
    IdePrefix,
    SubStream,
    is_protected,
    prefix_stream_id,
    substream_of,
)
from .sizing import (
    RCB,
    TLP_SIZES,
    check_tlp_size,
    completion_spans,
    count_completions,
    count_pieces,
    count_read_tlps,
    split,
)
from .templates import (
    completion_headers,
    completion_run,
    completion_runs,
    memory_read_tagged,
    memory_write_split,
)

__all__ = [
    "ADDR32_LIMIT", "CompletionFields", "CompletionRun", "CplStatus", "IDE_PREFIX_BYTE0",
    "IdePrefix", "MAC_BYTES", "MAX_PAYLOAD", "PREFIX_LEN", "RCB", "RequestFields", "RequestRun",
    "SubStream", "TLP_SIZES", "Tlp", "TlpDecodeError", "TlpError", "TlpType", "byte_span",
    "check_tlp_size", "completion_headers", "completion_parts", "completion_runs",
    "memory_read_tagged", "completion_run", "completion_spans",
    "count_completions", "count_pieces", "count_read_tlps", "cpl_payload_length",
    "is_protected", "memory_read_headers", "memory_write_parts", "memory_write_split",
    "parse_ide_completion_runs", "parse_ide_completions", "parse_ide_request_runs",
    "parse_ide_requests", "peek", "prefix_stream_id", "split", "substream_of",
]
