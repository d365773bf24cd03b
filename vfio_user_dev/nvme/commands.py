"""The submission queue entry (NVMe 1.4 §4.2, Figure 104) and its completion (§4.6)."""

from __future__ import annotations

import struct
from dataclasses import dataclass

_SQE = struct.Struct("<BBHI8xQQQIIIIII")
_CQE = struct.Struct("<IIHHHH")


@dataclass(frozen=True)
class Command:
    opcode: int
    flags: int          # FUSE [1:0], PSDT [7:6]
    cid: int
    nsid: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def decode(cls, raw: bytes) -> Command:
        return cls(*_SQE.unpack(raw))

    def encode(self) -> bytes:
        return _SQE.pack(self.opcode, self.flags, self.cid, self.nsid, self.mptr, self.prp1,
                         self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13,
                         self.cdw14, self.cdw15)


def completion(dw0: int, sq_head: int, sqid: int, cid: int, phase: int,
               status_bits: int) -> bytes:
    """A 16-byte CQE: DW0 result, DW2 SQHD | SQID, DW3 CID | P | status (Figure 121)."""
    dw3_hi = (status_bits >> 16) | phase
    return _CQE.pack(dw0 & 0xFFFFFFFF, 0, sq_head, sqid, cid, dw3_hi & 0xFFFF)


def decode_completion(raw: bytes) -> tuple[int, int, int, int, int, int]:
    """(dw0, sq_head, sqid, cid, phase, status (SCT << 8 | SC)) of a CQE: the host's view."""
    dw0, _, head, sqid, cid, hi = _CQE.unpack(raw)
    return dw0, head, sqid, cid, hi & 1, ((hi >> 1) & 0xFF) | ((hi >> 9) & 0x7) << 8
