"""IDE_KM responder (PCIe 6.x §6.33.3): the device side, over the device's key store.

:class:`IdeKmResponder` answers QUERY, KEY_PROG, K_SET_GO and K_SET_STOP in a secured
session, binding IDE_KM to the session that first uses it; what the spec leaves open is
decided in its method docstrings.  The device supplies an :class:`IdeKeyStore`.
"""

from __future__ import annotations

import logging
from typing import Protocol

from ..ide import Direction, IdeKey, IdeKeyStateError, KeySet, SubStream
from ..spdm.errors import DropRequest
from .codec import IdeKmDecodeError, KeyProg, KGoStopAck, KSetGo, KSetStop, Query, QueryResp
from .defs import IDE_KM_PROTOCOL_ID, KeyProgError, KpStatus, ObjectId

__all__ = ["IdeKeyStore", "IdeKmResponder"]

log = logging.getLogger(__name__)


class IdeKeyStore(Protocol):
    """What the device supplies to :class:`IdeKmResponder` (``ide_cap.IdeCapability`` is one).

    ``program_key`` may raise :class:`~teeio.ide.IdeKeyStateError` (KP_ACK Unspecified
    Failure), e.g. for the key set in use."""

    def ide_registers(self) -> tuple[int, ...]:
        """The IDE extended capability contents minus its header (for QUERY_RESP)."""
        ...

    def has_stream(self, stream_id: int) -> bool:
        """Whether *stream_id* is configured in one of the stream blocks."""
        ...

    def program_key(self, stream_id: int, key_set: KeySet, direction: Direction,
                    substream: SubStream, key: IdeKey) -> None: ...

    def key_programmed(self, stream_id: int, key_set: KeySet, direction: Direction,
                       substream: SubStream) -> bool: ...

    def key_set_go(self, stream_id: int, key_set: KeySet, direction: Direction,
                   substream: SubStream) -> None: ...

    def key_set_stop(self, stream_id: int, key_set: KeySet, direction: Direction,
                     substream: SubStream) -> None: ...

    def invalidate_all(self, reason: str) -> None:
        """Every key of every stream invalid, streams Insecure (session loss)."""
        ...


class IdeKmResponder:
    """Device side of IDE_KM: ``handle(payload, session_id) -> response payload``, in the
    shape ``Responder.register_vendor_handler`` (or ``PciSigProtocolMux``) expects.
    Raises :class:`DropRequest` whenever the spec says "no response": outside a secured
    session, for a malformed object (but see KEY_PROG), and while IDE_KM is bound to
    another session (QUERY / KEY_PROG bind it until :meth:`session_closed`)."""

    def __init__(self, store: IdeKeyStore, *, dev_func: int = 0, bus: int = 0,
                 segment: int = 0, ports: tuple[int, ...] = (0,), max_port_index: int = 0,
                 name: str = "") -> None:
        self.store = store
        self.dev_func = dev_func
        self.bus = bus
        self.segment = segment
        self.ports = ports
        self.max_port_index = max_port_index
        self.bound_session: int | None = None
        #: (stream, key set, direction, sub-stream) of every key the bound session programmed
        #: (KP_ACK Success); cleared with the binding.  TDISP's LOCK checks it.
        self.programmed: set[tuple[int, KeySet, Direction, SubStream]] = set()
        self.log = log.getChild(name) if name else log

    def _drop(self, why: str) -> DropRequest:
        self.log.info("IDE_KM request dropped, no response: %s", why)
        return DropRequest(why)

    def session_closed(self, session_id: int) -> None:
        """The SPDM session *session_id* ended: if it was the one IDE_KM was bound to,
        every key is invalidated now and the streams go Insecure (§6.33.3)."""
        if session_id == self.bound_session:
            self.bound_session = None
            self.programmed.clear()
            self.store.invalidate_all(f"SPDM session 0x{session_id:08x} closed")

    def keys_programmed_by(self, session_id: int, stream_id: int
                           ) -> set[tuple[KeySet, Direction, SubStream]]:
        """The keys of *stream_id* that session *session_id* programmed and that are still
        programmed in the store (empty unless it is the session IDE_KM is bound to)."""
        if session_id != self.bound_session:
            return set()
        return {(k, d, s) for (sid, k, d, s) in self.programmed
                if sid == stream_id and self.store.key_programmed(sid, k, d, s)}

    def handle(self, payload: bytes, session_id: int | None) -> bytes:
        payload = bytes(payload)
        # Sizes only: KEY_PROG carries the key and IFV in the clear of the session.
        self.log.debug("--> %d bytes (session %s)", len(payload), session_id)
        rsp = self._handle(payload, session_id)
        self.log.debug("<-- %d bytes", len(rsp))
        return rsp

    __call__ = handle

    def _handle(self, payload: bytes, session_id: int | None) -> bytes:
        if session_id is None:
            raise self._drop("IDE_KM outside a secured session")
        if len(payload) < 2 or payload[0] != IDE_KM_PROTOCOL_ID:
            raise self._drop("not an IDE_KM object")
        if self.bound_session is not None and self.bound_session != session_id:
            raise self._drop(f"IDE_KM is bound to session 0x{self.bound_session:08x}")
        oid = payload[1]
        if oid == ObjectId.QUERY:
            return self._query(payload, session_id)
        if oid == ObjectId.KEY_PROG:
            return self._key_prog(payload, session_id)
        if oid in (ObjectId.K_SET_GO, ObjectId.K_SET_STOP):
            return self._go_stop(payload)
        raise self._drop(f"Object ID 0x{oid:02x} is not a request")

    def _query(self, payload: bytes, session_id: int) -> bytes:
        try:
            req = Query.decode(payload)
        except IdeKmDecodeError as e:
            raise self._drop(str(e)) from None
        if req.port_index not in self.ports:
            raise self._drop(f"QUERY for PortIndex {req.port_index}")
        self.bound_session = session_id
        return QueryResp(req.port_index, self.dev_func, self.bus, self.segment,
                         self.max_port_index, self.store.ide_registers()).encode()

    def _key_prog(self, payload: bytes, session_id: int) -> bytes:
        """A KEY_PROG whose 8-byte head parses gets a KP_ACK: Incorrect Length for a wrong
        size, Unsupported PortIndex, Unsupported Value (unknown stream, reserved KSS bits,
        sub-stream > 2), Unspecified Failure (e.g. the key set in use)."""
        if len(payload) < 8:
            raise self._drop(f"KEY_PROG of {len(payload)} bytes")
        sid, kss, port = payload[4], payload[6], payload[7]
        try:
            self._program(payload, port, session_id)
            status = int(KpStatus.SUCCESS)
        except KeyProgError as e:
            self.log.info("KEY_PROG refused: %s", e)
            status = e.status
        self.log.info("KEY_PROG stream %d KSS 0x%02x port %d -> %s", sid, kss, port,
                      KpStatus(status).name)
        # KSS is echoed as received, even if it is the field refused (so not a KpAck,
        # which holds only valid KSS values).
        return bytes((IDE_KM_PROTOCOL_ID, ObjectId.KP_ACK, 0, 0, sid, status, kss, port))

    def _program(self, payload: bytes, port: int, session_id: int) -> None:
        """Program the key KEY_PROG carries, or :class:`KeyProgError` with the status."""
        if len(payload) != KeyProg.SIZE:
            raise KeyProgError(KpStatus.INCORRECT_LENGTH, f"{len(payload)} bytes")
        if port not in self.ports:
            raise KeyProgError(KpStatus.UNSUPPORTED_PORT_INDEX, f"PortIndex {port}")
        try:
            req = KeyProg.decode(payload)
        except IdeKmDecodeError as e:
            raise KeyProgError(KpStatus.UNSUPPORTED_VALUE, str(e)) from None
        if not self.store.has_stream(req.stream_id):
            raise KeyProgError(KpStatus.UNSUPPORTED_VALUE, f"no stream {req.stream_id}")
        self.bound_session = session_id
        try:
            self.store.program_key(req.stream_id, req.key_set, req.direction, req.substream,
                                   req.ide_key)
        except IdeKeyStateError as e:
            raise KeyProgError(KpStatus.UNSPECIFIED_FAILURE, str(e)) from None
        self.programmed.add((req.stream_id, req.key_set, req.direction, req.substream))

    def _go_stop(self, payload: bytes) -> bytes:
        """A malformed K_SET_GO / K_SET_STOP (bad port, unknown stream, bad KSS) gets no
        K_GOSTOP_ACK (the spec's recommendation); nor does a K_SET_GO before the key it
        names was programmed.  That is the spec's per-sub-stream minimum (spdm-emu GOes
        only PR); the stream turns Secure only once all six keys have a GO key set."""
        try:
            req: KSetGo | KSetStop = (KSetGo.decode(payload) if payload[1] == ObjectId.K_SET_GO
                                      else KSetStop.decode(payload))
        except IdeKmDecodeError as e:
            raise self._drop(str(e)) from None
        name = req.OBJECT_ID.name
        if req.port_index not in self.ports:
            raise self._drop(f"{name} for PortIndex {req.port_index}")
        if not self.store.has_stream(req.stream_id):
            raise self._drop(f"{name} for unknown stream {req.stream_id}")
        target = (req.stream_id, req.key_set, req.direction)
        if isinstance(req, KSetGo):
            if not self.store.key_programmed(*target, req.substream):
                raise self._drop(f"K_SET_GO stream {req.stream_id} {req.key_set.name} "
                                 f"{req.direction.name} {req.substream.name} before its key "
                                 "was programmed")
            self.store.key_set_go(*target, req.substream)
        else:
            self.store.key_set_stop(*target, req.substream)
        self.log.info("%s stream %d %s %s %s", name, req.stream_id, req.key_set.name,
                      req.direction.name, req.substream.name)
        return KGoStopAck(req.stream_id, req.key_set, req.direction, req.substream,
                          req.port_index).encode()

