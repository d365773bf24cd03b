"""IDE_KM requester ⇄ responder in process (PCIe 6.x §6.33.3), with only :mod:`teeio`.

A device's PCI-SIG vendor-defined stack built from teeio alone: an IDE capability
(:mod:`teeio.pcie.ide_cap`) as the key store, :class:`~teeio.ide_km.IdeKmResponder` and
:class:`~teeio.tdisp.responder.TdispResponder` behind one
:class:`~teeio.ide_km.PciSigProtocolMux`, and the two requesters on the other side of a
plain function.  QUERY, KEY_PROG, K_SET_GO / K_SET_STOP, a key refresh, the bad inputs,
and TDISP's LOCK resting on the keys IDE_KM programmed in the same session.
"""

from __future__ import annotations

import ast
from collections.abc import Sequence
from pathlib import Path

import pytest

from teeio.codec import DecodeError, ProtocolError
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import (
    IdeKmClient,
    IdeKmDecodeError,
    IdeKmError,
    IdeKmResponder,
    IdeKmResponseError,
    KeyProg,
    KeyProgError,
    KpAck,
    KpAckError,
    KpStatus,
    PciSigProtocol,
    PciSigProtocolMux,
    decode_object,
)
from teeio.pcie.config import ConfigSpace
from teeio.pcie.ide_cap import IdeCapability, StreamState, build
from teeio.spdm.errors import DropRequest, SpdmError
from teeio.tdisp.codec import function_id
from teeio.tdisp.requester import TdispRequester, TdispRequestError
from teeio.tdisp.responder import KeyName, TdispResponder

SID = 3
RID = 0x0210
SESSION, OTHER = 0xA0A0_0001, 0xB0B0_0002
Keys = dict[tuple[Direction, SubStream], IdeKey]


class Hooks:
    """TDISP's hardware hooks over the same IDE capability and IDE_KM responder."""

    def __init__(self, km: IdeKmResponder) -> None:
        self.km = km

    def msix_bar(self) -> int:
        return 1

    def mmio_bars(self) -> Sequence[tuple[int, int, int]]:
        return [(0, 0xFE00_0000, 0x1000)]

    def stream_configured(self, stream_id: int) -> bool:
        return self.km.store.has_stream(stream_id)

    def ide_keys_programmed(self, session_id: int, stream_id: int) -> set[KeyName] | None:
        return self.km.keys_programmed_by(session_id, stream_id)


class Stack:
    def __init__(self) -> None:
        self.cap: IdeCapability = build(ConfigSpace(), 0x100)
        self.block = self.cap.streams[1]                    # selective block 0
        self.cap.config_write(self.block.ctl_off, (SID << 24).to_bytes(4, "little"))
        self.km = IdeKmResponder(self.cap, dev_func=RID & 0xFF, bus=RID >> 8,
                                 ports=(0, 1), max_port_index=1)
        self.tdisp = TdispResponder(Hooks(self.km), requester_id=RID)
        self.mux = PciSigProtocolMux()
        self.mux.register(PciSigProtocol.IDE_KM, self.km.handle)
        self.mux.register(PciSigProtocol.TDISP, self.tdisp.handle)

    def ide(self, session: int | None = SESSION, port: int = 0) -> IdeKmClient:
        return IdeKmClient(lambda p: self.mux(p, session), port)

    def tdi(self, session: int | None = SESSION) -> TdispRequester:
        return TdispRequester(lambda p: self.mux(p, session), function_id(RID))

    def enable(self) -> None:
        self.cap.config_write(self.block.ctl_off, (SID << 24 | 1).to_bytes(4, "little"))


def fresh() -> Keys:
    return {(d, s): IdeKey.generate() for d in Direction for s in SubStream}


def key_up(c: IdeKmClient, key_set: KeySet) -> None:
    c.program_keys(SID, key_set, fresh())
    c.go_all(SID, key_set, Direction.RX)
    c.go_all(SID, key_set, Direction.TX)


def test_query_keys_go_refresh_stop() -> None:
    s = Stack()
    c = s.ide()
    q = c.query()
    assert (q.bus << 8 | q.dev_func, q.max_port_index) == (RID, 1)
    assert q.regs == s.cap.ide_registers() and q.capability & (1 << 6)     # IDE_KM
    assert s.km.bound_session == SESSION
    key_up(c, KeySet.K0)
    s.enable()
    assert s.block.state is StreamState.SECURE
    assert s.block.tx.active_key_set(SubStream.PR) is KeySet.K0
    key_up(c, KeySet.K1)                                    # refresh into the other set
    assert s.block.state is StreamState.SECURE
    assert s.block.tx.active_key_set(SubStream.PR) is KeySet.K1
    c.stop_all(SID, KeySet.K0)                              # the set no Tx uses any more
    assert not s.cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)
    assert s.km.keys_programmed_by(SESSION, SID) == {
        (KeySet.K1, d, sub) for d in Direction for sub in SubStream}
    assert s.ide(port=1).query().port_index == 1            # spdm-emu's PortIndex


def test_key_prog_refusals_reach_the_requester() -> None:
    s = Stack()
    c = s.ide()
    with pytest.raises(IdeKmResponseError) as e:
        c.key_prog(SID + 1, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    assert e.value.status == KpStatus.UNSUPPORTED_VALUE
    with pytest.raises(IdeKmResponseError) as e:
        s.ide(port=2).key_prog(SID, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    assert e.value.status == KpStatus.UNSUPPORTED_PORT_INDEX
    key_up(c, KeySet.K0)
    with pytest.raises(IdeKmResponseError, match="UNSPECIFIED_FAILURE"):   # set in use
        c.key_prog(SID, KeySet.K0, Direction.TX, SubStream.NPR, IdeKey.generate())
    short = KeyProg(SID, KeySet.K1, Direction.RX, SubStream.PR, bytes(32)).encode()[:40]
    ack = KpAck.decode(s.mux(short, SESSION))
    assert ack.status_code is KpStatus.INCORRECT_LENGTH


def test_errors_carry_the_codec_cores_semantics() -> None:
    """A malformed object is a DecodeError (bytes, offset, reason); a KP_ACK failure is a
    ProtocolError whose code is the Status, as the requester and the responder see it."""
    raw = KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(32)).encode()
    bad = raw[:6] + b"\x3c" + raw[7:]                      # KSS: reserved bits, sub-stream 3
    with pytest.raises(IdeKmDecodeError) as d:
        decode_object(bad)
    assert isinstance(d.value, DecodeError) and isinstance(d.value, IdeKmError)
    assert (d.value.raw, d.value.offset) == (bad, 6) and "reserved bits" in d.value.reason
    assert str(d.value).startswith("IDE_KM: ")
    s = Stack()
    ack = s.mux(bad, SESSION)                # KSS echoed as received, Status Unsupported Value
    assert ack == bytes((0, 3, 0, 0, SID, KpStatus.UNSUPPORTED_VALUE, 0x3C, 0))
    with pytest.raises(KpAckError) as e:
        s.ide().key_prog(SID + 9, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    err = e.value
    assert isinstance(err, ProtocolError) and isinstance(err, KeyProgError)
    assert isinstance(err, IdeKmResponseError)
    assert err.code == err.status == KpStatus.UNSUPPORTED_VALUE
    assert err.status_code is KpStatus.UNSUPPORTED_VALUE
    assert KeyProgError(0x77).status_code is KpStatus.UNSPECIFIED_FAILURE   # reserved


def test_silently_discarded_requests() -> None:
    s = Stack()
    with pytest.raises(DropRequest, match="secured session"):
        s.ide(session=None).query()
    with pytest.raises(DropRequest, match="PortIndex 2"):
        s.ide(port=2).query()
    c = s.ide()
    with pytest.raises(DropRequest, match="before its key was programmed"):
        c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)
    with pytest.raises(DropRequest, match="unknown stream"):
        c.k_set_stop(SID + 1, KeySet.K0, Direction.RX, SubStream.PR)
    c.query()
    with pytest.raises(DropRequest, match="bound to session"):
        s.ide(OTHER).query()
    with pytest.raises(SpdmError, match="Protocol ID 0x02"):
        s.mux(b"\x02\x00", SESSION)


def test_tdisp_lock_rests_on_this_sessions_ide_keys() -> None:
    s = Stack()
    t = s.tdi()
    with pytest.raises(TdispRequestError, match="INVALID_REQUEST"):
        t.lock(0, SID)                                      # no keys yet
    c = s.ide()
    for d in Direction:                                     # what spdm-emu programs
        c.key_prog(SID, KeySet.K0, d, SubStream.PR, IdeKey.generate())
    with pytest.raises(TdispRequestError, match="INVALID_REQUEST"):
        s.tdi(OTHER).lock(0, SID)                           # another session's keys
    nonce = t.lock(0, SID)
    t.start(nonce)
    assert t.get_state().name == "RUN"
    # The session ends: IDE_KM drops every key, the TDI goes to ERROR.
    s.tdisp.session_closed(SESSION)
    s.km.session_closed(SESSION)
    assert s.km.keys_programmed_by(SESSION, SID) == set()
    assert not s.cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)
    o = s.tdi(OTHER)
    assert o.get_state().name == "ERROR"
    o.stop()
    with pytest.raises(TdispRequestError, match="INVALID_REQUEST"):
        o.lock(0, SID)                                      # the new session has no keys


def test_uses_no_role_package() -> None:
    """This file talks to both ends through teeio alone."""
    tree = ast.parse(Path(__file__).read_text(encoding="utf-8"))
    tops = {(n.module or "").split(".")[0] for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)}
    assert not tops & {"vfio_user_dev", "tsm", "guest_agent"}
    assert "teeio" in tops
