"""The TSM's Selective IDE streams (PCIe 6.x §6.33): setup, key refresh, teardown, status.

A stream joins a Selective IDE stream block of the device, keyed through IDE_KM in an SPDM
secured session (§6.33.3, :class:`teeio.ide_km.IdeKmClient`), and the root port's stream,
keyed over the platform control socket with the same keys in mirrored directions: the
device's Tx key is the root port's Rx key; optionally with IDE aggregation (§6.33.6) at
both ends when both support it.  ``teeio-tsm ide`` (:mod:`tsm.ide_cli`) and the TSM
daemon drive it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from teeio.ide import UNIT_TLPS_MODES, Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID, IdeKmClient, QueryResp
from teeio.platform_channel import StreamState
from teeio.spdm import Requester
from tsm.ide_regs import IdeError, IdeRegisters, StreamBlock

log = logging.getLogger(__name__)

DEFAULT_STREAM_ID = 1
CAP_AGGREGATION = 1 << 4        # IDE Capability: Aggregation Supported (§7.9.26.2)
KeyTable = dict[tuple[Direction, SubStream], IdeKey]
_RP_DIR = {Direction.RX: "rx", Direction.TX: "tx"}


class PlatformCalls(Protocol):
    """What the TSM needs of the platform control socket (``PlatformClient``)."""

    def call(self, op: str, **args: Any) -> dict[str, Any]: ...

    def key_prog(self, stream_id: int, direction: str, substream: str, key_set: int,
                 key: IdeKey) -> None: ...


def fresh_keys() -> KeyTable:
    """Six fresh random AES-256 keys (IFV 1) for one key set, by the device's direction."""
    return {(d, s): IdeKey.generate() for d in Direction for s in SubStream}


def program_root_port(rp: PlatformCalls, stream_id: int, key_set: KeySet,
                      device_keys: KeyTable) -> None:
    """The root port's half of one key set: the device's keys with directions mirrored
    (what the device transmits with, the root port receives with)."""
    for (d, s), key in device_keys.items():
        mirrored = Direction.TX if d == Direction.RX else Direction.RX
        rp.key_prog(stream_id, _RP_DIR[mirrored], s.name, int(key_set), key)


def root_port_go(rp: PlatformCalls, stream_id: int, key_set: KeySet, direction: Direction,
                 stop: bool = False) -> None:
    """K_SET_GO (or K_SET_STOP) of *key_set* in the root port's *direction*, every
    sub-stream."""
    rp.call("key_set_stop" if stop else "key_set_go", stream_id=stream_id,
            direction=_RP_DIR[direction], key_set=int(key_set))


def root_port_stream(rp: PlatformCalls, stream_id: int) -> dict[str, Any] | None:
    streams = rp.call("status")["root_port"].get("streams", [])
    for s in streams:
        if isinstance(s, dict) and s.get("id") == stream_id:
            return s
    return None


@dataclass
class SelectiveStream:
    """One Selective IDE stream: the device's block *block* as Stream ID *stream_id*,
    and the root port's stream of the same ID.  *km* is None when there is no SPDM
    session (then only :meth:`status` through the host register read works)."""

    rp: PlatformCalls
    km: IdeKmClient | None
    stream_id: int = DEFAULT_STREAM_ID
    block: int = 0
    out: Callable[[str], None] = print
    key_set: KeySet = KeySet.K0
    device_rid: int | None = None
    cap_offset: int = 0
    query: QueryResp | None = field(default=None, repr=False)
    #: TLPs per aggregated unit asked for (§6.33.6; 1: none), on every sub-stream at both
    #: ends -- used only if both support aggregation; :attr:`aggregation_used` says
    aggregation: int = 1
    aggregation_used: int = 1

    def __post_init__(self) -> None:
        if self.aggregation not in UNIT_TLPS_MODES:
            raise IdeError(f"aggregation: {self.aggregation} TLPs per unit is not one of "
                           f"{', '.join(map(str, UNIT_TLPS_MODES))}")

    # -- device side: IDE_KM and the host's register access --------------------------------
    def _km(self) -> IdeKmClient:
        if self.km is None:
            raise IdeError("no SPDM session to the device for IDE_KM")
        return self.km

    def do_query(self) -> IdeRegisters:
        q = self._km().query()
        self.query = q
        self.device_rid = q.bus << 8 | q.dev_func
        return IdeRegisters.decode(q.regs)

    def host_read(self) -> IdeRegisters:
        r = self.rp.call("ide_config_read")
        self.cap_offset = int(r["offset"])
        return IdeRegisters.decode([int(v) for v in r["registers"]])

    def host_write(self, rel: int, value: int) -> int:
        return int(self.rp.call("ide_config_write", offset=self.cap_offset + rel,
                                value=value)["value"])

    def device_block(self, via_query: bool = True) -> StreamBlock:
        regs = self.do_query() if via_query else self.host_read()
        return regs.selective(self.block)

    # -- operations ------------------------------------------------------------------------
    def setup(self) -> dict[str, Any]:
        """Set the stream up; returns its status (both ends Secure).

        1. QUERY -> QUERY_RESP: the function's bus/dev/fn and its IDE registers;
        2. the host's register writes (as Linux ``drivers/pci/ide.c`` does them, through
           the platform socket's ``ide_config_write``): the block's Control with the
           Stream ID and Enable clear, RID Association = the root port's RID, one Address
           Association block covering all memory;
        3. the root port: ``stream_setup`` for the device's RID;
        4. fresh keys for K0 (Rx/Tx x PR/NPR/CPL): KEY_PROG x 6 at both ends (mirrored);
        5. K_SET_GO Rx at both ends, then Tx at both (§6.33.3's order);
        6. Enable: the root port first (it must accept IDE TLPs before the device sends
           any), then the device; its Status must then read Secure (via QUERY_RESP)."""
        out = self.out
        regs = self.do_query()
        q = self.query
        assert q is not None and self.device_rid is not None
        if not regs.capability & (1 << 6):
            raise IdeError("the device's IDE capability does not support IDE_KM")
        sel = regs.selective(self.block)
        out(f"QUERY_RESP: {q.segment:02x}:{q.bus:02x}:{q.dev_func >> 3:02x}."
            f"{q.dev_func & 7} MaxPortIndex {q.max_port_index}, IDE capability "
            f"{regs.capability:#010x}, {sum(b.kind == 'selective' for b in regs.blocks)} "
            f"selective stream block(s)")
        if sel.enabled and sel.stream_id != self.stream_id:
            raise IdeError(f"selective block {self.block} is enabled for stream "
                           f"{sel.stream_id}; tear that one down first")
        for b in regs.blocks:
            if b is not sel and b.stream_id == self.stream_id and self.stream_id:
                raise IdeError(f"stream {self.stream_id} is already on {b.kind} block "
                               f"{b.index}; tear it down first (or pick another --stream-id)")
        rp_status = self.rp.call("status")["root_port"]
        rp_rid = int(rp_status["completer_id"])
        modes = self._aggregation_modes(regs.capability, bool(rp_status.get(
            "aggregation_supported")))

        # Host: the block's registers (Stream ID, Tx Aggregation Mode, Enable clear; RID and
        # address association).
        self.host_read()
        self.host_write(sel.control_offset, self.stream_id << 24 | modes)
        self.host_write(sel.offset + 0x0C, rp_rid << 8)                # RID Limit
        self.host_write(sel.offset + 0x10, rp_rid << 8 | 1)            # RID Base, Valid
        if sel.addr:                                                   # all of memory
            self.host_write(sel.offset + 0x14, 0xFFF << 20 | 1)
            self.host_write(sel.offset + 0x18, 0xFFFF_FFFF)
            self.host_write(sel.offset + 0x1C, 0)
        out(f"device: selective block {self.block} = stream {self.stream_id}, partner RID "
            f"{rp_rid:#06x} (host config writes at {self.cap_offset + sel.offset:#x})")

        # Root port: a fresh stream for the device's RID (stale ones for it removed).
        for s in rp_status.get("streams", []):
            if (s.get("rid_base", 0) <= self.device_rid <= s.get("rid_limit", -1)
                    and s.get("id") != self.stream_id):
                self.rp.call("stream_remove", stream_id=s["id"])
                out(f"root port: removed stale stream {s['id']} for RID {self.device_rid:#06x}")
        self.rp.call("stream_setup", stream_id=self.stream_id, rid_base=self.device_rid,
                     rid_limit=self.device_rid)
        out(f"root port: stream {self.stream_id} for RID {self.device_rid:#06x}")
        if self.aggregation_used > 1:      # before Enable (§6.33.6)
            self.rp.call("stream_aggregation", stream_id=self.stream_id,
                         unit_tlps={s.name: self.aggregation_used for s in SubStream})

        self.key_set = KeySet.K0
        self._program(self.key_set)
        self.rp.call("stream_enable", stream_id=self.stream_id, enable=True)
        self.host_write(sel.control_offset, self.stream_id << 24 | modes | 1)
        out("enabled: root port, then device (host config write of Enable)")
        return self._expect_secure("after setup")

    def _aggregation_modes(self, device_capability: int, root_port: bool) -> int:
        """The Tx Aggregation Mode bits of the device's Stream Control (NPR [3:2], PR [5:4],
        CPL [7:6], §7.9.26.4.1) for :attr:`aggregation` -- 0 unless it is asked for and both
        ends support it (Aggregation Supported) -- and :attr:`aggregation_used`."""
        self.aggregation_used = 1
        if self.aggregation == 1:
            return 0
        missing = [who for who, ok in (("device", device_capability & CAP_AGGREGATION),
                                       ("root port", root_port)) if not ok]
        if missing:
            self.out(f"aggregation: not supported by the {' and the '.join(missing)}; off")
            return 0
        self.aggregation_used = self.aggregation
        code = UNIT_TLPS_MODES.index(self.aggregation)
        self.out(f"aggregation: up to {self.aggregation} TLPs per MAC on every sub-stream, "
                 "both ends")
        return code << 2 | code << 4 | code << 6

    def _program(self, key_set: KeySet) -> None:
        """Fresh keys for *key_set*: KEY_PROG × 6 at both ends, then K_SET_GO Rx at both,
        Tx at both."""
        km = self._km()
        keys = fresh_keys()
        km.program_keys(self.stream_id, key_set, keys)
        program_root_port(self.rp, self.stream_id, key_set, keys)
        self.out(f"KEY_PROG × 6 ({key_set.name}, fresh random keys): device (IDE_KM, KP_ACK "
                 "success) and root port (mirrored)")
        km.go_all(self.stream_id, key_set, Direction.RX)
        root_port_go(self.rp, self.stream_id, key_set, Direction.RX)
        km.go_all(self.stream_id, key_set, Direction.TX)
        root_port_go(self.rp, self.stream_id, key_set, Direction.TX)
        self.out(f"K_SET_GO {key_set.name}: Rx at device and root port, then Tx at both")

    def refresh(self) -> dict[str, Any]:
        """Switch to fresh keys in the other key set; returns the status.  Each Tx moves
        to the new set with its next TLP, each Rx keeps accepting the old one until the
        first TLP under the new, so DMA in flight is not lost.  No K_SET_STOP: the next
        refresh reprograms the old set, which every Tx left a refresh ago (as Intel's
        tee-io-validator does)."""
        old = self.key_set
        new = KeySet(1 - old)
        self._program(new)
        self.key_set = new
        self.out(f"refresh: {old.name} -> {new.name}; each receiver switches at the first "
                 f"TLP under {new.name}")
        return self._expect_secure("after the refresh")

    def teardown(self) -> None:
        """Both ends back to no stream: the device's Enable cleared (it stops sending IDE
        TLPs first), the root port's, K_SET_STOP for every key at both ends, the root
        port's stream removed, the device's block registers cleared.  Tolerates a
        half-set-up or already reset state: only what still exists is stopped and
        removed."""
        regs = self.do_query()
        self.host_read()
        sel = regs.selective(self.block)
        if sel.stream_id not in (0, self.stream_id):
            raise IdeError(f"selective block {self.block} carries stream {sel.stream_id}, "
                           f"not {self.stream_id}")
        if sel.enabled:
            self.host_write(sel.control_offset, sel.stream_id << 24)      # Enable clear
        rp = root_port_stream(self.rp, self.stream_id)
        if rp is not None:
            self.rp.call("stream_enable", stream_id=self.stream_id, enable=False)
        self.out("disabled: device (host config write), then root port")
        if any(b.stream_id == self.stream_id for b in regs.blocks):
            # (K_SET_STOP for a Stream ID no block carries would get no response.)
            for ks in KeySet:
                self._km().stop_all(self.stream_id, ks)
        if rp is not None:
            for ks in KeySet:
                for d in Direction:
                    root_port_go(self.rp, self.stream_id, ks, d, stop=True)
            self.rp.call("stream_remove", stream_id=self.stream_id)
        self.out("K_SET_STOP for K0 and K1 at both ends; root port stream removed")
        for rel in range(sel.control_offset, sel.offset + 0x14 + 12 * len(sel.addr), 4):
            self.host_write(rel, 0)
        self.out(f"device: selective block {self.block} registers cleared")

    def status(self, via_query: bool | None = None) -> dict[str, Any]:
        """The device's stream block (via QUERY_RESP in the session, or the host register
        read) and the root port's stream (state, enable, key sets) from the platform
        socket."""
        via = self.km is not None if via_query is None else via_query
        blk = self.device_block(via_query=via)
        rp = root_port_stream(self.rp, self.stream_id)
        dev = blk.as_dict()
        self.out(f"device: selective block {blk.index} stream {blk.stream_id} "
                 f"{'enabled' if blk.enabled else 'disabled'}, {blk.state.upper()} "
                 f"({'QUERY_RESP' if via else 'host register read'})")
        if rp is None:
            self.out(f"root port: no stream {self.stream_id}")
        else:
            active = sorted({v.get("active") or "-" for end in rp.get("keys", {}).values()
                             for v in end.values()})
            enabled = "enabled" if rp.get("enabled") else "disabled"
            why = f", insecure: {rp['insecure_reason']}" if rp.get("insecure_reason") else ""
            self.out(f"root port: stream {rp.get('id')} {enabled}, "
                     f"{str(rp.get('state')).upper()}, key sets in use {'/'.join(active)}{why}")
        return {"stream_id": self.stream_id, "key_set": self.key_set.name,
                "aggregation": self.aggregation_used,
                "device": dev, "device_via": "query_resp" if via else "host_config",
                "root_port": rp}

    def _expect_secure(self, when: str) -> dict[str, Any]:
        st = self.status()
        if st["device"]["state"] != StreamState.SECURE:
            raise IdeError(f"{when}: the device's stream is {st['device']['state']}, not "
                           "Secure")
        if st["root_port"] is None or st["root_port"].get("state") != StreamState.SECURE:
            raise IdeError(f"{when}: the root port's stream is not Secure")
        return st



def ide_client(req: Requester, sid: int, port_index: int = 0) -> IdeKmClient:
    """IDE_KM over VENDOR_DEFINED (PCI-SIG, VendorID 0x0001) in session *sid*."""
    return IdeKmClient(lambda p: req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID,
                                                    p, sid), port_index)



__all__ = ["CAP_AGGREGATION", "DEFAULT_STREAM_ID", "IdeError", "IdeRegisters", "KeyTable",
           "PlatformCalls", "SelectiveStream", "StreamBlock", "fresh_keys", "ide_client",
           "program_root_port", "root_port_go", "root_port_stream"]
