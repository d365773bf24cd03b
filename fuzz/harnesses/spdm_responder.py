"""The SPDM responder (``teeio.spdm.responder.Responder``) fed arbitrary request
sequences, fresh per input: every request gets a response of at least an SPDM header (or,
for a vendor-defined drop or a secured record, none); nothing is raised (the responder's
contract: any exception is a bug)."""

from __future__ import annotations

from fuzz import templates
from fuzz.runner import check, chunks, frames
from teeio.spdm.responder import Responder

KIND = "responder"


def seeds() -> list[bytes]:
    reqs = [b"\0" + q for q, _ in templates.spdm_transcript()]
    return [frames(reqs), frames(reqs[:3]), frames(reqs[:3] + [b"\1" + bytes(24)])]


def one_input(data: bytes) -> None:
    rsp = Responder(templates.identity(), templates.MEASUREMENTS, name="fuzz")
    for chunk in chunks(data, 16):
        if not chunk:
            continue
        if chunk[0] & 1:
            out = rsp.handle_secured(chunk[1:], now=0.0)
            check(out is None or isinstance(out, bytes), "secured response type")
        else:
            got = rsp.handle_spdm_or_drop(chunk[1:])
            check(got is None or len(got) >= 4, f"response {got!r}")
