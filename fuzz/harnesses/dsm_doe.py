"""The DSM behind the device's DOE dispatcher (``Platform`` + ``DeviceSecurityManager``, as
``tests/support/tee_rig.py`` builds it), with a live secured session: raw DOE objects,
clear SPDM requests, and application messages sealed in the session (IDE_KM, TDISP,
HEARTBEAT, KEY_UPDATE, END_SESSION with fuzzed fields).  ``handle_object`` returns a whole
DOE object or None, or raises DoeError; anything else is a crash.  A session the input ends
is set up again."""

from __future__ import annotations

from functools import lru_cache

from fuzz import templates
from fuzz.runner import check, chunks, frames
from teeio.doe import PCI_SIG_VENDOR_ID, DataObjectType, DoeError, DoeObject, pad_dw
from teeio.spdm.secured import SecuredMessageError

KIND = "responder"


@lru_cache(maxsize=1)
def rig() -> templates.Rig:
    return templates.rig()


def seeds() -> list[bytes]:
    r = rig()
    app = [b"\2" + m for m in templates.session_requests(r.req.version, r.rid)]
    clear = [b"\1" + q for q, _ in templates.spdm_transcript()]
    raw = [b"\0" + DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.DOE_DISCOVERY,
                             bytes(4)).encode()]
    return [frames([m]) for m in app + clear + raw] + [frames(app[3:]), frames(clear[:3])]


def _object(r: templates.Rig, obj: bytes) -> bytes | None:
    try:
        out = r.machine.device.doe.handle_object(obj)
    except DoeError:
        return None
    if out is not None:
        DoeObject.decode(out)          # a whole, valid object
    return out


def one_input(data: bytes) -> None:
    r = rig()
    if r.sid not in r.req.sessions or r.sid not in r.dsm.responder.sessions:
        r.new_session()
    for chunk in chunks(data, 16):
        if not chunk:
            continue
        mode, body = chunk[0] % 3, chunk[1:]
        if mode == 0:
            _object(r, body)
        elif mode == 1:
            _object(r, DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.CMA_SPDM,
                                 pad_dw(body)).encode())
        else:
            if r.sid not in r.req.sessions or r.sid not in r.dsm.responder.sessions:
                r.new_session()
            try:
                record = r.seal(body)
            except SecuredMessageError:
                continue
            out = _object(r, DoeObject(PCI_SIG_VENDOR_ID, DataObjectType.SECURED_CMA_SPDM,
                                       pad_dw(record)).encode())
            if out is not None:
                try:
                    r.req.sessions[r.sid].channel.open(DoeObject.decode(out).payload)
                except (SecuredMessageError, KeyError):
                    r.req.sessions.pop(r.sid, None)       # out of step: a new session next
    check(r.machine.device.doe is not None, "device lost its DOE instance")
