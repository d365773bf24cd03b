"""IDE extended capability: register layout and masks, and Status telling the truth."""

from __future__ import annotations

import pytest

from teeio.ide import (
    Direction,
    IdeIntegrityError,
    IdeKey,
    IdeKeyStateError,
    IdeRx,
    IdeTx,
    KeySet,
    SubStream,
)
from teeio.ide_km import expected_reg_count
from teeio.pcie.config import ConfigSpace, ExtCapId
from teeio.pcie.ide_cap import (
    IdeCapability,
    IdeCapReg,
    IdeStream,
    StreamKind,
    StreamState,
    build,
)
from teeio.tlp import Tlp

BASE = 0x100
SID = 9


def make() -> tuple[ConfigSpace, IdeCapability]:
    cs = ConfigSpace()
    return cs, build(cs, BASE, name="t")


def wr(cap: IdeCapability, off: int, value: int) -> None:
    cap.config_write(off, value.to_bytes(4, "little"))


def rd(cs: ConfigSpace, off: int) -> int:
    return int.from_bytes(cs.read(off, 4), "little")


def keys_both_ends(cap: IdeCapability, stream_id: int = SID, key_set: KeySet = KeySet.K0,
                   skip: tuple[Direction, SubStream] | None = None,
                   ) -> tuple[IdeTx, IdeRx]:
    """Program and GO all six keys at the device; return the partner's matching engines
    (partner Tx uses the device's Rx keys and vice versa)."""
    ptx, prx = IdeTx(stream_id), IdeRx(stream_id)
    for d in Direction:
        for s in SubStream:
            k = IdeKey.generate()
            cap.program_key(stream_id, key_set, d, s, k)
            (ptx if d == Direction.RX else prx).program(key_set, s, k)
    for d in (Direction.RX, Direction.TX):
        for s in SubStream:
            if (d, s) != skip:
                cap.key_set_go(stream_id, key_set, d, s)
    prx.go(key_set)
    ptx.go(key_set)
    return ptx, prx


def sel(cap: IdeCapability, i: int = 0) -> IdeStream:
    return cap.streams[1 + i]


def configure(cap: IdeCapability, st: IdeStream, enable: bool = False,
              stream_id: int = SID) -> None:
    wr(cap, st.ctl_off, stream_id << 24 | int(enable))


# --- layout and masks ------------------------------------------------------------------------

def test_layout() -> None:
    cs, cap = make()
    assert cs.find_ext_capability(ExtCapId.IDE) == BASE
    assert rd(cs, BASE) & 0xFFFF == 0x30 and rd(cs, BASE) >> 16 & 0xF == 1
    c = rd(cs, BASE + 4)
    assert c == (IdeCapReg.LINK_IDE | IdeCapReg.SELECTIVE_IDE | IdeCapReg.IDE_KM
                 | IdeCapReg.TEE_LIMITED | 1 << 16)
    assert (c >> 8) & 0x1F == 0                        # AES-GCM-256, 96-bit MAC
    assert [(s.kind, s.base - BASE) for s in cap.streams] == [
        (StreamKind.LINK, 0x0C), (StreamKind.SELECTIVE, 0x14), (StreamKind.SELECTIVE, 0x34)]
    assert cap.end - BASE == 0x54
    assert rd(cs, BASE + 0x14) == 1 and rd(cs, BASE + 0x34) == 1   # one addr block each
    regs = cap.ide_registers()
    assert expected_reg_count(regs) == len(regs) == (0x54 - 4) // 4


def test_write_masks() -> None:
    cs, cap = make()
    link, s0 = cap.streams[0], sel(cap)
    for off in (BASE + 4, BASE + 8, s0.base):          # capability, control, sel capability
        before = rd(cs, off)
        wr(cap, off, 0xFFFFFFFF)
        assert rd(cs, off) == before
    wr(cap, link.ctl_off, 0xFFFFFFFE)                  # everything but Enable
    assert rd(cs, link.ctl_off) == 0xFF3FC000          # ID, TC, algorithm; no DS/TL here
    wr(cap, s0.ctl_off, 0xFFFFFFFE)
    assert rd(cs, s0.ctl_off) == 0xFFFFC000            # no aggregation/PCRC/PHE/cfg bits
    wr(cap, s0.sts_off, 0xFFFFFFFF)
    assert rd(cs, s0.sts_off) == 0                     # state RO, fail bit RW1C
    wr(cap, s0.base + 0x0C, 0xFFFFFFFF)
    assert rd(cs, s0.base + 0x0C) == 0x00FFFF00
    wr(cap, s0.base + 0x10, 0xFFFFFFFF)
    assert rd(cs, s0.base + 0x10) == 0xFFFFFF01
    wr(cap, s0.base + 0x14, 0xFFFFFFFF)
    assert rd(cs, s0.base + 0x14) == 0xFFFFFF01
    for o in (0x18, 0x1C):
        wr(cap, s0.base + o, 0xFFFFFFFF)
        assert rd(cs, s0.base + o) == 0xFFFFFFFF


def test_no_tee_limited_no_link() -> None:
    cs = ConfigSpace()
    cap = build(cs, BASE, link=False, n_selective=1, n_addr=2, tee_limited=False)
    assert rd(cs, BASE + 4) == IdeCapReg.SELECTIVE_IDE | IdeCapReg.IDE_KM
    s0 = cap.streams[0]
    assert s0.base == BASE + 0x0C and cap.end == BASE + 0x0C + 20 + 24
    wr(cap, s0.ctl_off, 0xFFFFFFFE)
    assert rd(cs, s0.ctl_off) == 0xFF7FC000            # TEE-Limited is RsvdP here
    with pytest.raises(ValueError):
        build(ConfigSpace(), BASE, n_addr=16)


def test_associations_decode() -> None:
    _, cap = make()
    s0 = sel(cap)
    assert s0.rid_range is None and s0.address_ranges() == []
    wr(cap, s0.base + 0x0C, 0x01FF << 8)               # RID limit
    wr(cap, s0.base + 0x10, 0x0100 << 8 | 1)           # RID base, valid
    assert s0.rid_range == (0x0100, 0x01FF)
    # Linux PCI_IDE_SEL_ADDR_1(v, base, limit) for 0x1_2340_0000 .. 0x1_235F_FFFF
    base, limit = 0x1_2340_0000, 0x1_235F_FFFF
    wr(cap, s0.base + 0x14, (limit >> 20 & 0xFFF) << 20 | (base >> 20 & 0xFFF) << 8 | 1)
    wr(cap, s0.base + 0x18, limit >> 32)
    wr(cap, s0.base + 0x1C, base >> 32)
    assert s0.address_ranges() == [(base, limit)]
    assert cap.contains(s0.base + 0x1C, 4) and not cap.contains(cap.end, 4)


# --- status transitions ----------------------------------------------------------------------

def state(cs: ConfigSpace, st: IdeStream) -> int:
    return rd(cs, st.sts_off) & 0xF


def test_secure_right_after_enable_when_keys_went_go() -> None:
    """Linux sets Enable then immediately reads Status expecting Secure."""
    cs, cap = make()
    s0 = sel(cap)
    configure(cap, s0)
    keys_both_ends(cap)
    assert state(cs, s0) == StreamState.INSECURE       # keys ready, Enable clear
    configure(cap, s0, enable=True)
    assert state(cs, s0) == StreamState.SECURE
    assert s0.secure and s0.stream_id == SID


def test_secure_at_the_last_go_when_enabled_first() -> None:
    cs, cap = make()
    s0 = sel(cap)
    configure(cap, s0, enable=True)
    keys_both_ends(cap, skip=(Direction.TX, SubStream.CPL))
    assert state(cs, s0) == StreamState.INSECURE       # five of six
    cap.key_set_go(SID, KeySet.K0, Direction.TX, SubStream.CPL)
    assert state(cs, s0) == StreamState.SECURE


def test_enable_clear_reads_insecure() -> None:
    cs, cap = make()
    s0 = sel(cap)
    configure(cap, s0)
    keys_both_ends(cap)
    configure(cap, s0, enable=True)
    configure(cap, s0, enable=False)
    assert state(cs, s0) == StreamState.INSECURE
    configure(cap, s0, enable=True)                    # keys are still there
    assert state(cs, s0) == StreamState.SECURE


def test_unsupported_algorithm_stays_insecure() -> None:
    cs, cap = make()
    s0 = sel(cap)
    configure(cap, s0)
    keys_both_ends(cap)
    wr(cap, s0.ctl_off, SID << 24 | 1 << 14 | 1)
    assert state(cs, s0) == StreamState.INSECURE


def secure_stream() -> tuple[ConfigSpace, IdeCapability, IdeStream, IdeTx, IdeRx]:
    cs, cap = make()
    s0 = sel(cap)
    configure(cap, s0)
    ptx, prx = keys_both_ends(cap)
    configure(cap, s0, enable=True)
    assert s0.secure
    return cs, cap, s0, ptx, prx


def test_traffic_both_ways() -> None:
    _, _, s0, ptx, prx = secure_stream()
    req = Tlp.memory_read(0x0000, 1, 0x1_0000_0000, 16, t_bit=True)
    got = s0.unprotect(ptx.protect(req))
    assert got.t_bit and got.stream_id == SID
    cpl = Tlp.completion_for(got, 0x0100, bytes(16))
    assert prx.unprotect(s0.protect(cpl)).payload_bytes() == bytes(16)


def test_integrity_failure_latches_insecure() -> None:
    cs, cap, s0, ptx, prx = secure_stream()
    events: list[str] = []
    cap.listeners.append(lambda st, ev: events.append(ev))
    wire = bytearray(ptx.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd", t_bit=True)))
    wire[-1] ^= 1
    with pytest.raises(IdeIntegrityError):
        s0.unprotect(bytes(wire))
    assert state(cs, s0) == StreamState.INSECURE
    assert events and events[0].startswith("insecure: ")
    with pytest.raises(IdeIntegrityError, match="not Secure"):
        s0.unprotect(ptx.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd")))
    with pytest.raises(IdeKeyStateError, match="not Secure"):
        s0.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd"))
    # Re-keying alone does not bring it back; Enable 0 -> 1 with fresh keys does.
    s0.rx.reset()
    keys_both_ends(cap, key_set=KeySet.K1)
    assert state(cs, s0) == StreamState.INSECURE
    configure(cap, s0)
    configure(cap, s0, enable=True)
    assert state(cs, s0) == StreamState.SECURE


def test_stop_alone_keeps_secure_but_use_of_the_stopped_set_does_not() -> None:
    cs, cap, s0, ptx, prx = secure_stream()
    cap.key_set_stop(SID, KeySet.K0, Direction.RX, SubStream.PR)
    assert state(cs, s0) == StreamState.SECURE          # §6.33.3: STOP is not itself an error
    with pytest.raises(IdeIntegrityError, match="not GO"):
        s0.unprotect(ptx.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd")))
    assert state(cs, s0) == StreamState.INSECURE


def test_tx_use_of_a_stopped_set_is_reported() -> None:
    cs, cap, s0, _, _ = secure_stream()
    cap.key_set_stop(SID, KeySet.K0, Direction.TX, SubStream.PR)
    with pytest.raises(IdeKeyStateError):
        s0.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd"))
    assert state(cs, s0) == StreamState.INSECURE


def test_refresh_keeps_secure() -> None:
    cs, cap, s0, ptx, prx = secure_stream()
    new = {(d, s): IdeKey.generate() for d in Direction for s in SubStream}
    for (d, s), k in new.items():
        cap.program_key(SID, KeySet.K1, d, s, k)
        (ptx if d == Direction.RX else prx).program(KeySet.K1, s, k)
    for s in SubStream:
        cap.key_set_go(SID, KeySet.K1, Direction.RX, s)
    prx.go(KeySet.K1)
    for s in SubStream:
        cap.key_set_go(SID, KeySet.K1, Direction.TX, s)
    ptx.go(KeySet.K1)
    for d in Direction:
        for s in SubStream:
            cap.key_set_stop(SID, KeySet.K0, d, s)
    ptx.stop(KeySet.K0)
    assert state(cs, s0) == StreamState.SECURE
    assert s0.unprotect(ptx.protect(Tlp.memory_write(0, 1, 0x2000, b"abcd"))).key_set == 1
    assert prx.unprotect(s0.protect(Tlp.memory_write(0, 1, 0x2000, b"efgh"))).key_set == 1


@pytest.mark.parametrize("event", ["session", "link_down"])
def test_session_loss_and_link_down(event: str) -> None:
    cs, cap, s0, _, _ = secure_stream()
    if event == "session":
        cap.invalidate_all("session closed")
    else:
        cap.link_down()
    assert state(cs, s0) == StreamState.INSECURE
    assert not cap.key_programmed(SID, KeySet.K0, Direction.RX, SubStream.PR)
    assert s0.failure is not None


def test_reset_restores_defaults() -> None:
    cs, cap, s0, _, _ = secure_stream()
    cap.report_fail_message(SID)
    wr(cap, s0.base + 0x10, 0x0100 << 8 | 1)
    cap.reset()
    assert state(cs, s0) == StreamState.INSECURE
    assert rd(cs, s0.ctl_off) == 0 and rd(cs, s0.sts_off) == 0 and rd(cs, s0.base + 0x10) == 0
    assert rd(cs, s0.base) == 1                          # RO capability kept
    assert not cap.has_stream(SID)


def test_fail_message_bit_is_rw1c() -> None:
    cs, cap, s0, _, _ = secure_stream()
    cap.report_fail_message(SID)
    assert rd(cs, s0.sts_off) == 1 << 31 | StreamState.SECURE
    wr(cap, s0.sts_off, 1 << 31)
    assert rd(cs, s0.sts_off) == StreamState.SECURE


def test_stream_id_change() -> None:
    cs, cap, s0, _, _ = secure_stream()
    wr(cap, s0.ctl_off, (SID + 1) << 24 | 1)             # changed while enabled
    assert state(cs, s0) == StreamState.INSECURE
    assert s0.tx.stream_id == SID + 1 and not cap.key_programmed(
        SID + 1, KeySet.K0, Direction.TX, SubStream.PR)
    assert not cap.has_stream(SID) and cap.has_stream(SID + 1)


def test_key_ops_for_unknown_stream_refused() -> None:
    _, cap = make()
    with pytest.raises(IdeKeyStateError, match="Stream ID 77"):
        cap.program_key(77, KeySet.K0, Direction.RX, SubStream.PR, IdeKey.generate())
    assert not cap.key_programmed(77, KeySet.K0, Direction.RX, SubStream.PR)


def test_enabled_block_wins_for_a_shared_stream_id() -> None:
    _, cap = make()
    configure(cap, sel(cap, 0), stream_id=3)
    configure(cap, sel(cap, 1), stream_id=3, enable=True)
    assert cap.stream(3) is sel(cap, 1)
    assert cap.stream(0) is cap.streams[0]               # link block, Stream ID 0 at reset
