"""IDE_KM through the device's DSM (vfio_user_dev/dsm.py): a real SPDM secured session from
teeio.spdm.Requester over the device's DOE dispatcher, the IDE capability in the device's
config space (vfio_user_dev/device.py) as key store and register file.

QUERY_RESP mirrors the registers; KEY_PROG × 6 + K_SET_GO make the Selective stream
Secure once its Enable bit is written; IDE_KM in the clear or from a second session gets
no response; END_SESSION, a decrypt error and a new GET_VERSION invalidate the keys;
wrong sizes, ports and streams get the prescribed answers; DMA then crosses the link
under the keys IDE_KM programmed, and keeps flowing across a key-set refresh."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator

import pytest

from teeio import pki
from teeio.device_regs import Op, St
from teeio.doe import DataObjectType
from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import (
    PCI_SIG_STANDARD_ID,
    IdeKmClient,
    KeyProg,
    KpAck,
    KpStatus,
    KSetGo,
    Query,
    QueryResp,
    key_to_wire,
)
from teeio.pcie.ide_cap import StreamState
from teeio.spdm import ErrorResponse, Requester, SessionError, codec
from teeio.spdm.defs import RequestCode
from tests.support.dut import SEL0, SEL0_CTL, Dut, attach, km, vendor
from tests.support.lockstep import GUEST, SIZE, enable_device, map_memfd, run_job
from tests.support.servers import RunningServer
from vfio_user_dev.device import IDE_CAP, TeeIoDevice
from vfio_user_dev.link.interfaces import ROOT_PORT_ID

pytestmark = pytest.mark.timeout(60)

SID = 5                                   # the Stream ID the tests give selective block 0
LINK_CTL = IDE_CAP + 0x0C


@pytest.fixture
def dut(identity: pki.Identity) -> Iterator[Dut]:
    device = TeeIoDevice()
    yield attach(device, identity)
    device.close()


def keys() -> dict[tuple[Direction, SubStream], IdeKey]:
    return {(d, s): IdeKey.generate() for d in Direction for s in SubStream}


def key_stream(c: IdeKmClient, key_set: KeySet = KeySet.K0,
               table: dict[tuple[Direction, SubStream], IdeKey] | None = None) -> None:
    c.program_keys(SID, key_set, table if table is not None else keys())
    c.go_all(SID, key_set, Direction.RX)
    c.go_all(SID, key_set, Direction.TX)


def session(dut: Dut) -> tuple[Requester, int, IdeKmClient]:
    req = dut.requester()
    sid = req.start_session(0)
    return req, sid, km(req, sid)


# -- QUERY ----------------------------------------------------------------------------------

def test_query_resp_reflects_the_ide_capability_registers(dut: Dut) -> None:
    # The host programs block 0 the way Linux does before IDE_KM: RID association, Stream ID.
    dut.cfg_write(SEL0 + 0x0C, ROOT_PORT_ID << 8)
    dut.cfg_write(SEL0 + 0x10, ROOT_PORT_ID << 8 | 1)
    dut.cfg_write(SEL0_CTL, SID << 24)
    req, _, c = session(dut)
    q = c.query()
    regs = tuple(dut.cfg_read(o) for o in range(IDE_CAP + 4, IDE_CAP + 0x54, 4))
    assert q.regs == regs == dut.device.ide.ide_registers()
    assert q.capability & 0x43 == 0x43                 # Link, Selective, IDE_KM
    assert q.regs[2 + 2 + 1] == SID << 24              # selective block 0 Control
    assert q.regs[2 + 2 + 4] == ROOT_PORT_ID << 8 | 1  # its RID Association 2
    rid = dut.device.link_end.requester_id
    assert (q.bus, q.dev_func, q.segment) == (rid >> 8, rid & 0xFF, 0)
    assert (q.port_index, q.max_port_index) == (0, 1)


def test_port_index_1_is_answered_as_spdm_emu_sends_it(dut: Dut) -> None:
    """DMTF spdm-emu's requester: QUERY with PortIndex 1, then stream 0 KEY_PROG K0 Rx/Tx
    PR only, K_SET_GO Rx, Tx, K_SET_STOP Rx, Tx -- every object answered."""
    req, sid, _ = session(dut)
    c = km(req, sid, port=1)
    assert c.query().port_index == 1
    for d in (Direction.RX, Direction.TX):
        c.key_prog(0, KeySet.K0, d, SubStream.PR, IdeKey.generate())
    for d in (Direction.RX, Direction.TX):
        c.k_set_go(0, KeySet.K0, d, SubStream.PR)
    for d in (Direction.RX, Direction.TX):
        c.k_set_stop(0, KeySet.K0, d, SubStream.PR)
    # spdm-emu then tries TDISP (Protocol ID 1): not registered without attach(tdi=...).
    with pytest.raises(ErrorResponse, match="UnsupportedRequest"):
        vendor(req, b"\x01\x10\x81\x00" + bytes(12), sid)


# -- keys and stream state ------------------------------------------------------------------

@pytest.mark.parametrize("enable_first", [False, True])
def test_keys_then_enable_make_the_selective_stream_secure(dut: Dut,
                                                           enable_first: bool) -> None:
    dut.cfg_write(SEL0_CTL, SID << 24 | int(enable_first))
    _, _, c = session(dut)
    c.query()
    c.program_keys(SID, KeySet.K0, keys())
    c.go_all(SID, KeySet.K0, Direction.RX)
    assert dut.state() == StreamState.INSECURE          # Tx not GO yet
    c.go_all(SID, KeySet.K0, Direction.TX)
    if not enable_first:
        assert dut.state() == StreamState.INSECURE      # keys ready, Enable clear
        dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    assert dut.state() == StreamState.SECURE             # what Linux reads right after Enable
    st = dut.device.ide.streams[1]
    assert st.secure and st.stream_id == SID
    assert dut.device.ide_status()[1]["state"] == "secure"
    # Clearing Enable: Insecure at once; setting it again: Secure (the keys are still GO).
    dut.cfg_write(SEL0_CTL, SID << 24)
    assert dut.state() == StreamState.INSECURE
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    assert dut.state() == StreamState.SECURE


def test_device_reset_invalidates_keys_and_registers(dut: Dut) -> None:
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    _, _, c = session(dut)
    c.query()
    key_stream(c)
    assert dut.state() == StreamState.SECURE
    ide = dut.device.ide
    dut.device.reset()
    assert dut.device.ide is ide and ide.cs is dut.device.config
    assert dut.cfg_read(SEL0_CTL) == 0 and dut.state() == StreamState.INSECURE
    assert not ide.key_programmed(0, KeySet.K0, Direction.RX, SubStream.PR)
    # The registers still behave after the reset (masks come from the fresh layout).
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    assert dut.cfg_read(SEL0_CTL) == SID << 24 | 1 and dut.state() == StreamState.INSECURE


# -- where IDE_KM is answered ---------------------------------------------------------------

def test_unsecured_ide_km_gets_no_response(dut: Dut) -> None:
    req = dut.requester()
    for obj in (Query(0).encode(), KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR,
                                          bytes(32)).encode()):
        msg = codec.VendorDefinedRequest(req.version, PCI_SIG_STANDARD_ID, b"\x01\x00",
                                         obj).encode()
        assert dut.raw(DataObjectType.CMA_SPDM, msg) is None     # the DOE object is dropped
    # Still no binding: a session may QUERY afterwards.
    sid = req.start_session(0)
    assert km(req, sid).query().port_index == 0
    # The plain path still answers everything that is not IDE_KM.
    digests = dut.raw(DataObjectType.CMA_SPDM, codec.GetDigests(req.version).encode())
    assert digests is not None and digests[1] == 0x01


def test_ide_km_in_the_handshake_phase_gets_no_response(dut: Dut) -> None:
    req = dut.requester()
    sid = req.key_exchange()
    sess = req.sessions[sid]
    msg = codec.VendorDefinedRequest(req.version, PCI_SIG_STANDARD_ID, b"\x01\x00",
                                     Query(0).encode()).encode()
    assert dut.raw(DataObjectType.SECURED_CMA_SPDM, sess.channel.seal(msg)) is None
    req.finish(sid)
    assert km(req, sid).query().port_index == 0


def test_second_session_cannot_program_keys(dut: Dut) -> None:
    req = dut.requester()
    a, b = req.start_session(0), req.start_session(0)
    ca, cb = km(req, a), km(req, b)
    ca.query()
    with pytest.raises(SessionError, match="no response"):
        cb.key_prog(SID, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    with pytest.raises(SessionError, match="no response"):
        cb.query()
    assert not dut.device.ide.key_programmed(0, KeySet.K0, Direction.RX, SubStream.PR)
    req.heartbeat(b)                     # the dropped requests left session B in step
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    key_stream(ca)
    assert dut.state() == StreamState.SECURE
    # Ending the other session changes nothing.
    req.end_session(b)
    assert dut.state() == StreamState.SECURE


@pytest.mark.parametrize("how", ["end_session", "decrypt_error", "get_version"])
def test_session_loss_invalidates_keys_and_stream_goes_insecure(dut: Dut, how: str) -> None:
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    req, sid, c = session(dut)
    c.query()
    key_stream(c)
    assert dut.state() == StreamState.SECURE
    if how == "end_session":
        req.end_session(sid)
    elif how == "decrypt_error":
        record = bytearray(req.sessions[sid].channel.seal(codec.Heartbeat(req.version).encode()))
        record[-1] ^= 1                                  # the MAC no longer verifies
        out = dut.raw(DataObjectType.SECURED_CMA_SPDM, bytes(record))
        assert out is not None                           # ERROR(DecryptError), then ended
        assert sid not in dut.dsm.responder.sessions
    else:
        req.get_version()                                # a new connection resets the device
    assert dut.state() == StreamState.INSECURE
    ide = dut.device.ide
    assert not any(ide.key_programmed(SID, ks, d, s) for ks in KeySet for d in Direction
                   for s in SubStream)
    assert ide.streams[1].failure is not None and "closed" in ide.streams[1].failure
    # A new session may now program keys; Insecure stays latched until Enable 0 -> 1.
    req2 = dut.requester() if how == "get_version" else req
    sid2 = req2.start_session(0)
    c2 = km(req2, sid2)
    c2.query()
    key_stream(c2)
    assert dut.state() == StreamState.INSECURE
    dut.cfg_write(SEL0_CTL, SID << 24)
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    assert dut.state() == StreamState.SECURE


# -- malformed and unsupported --------------------------------------------------------------

def test_wrong_size_wrong_port_unknown_stream(dut: Dut) -> None:
    req, sid, c = session(dut)
    c.query()
    dut.cfg_write(SEL0_CTL, SID << 24)

    def kp(raw: bytes) -> bytes:
        return vendor(req, raw, sid)

    good = KeyProg(SID, KeySet.K0, Direction.RX, SubStream.PR, bytes(range(32))).encode()
    for raw, status in ((good[:-1], KpStatus.INCORRECT_LENGTH),
                        (good + b"\x00", KpStatus.INCORRECT_LENGTH),
                        (good[:7] + b"\x02" + good[8:], KpStatus.UNSUPPORTED_PORT_INDEX),
                        (good[:4] + bytes([SID + 1]) + good[5:], KpStatus.UNSUPPORTED_VALUE),
                        (good[:6] + b"\x30" + good[7:], KpStatus.UNSUPPORTED_VALUE),
                        (good, KpStatus.SUCCESS)):
        ack = kp(raw)       # KP_ACK echoes Stream ID, KSS and PortIndex as received
        assert ack == bytes((0, 3, 0, 0, raw[4], status, raw[6], raw[7])), raw.hex()
    assert KpAck.decode(ack).status_code == KpStatus.SUCCESS
    # No response at all: wrong-size QUERY, QUERY for a port we do not have, K_SET_GO for an
    # unknown stream or port, K_SET_GO before the key, a response object as a request.
    silent = [Query(0).encode() + b"\x00", Query(2).encode(),
              KSetGo(SID + 1, KeySet.K0, Direction.RX, SubStream.PR).encode(),
              KSetGo(SID, KeySet.K0, Direction.RX, SubStream.PR, port_index=2).encode(),
              KSetGo(SID, KeySet.K1, Direction.RX, SubStream.PR).encode(),
              QueryResp(0, 0, 0, 0, 0, dut.device.ide.ide_registers()).encode()]
    for raw in silent:
        with pytest.raises(SessionError, match="no response"):
            vendor(req, raw, sid)
    req.heartbeat(sid)
    c.k_set_go(SID, KeySet.K0, Direction.RX, SubStream.PR)   # the session is still fine


def test_other_pci_sig_protocols_and_vendors(dut: Dut) -> None:
    req, sid, _ = session(dut)
    with pytest.raises(ErrorResponse, match="UnsupportedRequest") as ei:
        vendor(req, b"\x07\x00", sid)                       # Protocol ID 7
    assert ei.value.data == RequestCode.VENDOR_DEFINED_REQUEST
    with pytest.raises(ErrorResponse, match="UnsupportedRequest"):   # CXL's VendorID
        req.vendor_request(PCI_SIG_STANDARD_ID, 0x1E98, b"\x00\x00", sid)
    with pytest.raises(ErrorResponse, match="InvalidRequest"):
        vendor(req, b"", sid)


# -- DMA under the keys IDE_KM programmed ---------------------------------------------------

def test_dma_crosses_the_link_under_ide_km_keys_and_survives_a_refresh(
        server: RunningServer, identity: pki.Identity) -> None:
    """Device keys via IDE_KM, the same keys mirrored into the root port: DMA goes over
    IDE (MACs check at both ends, so key and IFV byte order agree), and keeps going
    across a K0 -> K1 -> K0 refresh without a fault."""
    dut = attach(server.device, identity)
    dev, rp = server.device, server.machine.root_port
    rid = dev.link_end.requester_id
    dut.cfg_write(SEL0 + 0x0C, ROOT_PORT_ID << 8)
    dut.cfg_write(SEL0 + 0x10, ROOT_PORT_ID << 8 | 1)
    dut.cfg_write(SEL0_CTL, SID << 24)
    rp.setup_stream(SID, rid, rid)
    _, _, c = session(dut)
    c.query()

    def program(ks: KeySet) -> None:
        table = keys()
        c.program_keys(SID, ks, table)
        for (d, s), k in table.items():
            rp.program_key(SID, ks, Direction(1 - d), s, k)     # mirrored
        c.go_all(SID, ks, Direction.RX)
        rp.key_set_go(SID, ks, Direction.RX)
        c.go_all(SID, ks, Direction.TX)
        rp.key_set_go(SID, ks, Direction.TX)

    program(KeySet.K0)
    rp.enable_stream(SID, True)
    dut.cfg_write(SEL0_CTL, SID << 24 | 1)
    assert dut.state() == StreamState.SECURE

    client = server.client()
    fd = map_memfd(client, "ide-km-dma")
    try:
        enable_device(client)
        src = os.urandom(3000)
        os.pwrite(fd, src, 0)
        def run() -> None:
            assert run_job(client, Op.COPY, src=GUEST, dst=GUEST + SIZE // 2,
                           length=len(src)) == St.DONE
            assert os.pread(fd, len(src), SIZE // 2) == src
            assert run_job(client, Op.SHA256, src=GUEST, dst=GUEST + 0x8000,
                           length=len(src)) == St.DONE
            assert os.pread(fd, 32, 0x8000) == hashlib.sha256(src).digest()
            os.pwrite(fd, bytes(len(src) + 32), SIZE // 2)

        before = int(str(dev.link_end.status()["ide_tlps_tx"]))
        run()
        for ks in (KeySet.K1, KeySet.K0, KeySet.K1):
            program(ks)
            run()
            assert dut.state() == StreamState.SECURE
        # Two refreshes with no TLP in between: each receiver still holds the set it is
        # asked to reprogram, and moves to the GO one (teeio.ide.IdeRx.program).
        program(KeySet.K0)
        program(KeySet.K1)
        run()
        ep = {k: v for k, v in dev.link_end.status().items() if isinstance(v, int)}
        assert ep["ide_tlps_tx"] > before and ep["ide_tlps_rx"] > 0
        assert ep["ide_failures"] == 0
        assert dev.stats()["dma_errors"] == 0
        assert [s["state"] for s in rp.status()["streams"]] == ["secure"]   # type: ignore
    finally:
        os.close(fd)
        client.close()


def test_debug_logs_of_a_session_never_hold_ide_keys(dut: Dut,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    table = keys()
    with caplog.at_level("DEBUG"):
        req, sid, c = session(dut)
        for (d, sub), key in table.items():   # stream 0: the block's reset Stream ID
            c.key_prog(0, KeySet.K0, d, sub, key)   # raises unless KP_ACK says SUCCESS
    assert "VENDOR_DEFINED_REQUEST" in caplog.text   # session traffic is logged, by name
    for key in table.values():
        for form in (key.key, key_to_wire(key.key)):
            assert form.hex() not in caplog.text
