"""What both GHCx ends share: the VM id and secret, rejection counters, the receiver rules
up to the VM id, clear handshake frames, and the JSON object payload.

Specification: ``docs/ghcx.md`` "Receiver rules" and "Messages" (plaintext: one UTF-8 JSON
object).  Every rejected frame is counted and logged, never with key material.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, ClassVar, NoReturn

from teeio.ghcx.defs import (
    HEADER_SIZE,
    MAX_BODY,
    REASONS,
    SECRET_SIZE,
    GhcxReject,
    MsgType,
    reject,
)
from teeio.ghcx.framing import Header, vm_id_bytes

log = logging.getLogger("teeio.ghcx")


def encode_json(payload: dict[str, Any]) -> bytes:
    """A payload's plaintext: compact JSON, no NaN/Infinity."""
    if not isinstance(payload, dict):
        raise TypeError("a GHCx payload is a JSON object (dict)")
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _no_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


def decode_json(plaintext: bytes) -> dict[str, Any]:
    """One UTF-8 JSON object (docs/ghcx.md "Messages"), else ``malformed``."""
    try:
        value = json.loads(plaintext.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        reject("malformed", f"payload is not JSON: {type(e).__name__}")
    if not isinstance(value, dict):
        reject("malformed", f"payload is a JSON {type(value).__name__}, not an object")
    return value


class Endpoint:
    """What both ends share: VM id, secret, counters, the common header checks."""

    side: ClassVar[str]

    def __init__(self, secret: bytes, vm_id: str, rng: Callable[[int], bytes]) -> None:
        if len(secret) != SECRET_SIZE:
            raise ValueError(f"the GHCx secret must be {SECRET_SIZE} bytes")
        self.vm_name = vm_id
        self.vm_id = vm_id_bytes(vm_id)
        self._secret = bytes(secret)
        self._rng = rng
        self.counters: dict[str, int] = dict.fromkeys(REASONS, 0)
        self._log = log.getChild(f"{self.side}.{vm_id}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vm_id={self.vm_name!r}, established={self.established})"

    @property
    def established(self) -> bool:
        raise NotImplementedError

    def _count(self, e: GhcxReject) -> None:
        self.counters[e.reason] += 1
        if e.reason == "hello_limit" and self.counters[e.reason] > 1:
            self._log.debug("rejected frame: %s", e)     # a flood: warned of once
        else:
            self._log.warning("rejected frame: %s", e)

    def _header(self, body: bytes, accepted: frozenset[MsgType]) -> Header:
        """Receiver rules up to the VM id (docs/ghcx.md "Receiver rules"): size, version,
        a type this end receives, the channel's VM id."""
        if len(body) > MAX_BODY:
            reject("oversized", f"body of {len(body)} bytes")
        h = Header.decode(body)
        if h.mtype not in accepted:
            reject("unknown_type", f"{h.mtype.name} is not received by the {self.side}")
        if h.vm_id != self.vm_id:
            reject("cross_vm", f"VM id {h.vm_id.rstrip(bytes(1))!r}")
        return h

    @staticmethod
    def _clear_fields(h: Header, body: bytes, payload_size: int) -> bytes:
        """A clear handshake frame: no flags, seq 0, request id 0, exact payload size."""
        if h.flags or h.seq or h.request_id:
            reject("malformed", f"{h.mtype.name} with flags/seq/request id set")
        payload = body[HEADER_SIZE:]
        if len(payload) != payload_size:
            reject("malformed", f"{h.mtype.name} payload of {len(payload)} bytes")
        return payload
