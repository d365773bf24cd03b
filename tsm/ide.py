"""``teeio-tsm ide``: a Selective IDE stream between the device and its root port, keyed
by the TSM.

    teeio-tsm ide {setup,refresh,teardown,status,demo}
        (--doe-socket PATH | --doe-tcp-port N [--host H]) --trust-anchor PEM
        [--reference-values JSON] [--nonce HEX]
        --platform-socket PATH --platform-credential FILE
        [--stream-id N] [--block N] [--query] [--pause | --hold SECONDS] [--json OUT]

The device is first attested exactly as ``teeio-tsm attest`` does it (``tsm/attest.py``:
chain up to ``--trust-anchor``, CHALLENGE, signed measurements, ``--reference-values``),
then a KEY_EXCHANGE/FINISH session is opened and IDE_KM (PCIe 6.x §6.33.3) runs inside
it as VENDOR_DEFINED messages (PCI-SIG, VendorID 0x0001, Protocol ID 0), with
:class:`teeio.ide_km.IdeKmClient`.  The other end of the stream, the root port, is
programmed over the device server's platform control socket (``--platform-socket``,
authenticated with the credential file only the TSM can read), with the same keys in
mirrored directions: the device's Tx key is the root port's Rx key.

Setting up Selective stream *block* of the device's IDE capability as Stream ID *N*:

1. QUERY (PortIndex 0) → QUERY_RESP: the function's bus/dev/fn and its IDE registers;
2. the host's register writes (Linux ``drivers/pci/ide.c`` does these): the block's
   Control with the Stream ID and Enable clear, RID Association = the root port's RID
   (read from the root port's status), one Address Association block covering all
   memory.  There is no host access path to the device yet (docs/design.md decision 12), so the
   TSM writes them through the ``ide_config_write`` operation the device server adds to
   the platform socket (its host-side IDE register access) -- the same config-write path
   QEMU's writes take;
3. the root port: ``stream_setup`` for the device's RID;
4. fresh random keys for key set K0, six of them (Rx/Tx × PR/NPR/CPL): KEY_PROG × 6 at
   the device, ``key_prog`` × 6 at the root port (mirrored);
5. K_SET_GO Rx at both ends, then Tx at both (§6.33.3's order);
6. Enable: the root port first (it must accept IDE TLPs before the device sends any),
   then the device's Enable bit (host config write) -- the device's Status register
   must then read Secure, which is checked through QUERY_RESP.

Refresh (``demo``): fresh keys into the *other* key set at both ends, K_SET_GO Rx at both
ends, then Tx at both.  Each Tx moves to the new set with its next TLP; each Rx keeps
accepting the old set until the first TLP with the new one, so DMA in flight across the
switch is not lost.  No K_SET_STOP: the next refresh reprograms the old set, which every
Tx left a refresh ago (``teeio.ide.IdeRx.program``), as Intel's tee-io-validator does.

Teardown: the device's Enable cleared (the device stops sending IDE TLPs first), the
root port's cleared, K_SET_STOP for every key at both ends, the root port's stream
removed, the device's block registers cleared.

Status: the device's stream block from its IDE registers -- through QUERY_RESP inside
the session, or (``status`` without ``--query``) through the host register read -- and
the root port's stream (state, enable, key sets per direction and sub-stream) from the
platform socket.

Sessions and the one-shot CLI.  The device's IDE_KM binds to the SPDM session that
programmed the keys: keys live as long as it does, IDE_KM from any other session is
ignored while it is open, and when it ends (END_SESSION, a decrypt error, or the next
requester's GET_VERSION) every key is invalidated and the stream goes Insecure.  A real
TSM keeps that session between setup and the later operations; that is the persistent
TSM daemon's job (``teeio-tsm daemon``).  This CLI is one process per command, so:

* ``demo`` does it all in one run and one session: setup, status, (traffic: ``--pause``
  waits for a line on stdin, ``--hold S`` sleeps, so DMA can run), refresh, status,
  (traffic), teardown, END_SESSION -- and checks the device's stream is Insecure after;
* ``setup`` leaves its session open in the device (the connection ends with CONTINUE, not
  END_SESSION), so the stream stays Secure for the guest's DMA -- until the next SPDM
  connection to the device (any ``teeio-tsm attest`` or ``ide`` run) ends it;
* ``status`` without ``--query`` uses no SPDM, so it does not disturb that session;
  ``--query`` opens a new one (ending setup's) to read the registers via QUERY_RESP;
* ``teardown`` opens a new session (which already invalidates setup's keys) and cleans
  up both ends;
* ``refresh`` cannot work without setup's session and says so (use ``demo``).

Exit 0 on success; 1 and one line on stderr (``ide <command> FAILED: <reason>``)
otherwise.  ``--json OUT`` writes the last status (device block, root port stream).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from teeio.ide import Direction, IdeKey, KeySet, SubStream
from teeio.ide_km import (
    PCI_SIG_STANDARD_ID,
    PCI_SIG_VENDOR_ID,
    IdeKmClient,
    IdeKmError,
    QueryResp,
)
from teeio.platform_channel import PlatformClient, PlatformCtlError, StreamState, read_credential
from teeio.spdm import Requester, RequesterError
from tsm import attest
from tsm.attest import Attestation, AttestError, AttestOptions
from tsm.doe_client import DoeTransportError

log = logging.getLogger(__name__)

COMMANDS = ("setup", "refresh", "teardown", "status", "demo")
DEFAULT_STREAM_ID = 1
#: Stream Status [3:0] (PCIe 6.x §7.9.26.4.2) as the platform channel names a state.
STATE_NAMES = {0: StreamState.INSECURE, 2: StreamState.SECURE}
KeyTable = dict[tuple[Direction, SubStream], IdeKey]
_RP_DIR = {Direction.RX: "rx", Direction.TX: "tx"}


class IdeError(Exception):
    """An IDE operation failed; the message is the one-line reason."""


# -- the IDE capability's registers (sans-IO) ----------------------------------------------

@dataclass(frozen=True)
class StreamBlock:
    """One stream register block of an IDE capability (PCIe 6.x §7.9.26), as read."""

    kind: str                 # "link" or "selective"
    index: int
    offset: int               # bytes from the start of the capability
    control: int
    status: int
    rid1: int = 0
    rid2: int = 0
    addr: tuple[tuple[int, int, int], ...] = ()

    @property
    def control_offset(self) -> int:
        return self.offset + (0 if self.kind == "link" else 4)

    @property
    def stream_id(self) -> int:
        return self.control >> 24

    @property
    def enabled(self) -> bool:
        return bool(self.control & 1)

    @property
    def state(self) -> str:
        """A :class:`StreamState`, or ``"state N"`` for a reserved encoding."""
        return STATE_NAMES.get(self.status & 0xF, f"state {self.status & 0xF}")

    @property
    def rid_range(self) -> tuple[int, int] | None:
        if self.kind == "link" or not self.rid2 & 1:
            return None
        return self.rid2 >> 8 & 0xFFFF, self.rid1 >> 8 & 0xFFFF

    def as_dict(self) -> dict[str, Any]:
        rid = self.rid_range
        return {"kind": self.kind, "index": self.index, "stream_id": self.stream_id,
                "enabled": self.enabled, "state": self.state,
                "fail_message_received": bool(self.status >> 31),
                "rid_range": None if rid is None else [f"{rid[0]:#06x}", f"{rid[1]:#06x}"]}


@dataclass(frozen=True)
class IdeRegisters:
    """The IDE capability contents minus its header (what QUERY_RESP carries)."""

    capability: int
    control: int
    blocks: tuple[StreamBlock, ...]

    @classmethod
    def decode(cls, regs: tuple[int, ...] | list[int]) -> IdeRegisters:
        regs = tuple(regs)
        if len(regs) < 2:
            raise IdeError("IDE registers: fewer than the capability and control DWs")
        cap = regs[0]
        blocks: list[StreamBlock] = []
        i = 2

        def take(n: int) -> tuple[int, ...]:
            nonlocal i
            if i + n > len(regs):
                raise IdeError(f"IDE registers end at DW {len(regs)}, inside a stream block")
            out = regs[i:i + n]
            i += n
            return out

        if cap & 1:
            for tc in range((cap >> 13 & 7) + 1):
                off = 4 + 4 * i
                ctl, sts = take(2)
                blocks.append(StreamBlock("link", tc, off, ctl, sts))
        if cap & 2:
            for n in range((cap >> 16 & 0xFF) + 1):
                off = 4 + 4 * i
                sel_cap, ctl, sts, rid1, rid2 = take(5)
                addr = take(3 * (sel_cap & 0xF))
                blocks.append(StreamBlock("selective", n, off, ctl, sts, rid1, rid2,
                                          tuple(zip(addr[0::3], addr[1::3], addr[2::3],
                                                    strict=True))))
        return cls(cap, regs[1], tuple(blocks))

    def selective(self, index: int) -> StreamBlock:
        for b in self.blocks:
            if b.kind == "selective" and b.index == index:
                return b
        n = sum(b.kind == "selective" for b in self.blocks)
        raise IdeError(f"the device has no Selective IDE stream block {index} ({n} blocks)")


# -- the two ends ---------------------------------------------------------------------------

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
        """Set the stream up; returns its status (both ends Secure)."""
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

        # Host: the block's registers (Stream ID, Enable clear; RID and address association).
        self.host_read()
        self.host_write(sel.control_offset, self.stream_id << 24)
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

        self.key_set = KeySet.K0
        self._program(self.key_set)
        self.rp.call("stream_enable", stream_id=self.stream_id, enable=True)
        self.host_write(sel.control_offset, self.stream_id << 24 | 1)
        out("enabled: root port, then device (host config write of Enable)")
        return self._expect_secure("after setup")

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
        """Switch to fresh keys in the other key set; returns the status."""
        old = self.key_set
        new = KeySet(1 - old)
        self._program(new)
        self.key_set = new
        self.out(f"refresh: {old.name} -> {new.name}; each receiver switches at the first "
                 f"TLP under {new.name}")
        return self._expect_secure("after the refresh")

    def teardown(self) -> None:
        """Both ends back to no stream.  Tolerates a half-set-up or already reset state:
        only what still exists is stopped and removed."""
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


# -- command line ---------------------------------------------------------------------------

@dataclass
class IdeOptions:
    attest: AttestOptions
    platform_socket: str
    platform_credential: Path
    stream_id: int = DEFAULT_STREAM_ID
    block: int = 0
    query: bool = False
    pause: bool = False
    hold: float = 0.0
    json_out: Path | None = None


def platform_client(opts: IdeOptions) -> PlatformClient:
    try:
        token = read_credential(opts.platform_credential)
    except (OSError, ValueError) as exc:
        raise IdeError(f"platform credential {opts.platform_credential}: {exc}") from None
    try:
        return PlatformClient(opts.platform_socket, token)
    except OSError as exc:
        raise IdeError(f"platform socket {opts.platform_socket}: cannot connect: "
                       f"{exc.strerror or exc}") from None


@contextlib.contextmanager
def spdm_session(opts: IdeOptions, run: Attestation, end: bool,
                  ) -> Iterator[tuple[Requester, int]]:
    """Attest, open a session; END_SESSION on the way out if *end*, and also after a
    failure (fail-safe: the device then drops every key the session programmed)."""
    with attest.attested(opts.attest, run) as (req, _blocks):
        sid = req.start_session(0)
        run.out(f"SPDM session 0x{sid:08x} established (KEY_EXCHANGE + FINISH)")
        try:
            yield req, sid
        except BaseException:
            if end and sid in req.sessions:
                with contextlib.suppress(RequesterError, DoeTransportError, AttestError):
                    req.end_session(sid)
            raise
        if end:
            req.end_session(sid)
            run.out(f"END_SESSION 0x{sid:08x}: acknowledged")
        else:
            run.out(f"SPDM session 0x{sid:08x} left open in the device: the IDE keys live "
                    "as long as it does (the next SPDM connection to the device ends it)")


def ide_client(req: Requester, sid: int, port_index: int = 0) -> IdeKmClient:
    """IDE_KM over VENDOR_DEFINED (PCI-SIG, VendorID 0x0001) in session *sid*."""
    return IdeKmClient(lambda p: req.vendor_request(PCI_SIG_STANDARD_ID, PCI_SIG_VENDOR_ID,
                                                    p, sid), port_index)


def _wait(opts: IdeOptions, what: str, out: Callable[[str], None]) -> None:
    if opts.pause:
        out(f"PAUSE {what}: press Enter to continue")
        sys.stdout.flush()
        sys.stdin.readline()
    elif opts.hold > 0:
        out(f"holding {opts.hold:g} s ({what})")
        time.sleep(opts.hold)


def run_ide(command: str, opts: IdeOptions, run: Attestation) -> dict[str, Any]:
    """Run one ``ide`` command; returns the last status.  Raises IdeError and the
    transport/SPDM/IDE_KM errors."""
    out = run.out
    with platform_client(opts) as rp:
        if command == "status" and not opts.query:
            return SelectiveStream(rp, None, opts.stream_id, opts.block, out).status(False)
        if command == "refresh":
            raise IdeError("refresh needs the SPDM session that programmed the current keys; "
                           "a one-shot CLI cannot keep it (a new connection ends it, and "
                           "with it the keys). Use `teeio-tsm ide demo`, or the TSM daemon "
                           "(teeio-tsm daemon)")
        end = command != "setup"
        with spdm_session(opts, run, end) as (req, sid):
            s = SelectiveStream(rp, ide_client(req, sid), opts.stream_id, opts.block, out)
            if command == "status":
                return s.status(True)
            if command == "setup":
                return s.setup()
            if command == "teardown":
                s.teardown()
                return s.status()
            assert command == "demo"
            s.setup()
            _wait(opts, "stream Secure with K0", out)
            s.refresh()
            _wait(opts, "stream Secure with K1", out)
            s.teardown()
            last = s.status()
        # After END_SESSION (the device invalidates every key the session programmed).
        after = SelectiveStream(rp, None, opts.stream_id, opts.block, out).status(False)
        if after["device"]["state"] != StreamState.INSECURE:
            raise IdeError("the device's stream is not Insecure after END_SESSION")
        return {**last, "after_end_session": after}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("ide_command", choices=COMMANDS, metavar="{" + ",".join(COMMANDS) + "}",
                    help="setup: key and enable a stream (leaves the SPDM session open); "
                         "refresh: switch key sets (needs setup's session: use demo); "
                         "teardown: stop keys, disable, remove; status: both ends; "
                         "demo: setup, refresh, teardown in one session")
    attest.add_device_arguments(ap)
    ap.add_argument("--platform-socket", required=True, metavar="PATH",
                    help="the device server's platform control socket (root port)")
    ap.add_argument("--platform-credential", type=Path, required=True, metavar="FILE",
                    help="the platform control credential the device server wrote (0600)")
    ap.add_argument("--stream-id", type=u8_arg, default=DEFAULT_STREAM_ID, metavar="N",
                    help=f"IDE Stream ID (default {DEFAULT_STREAM_ID})")
    ap.add_argument("--block", type=int, default=0, metavar="N",
                    help="the device's Selective IDE stream block to use (default 0)")
    ap.add_argument("--query", action="store_true",
                    help="status: read the device's registers via QUERY_RESP in a new SPDM "
                         "session (this ends the session setup left open)")
    wait = ap.add_mutually_exclusive_group()
    wait.add_argument("--pause", action="store_true",
                      help="demo: after setup and after the refresh, wait for a line on "
                           "stdin (run DMA meanwhile)")
    wait.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                      help="demo: after setup and after the refresh, wait this long")
    ap.add_argument("--json", type=Path, dest="json_out", metavar="OUT",
                    help="write the last status as JSON")


def u8_arg(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= v <= 0xFF:
        raise argparse.ArgumentTypeError(f"{v} is not 0..255")
    return v


def run_command(ns: argparse.Namespace) -> int:
    try:
        debug = attest.DoeDebug.from_args(ns, "teeio-tsm ide")
    except AttestError as exc:
        print(f"ide {ns.ide_command} FAILED: {exc}", file=sys.stderr)
        return 1
    opts = IdeOptions(
        attest=AttestOptions(trust_anchor=ns.trust_anchor, doe_socket=ns.doe_socket,
                             doe_tcp_port=ns.doe_tcp_port, host=ns.host,
                             reference_values=ns.reference_values, nonce=ns.nonce,
                             session=True, debug=debug),
        platform_socket=ns.platform_socket, platform_credential=ns.platform_credential,
        stream_id=ns.stream_id, block=ns.block, query=ns.query, pause=ns.pause,
        hold=ns.hold, json_out=ns.json_out)
    run = Attestation(out=print)
    command: str = ns.ide_command
    try:
        result = run_ide(command, opts, run)
        if opts.json_out is not None:
            opts.json_out.parent.mkdir(parents=True, exist_ok=True)
            opts.json_out.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    except (IdeError, IdeKmError, AttestError, RequesterError, DoeTransportError,
            PlatformCtlError, OSError) as exc:
        sys.stdout.flush()
        reason = " ".join(str(exc).split()) or type(exc).__name__
        print(f"ide {command} FAILED: {reason}", file=sys.stderr)
        return 1
    finally:
        if debug is not None:
            debug.close()
    print(f"ide {command}: done")
    return 0


__all__ = ["IdeError", "IdeOptions", "IdeRegisters", "PlatformCalls", "SelectiveStream",
           "StreamBlock", "add_arguments", "fresh_keys", "ide_client", "program_root_port",
           "root_port_go", "run_command", "run_ide"]
