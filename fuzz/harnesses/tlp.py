"""TLPs and the IDE prefix (``teeio/tlp/``): TlpDecodeError (a TlpError) or a TLP that
re-encodes to its bytes."""

from __future__ import annotations

from fuzz.runner import check
from teeio.tlp import CplStatus, IdePrefix, SubStream, Tlp, TlpError

KIND = "decoder"


def seeds() -> list[bytes]:
    mwr = Tlp.memory_write(0x100, 1, 0x1_0000_1000, b"abcdefgh")
    mrd = Tlp.memory_read(0x100, 2, 0x2000, 8)
    cpl = Tlp.completion_for(mrd, 0x200, b"12345678")
    bad = Tlp.completion_for(mrd, 0x200, status=CplStatus.UR)
    out = [b"\0" + t.encode() for t in (mwr, mrd, cpl, bad)]
    out.append(b"\1" + IdePrefix(SubStream.PR, 3, 1, True).encode())
    out.append(b"\2" + mwr.encode())
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    sel, body = data[0] % 3, data[1:]
    try:
        if sel == 0:
            t = Tlp.decode(body)
            check(t.encode() == body, "TLP re-encodes differently")
            check(Tlp.decode(t.encode()) == t, "TLP round trip")
            t.payload_bytes()
        elif sel == 1:
            p = IdePrefix.decode(body)
            check(p.encode() == body, "IDE prefix re-encodes differently")
        else:
            n = Tlp.header_length(body)
            check(n in (12, 16, 16 + 4, 12 + 4), f"header length {n}")
    except TlpError:
        pass
