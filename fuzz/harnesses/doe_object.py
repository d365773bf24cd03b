"""DOE data objects, Discovery and the DOE socket header (``teeio/doe/``): DoeError
(socket header: ValueError) or a value; stable re-encoding."""

from __future__ import annotations

from fuzz.runner import check
from teeio import doe

KIND = "decoder"


def seeds() -> list[bytes]:
    objs = [doe.DoeObject(doe.PCI_SIG_VENDOR_ID, doe.DataObjectType.DOE_DISCOVERY,
                          doe.DiscoveryRequest(0, 2).encode()),
            doe.DoeObject(doe.PCI_SIG_VENDOR_ID, doe.DataObjectType.CMA_SPDM,
                          doe.pad_dw(bytes.fromhex("10840000"))),
            doe.DoeObject(doe.PCI_SIG_VENDOR_ID, doe.DataObjectType.CMA_SPDM_CONNECTION_ID,
                          b"\0" * 8, 5)]
    out = [b"\0" + o.encode() for o in objs]
    out.append(b"\1" + doe.DiscoveryRequest(1, 2).encode())
    out.append(b"\2" + doe.DiscoveryResponse(1, 1, 2).encode())
    out.append(b"\3" + doe.SocketHeader(1, 2, 8).encode())
    return out


def one_input(data: bytes) -> None:
    if not data:
        return
    sel, body = data[0] % 4, data[1:]
    try:
        if sel == 0:
            o = doe.DoeObject.decode(body)
            check(doe.DoeObject.decode(o.encode()) == o, "DOE object round trip")
            check(o.encode() == body, "DOE object does not re-encode to its bytes")
        elif sel == 1:
            r = doe.DiscoveryRequest.decode(body)
            check(doe.DiscoveryRequest.decode(r.encode()) == r, "discovery request round trip")
        elif sel == 2:
            s = doe.DiscoveryResponse.decode(body)
            check(doe.DiscoveryResponse.decode(s.encode()) == s, "discovery response round trip")
        else:
            h = doe.SocketHeader.decode(body)
            check(doe.SocketHeader.decode(h.encode()) == h, "socket header round trip")
            h.command_name()
    except doe.DoeError:
        pass
    except ValueError:
        if sel != 3:        # only the socket header documents a bare ValueError
            raise
