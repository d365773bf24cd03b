"""GHCx typed bodies (docs/ghcx.md "Messages"): every request and response decodes the JSON
the channel has always carried and encodes it back byte for byte; the strict decode refuses
wrong types, out-of-range values, unknown and missing fields with a MessageError naming the
field; only valid bodies can be built; the guest's ask() turns a malformed response into
GhcxBadResponse."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guest_agent.ghcx_client import GhcxBadResponse, GhcxCallError, ask
from teeio.ghcx import (
    REQUESTS,
    DmaAccept,
    DmaAcceptResponse,
    DmaRelease,
    ErrorReply,
    GetEvidence,
    GetEvidenceResponse,
    MessageError,
    MsgType,
    Status,
    StatusResponse,
    TdiAccept,
    TdiInfoResponse,
    TdiLock,
    TdiLockResponse,
    decode_request,
    response_type,
)
from teeio.ghcx.body import Body
from teeio.ghcx.messages import REQUEST_BODIES, Digests, InfoDigests, StreamInfo, Window
from teeio.platform_channel import StreamState
from teeio.tdisp.defs import TdiState
from tsm.tdi import TdiRecord

D = {"cert_chain": "aa" * 48, "transcript": "bb" * 48, "report": "cc" * 48}
INFO = {"tdi": "dev0", "state": "CONFIG_LOCKED", "lock_epoch": 3, "lock_flags": 1,
        "mmio_reporting_offset": 0, "stream": {"id": 1, "state": "secure"},
        "digest_alg": "sha384", "digests": {**D, "transcript": None},
        "tsm_boot_id": "0f" * 16, "reason": None}
# (type, request payload, response payload) as docs/ghcx.md "Messages" lists them
WIRE: list[tuple[MsgType, dict[str, Any], dict[str, Any]]] = [
    (MsgType.TDI_LOCK, {}, {"state": "CONFIG_LOCKED", "lock_epoch": 3}),
    (MsgType.TDI_INFO, {}, INFO),
    (MsgType.GET_EVIDENCE, {"nonce": "01" * 32},
     {"cert_chain": "3082", "vca": "10e1", "measurements": [["11e0", "1160"], ["11e0", "1161"]],
      "report": "0001"}),
    (MsgType.TDI_ACCEPT, {"digests": D, "lock_epoch": 3}, {"state": "RUN", "dma_stream": 1}),
    (MsgType.DMA_ACCEPT, {"base": 0x1000, "size": 8192, "access": "r"}, {"window_id": 7}),
    (MsgType.DMA_RELEASE, {"window_id": 7}, {}),
    (MsgType.TDI_STOP, {}, {"state": "CONFIG_UNLOCKED"}),
    (MsgType.STATUS, {}, {"boot_id": "0f" * 16, "vm_id": "vm0", "tdi": "dev0", "state": "RUN",
                          "windows": [{"window_id": 7, "base": 4096, "size": 8192,
                                       "access": "rw"}]}),
]


def same_json(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Equal as the channel sends them: the same bytes (keys in the same order)."""
    return json.dumps(a, separators=(",", ":")) == json.dumps(b, separators=(",", ":"))


def bad(body: type[Body], payload: object, where: str, reason: str) -> None:
    with pytest.raises(MessageError) as e:
        body.decode(payload)
    assert e.value.code == "bad_request"
    assert (e.value.where, reason in e.value.reason) == (where, True), e.value


@pytest.mark.parametrize(("mtype", "ask_for", "response"), WIRE,
                         ids=[m.name for m, _, _ in WIRE])
def test_every_request_and_response_round_trips_the_wire(
        mtype: MsgType, ask_for: dict[str, Any], response: dict[str, Any]) -> None:
    req = decode_request(mtype, ask_for)
    assert req.mtype is mtype and response_type(mtype) == MsgType[f"{mtype.name}_RESPONSE"]
    assert same_json(req.encode(), ask_for)
    rsp = req.decode_response(response)
    assert isinstance(rsp, req.response)
    assert same_json(rsp.encode(), response)


def test_one_body_per_request_type() -> None:
    assert set(REQUEST_BODIES) == REQUESTS == {m for m, _, _ in WIRE}
    with pytest.raises(MessageError, match="not a GHCx request"):
        decode_request(MsgType.HELLO, {})


def test_typed_fields() -> None:
    info = TdiInfoResponse.decode(INFO)
    assert info.state is TdiState.CONFIG_LOCKED and info.tsm_boot_id == bytes([15]) * 16
    assert info.stream == StreamInfo(id=1, state=StreamState.SECURE)
    assert info.digests == InfoDigests(cert_chain="aa" * 48, transcript=None, report="cc" * 48)
    ev = GetEvidence(nonce=bytes(32))
    assert ev.encode() == {"nonce": "00" * 32}
    acc = DmaAccept.decode({"base": 0, "size": 1})
    assert acc.access == "rw" and acc.encode() == {"base": 0, "size": 1, "access": "rw"}
    assert Digests(**D).differ(InfoDigests(**{**D, "report": None})) == ["report"]
    assert Digests(**D).differ(InfoDigests(**D)) == []
    st_ = StatusResponse.decode(WIRE[-1][2])
    assert st_.windows == (Window(window_id=7, base=4096, size=8192, access="rw"),)


@pytest.mark.parametrize(("body", "payload", "where", "reason"), [
    (TdiLock, [], "", "must be an object, not list"),
    (TdiLock, {"x": 1}, "", "unknown field(s) x"),
    (DmaRelease, {}, "window_id", "missing"),
    (DmaRelease, {"window_id": "7"}, "window_id", "must be an integer, not str"),
    (DmaRelease, {"window_id": 1.0}, "window_id", "must be an integer, not float"),
    (DmaRelease, {"window_id": False}, "window_id", "not bool"),
    (DmaRelease, {"window_id": 2**64}, "window_id", "is outside 0.."),
    (DmaAccept, {"base": 0, "size": 0}, "size", "0 is outside 1.."),
    (DmaAccept, {"base": 2**64 - 1, "size": 2}, "size", "beyond the 64-bit"),
    (DmaAccept, {"base": 0, "size": 1, "access": "rwx"}, "access", "'rwx' is not one of"),
    (GetEvidence, {"nonce": "0" * 63}, "nonce", "lowercase hex digit pairs"),
    (GetEvidence, {"nonce": "00" * 31}, "nonce", "31 bytes, must be 32"),
    (GetEvidence, {"nonce": None}, "nonce", "lowercase hex"),
    (TdiAccept, {"digests": {**D, "report": "CC" * 48}, "lock_epoch": 1}, "digests.report",
     "96 lowercase hex"),
    (TdiAccept, {"digests": {**D, "more": "00"}, "lock_epoch": 1}, "digests",
     "unknown field(s) more"),
    (TdiAccept, {"digests": None, "lock_epoch": 1}, "digests", "must be an object, not null"),
    (TdiLockResponse, {"state": "LOCKED", "lock_epoch": 1}, "state", "'LOCKED' is not one"),
    (TdiInfoResponse, {**INFO, "stream": {"id": 256, "state": "secure"}}, "stream.id",
     "256 is outside 0..255"),
    (TdiInfoResponse, {**INFO, "stream": {"id": 1, "state": "SECURE"}}, "stream.state",
     "is not one of secure, insecure"),
    (TdiInfoResponse, {**INFO, "lock_flags": 0x10000}, "lock_flags", "outside 0..65535"),
    (TdiInfoResponse, {**INFO, "digest_alg": "sha256"}, "digest_alg", "is not one of"),
    (TdiInfoResponse, {**INFO, "tdi": "a b"}, "tdi", "does not match"),
    (TdiInfoResponse, {**INFO, "tsm_boot_id": "00"}, "tsm_boot_id", "1 bytes, must be 16"),
    (GetEvidenceResponse, {**WIRE[2][2], "measurements": []}, "measurements",
     "0 items, at least 1"),
    (GetEvidenceResponse, {**WIRE[2][2], "measurements": [["00"]]}, "measurements[0]",
     "array of two items"),
    (GetEvidenceResponse, {**WIRE[2][2], "vca": ""}, "vca", "0 bytes, must be at least 1"),
    (StatusResponse, {**WIRE[-1][2], "windows": [{"window_id": 1}]}, "windows[0].base",
     "missing"),
    (StatusResponse, {**WIRE[-1][2], "vm_id": "x" * 17}, "vm_id", "does not match"),
    (ErrorReply, {"error": "Refused"}, "error", "does not match"),
])
def test_strict_decode(body: type[Body], payload: object, where: str, reason: str) -> None:
    bad(body, payload, where, reason)


def test_request_errors_name_the_request() -> None:
    with pytest.raises(MessageError, match=r"^TDI_ACCEPT\.lock_epoch: missing$"):
        decode_request(MsgType.TDI_ACCEPT, {"digests": D})


def test_only_valid_bodies_can_be_built() -> None:
    for build in (lambda: TdiLockResponse(state="RUN", lock_epoch=1),
                  lambda: TdiLockResponse(state=TdiState.RUN, lock_epoch=-1),
                  lambda: GetEvidence(nonce=b"short"),
                  lambda: DmaAccept(base=0, size=0),
                  lambda: StreamInfo(id=1, state="secure"),
                  lambda: Digests(cert_chain="", transcript="", report="")):
        with pytest.raises(MessageError):
            build()


def test_error_reply() -> None:
    assert ErrorReply.decode({"error": "mismatch"}) == ErrorReply("mismatch", "")
    assert ErrorReply("state", "not now").encode() == {"error": "state", "message": "not now"}
    assert ErrorReply.decode({"error": "newer_code", "message": "m"}).error == "newer_code"


json_leaves = (st.none() | st.booleans() | st.integers(-2, 2**64 + 1) | st.text(max_size=4)
               | st.sampled_from(["00" * 32, "aa" * 48, "RUN", "secure", "rw", "0f" * 16]))
json_values = json_leaves | st.lists(json_leaves, max_size=3) | st.dictionaries(
    st.sampled_from(["id", "state", "cert_chain", "transcript", "report", "x"]), json_leaves,
    max_size=3)


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(sorted(REQUEST_BODIES)), st.data())
def test_decode_raises_only_message_error(mtype: MsgType, data: st.DataObject) -> None:
    body = REQUEST_BODIES[mtype]
    names = [n for n, _, _ in body.fields_spec()] + ["other"]
    payload = data.draw(st.dictionaries(st.sampled_from(names), json_values, max_size=4))
    for kind in (body, body.response):
        try:
            got = kind.decode(payload)
        except MessageError:
            continue
        assert kind.decode(got.encode()) == got


class Wire:
    """A Caller that answers each request type with a canned payload."""

    vm_id = "vm0"

    def __init__(self, answers: dict[MsgType, dict[str, Any]]) -> None:
        self.answers = answers
        self.sent: list[tuple[MsgType, dict[str, Any]]] = []

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None) -> dict[str, Any]:
        self.sent.append((mtype, payload or {}))
        return self.answers[mtype]


def test_ask_sends_the_wire_payload_and_decodes_the_response() -> None:
    wire = Wire({MsgType.DMA_ACCEPT: {"window_id": 9}, MsgType.STATUS: {"boot_id": "00"}})
    rsp = ask(wire, DmaAccept(base=4096, size=4096))
    assert rsp == DmaAcceptResponse(window_id=9)
    assert wire.sent == [(MsgType.DMA_ACCEPT, {"base": 4096, "size": 4096, "access": "rw"})]
    with pytest.raises(GhcxBadResponse) as e:
        ask(wire, Status())
    assert isinstance(e.value, GhcxCallError) and e.value.code == "bad_response"
    assert "STATUS.boot_id: 1 bytes, must be 16" in e.value.message


def test_tdi_info_from_the_tsm_record_is_the_documented_object() -> None:
    rec = TdiRecord("dev0")
    assert same_json(rec.info(1, StreamState.INSECURE, bytes(16), 0x2000).encode(), {
        "tdi": "dev0", "state": "CONFIG_UNLOCKED", "lock_epoch": 0, "lock_flags": 0,
        "mmio_reporting_offset": 0x2000, "stream": {"id": 1, "state": "insecure"},
        "digest_alg": "sha384", "digests": None, "tsm_boot_id": "00" * 16, "reason": None})
    rec.locked(4, 1, bytes(32), b"report", b"chain")
    info = rec.info(1, StreamState.SECURE, bytes(16), 0)
    assert info.digests is not None and info.digests.transcript is None
    assert info.encode()["digests"] == rec.digests()


def test_docs_table_every_field_of_every_body() -> None:
    """docs/ghcx.md "Typed bodies" lists each body's fields exactly: a table row whose
    first column names the body (or is empty: the body above) and whose second names the
    field; bodies without fields are named in the text."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "ghcx.md").read_text()
    section = doc.split("## Typed bodies", 1)[1].split("\n## ", 1)[0]
    rows: set[tuple[str, str]] = set()
    current = ""
    for line in section.splitlines():
        cols = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or len(cols) < 3:
            continue
        named = re.search(r"`([A-Z][A-Za-z]+)`", cols[0])
        current = named.group(1) if named else current if not cols[0] else ""
        field = re.fullmatch(r"`([a-z_]+)`", cols[1])
        if field and current:
            rows.add((current, field.group(1)))
    bodies = {*REQUEST_BODIES.values(), *(b.response for b in REQUEST_BODIES.values()),
              Digests, InfoDigests, StreamInfo, Window, ErrorReply}
    declared = {(b.__name__, name) for b in bodies for name, _, _ in b.fields_spec()}
    assert rows == declared
    for b in bodies:
        assert f"`{b.__name__}`" in section, b.__name__
