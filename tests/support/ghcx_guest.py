"""The guest agent's side of GHCx (docs/ghcx.md) over the VM's UNIX socket, as QEMU's
virtio-serial chardev relays it, and the guest's accept flow: TDI_LOCK, GET_EVIDENCE
checked against its own anchor and nonce (DSP0274 §10.11 measurements), TDI_ACCEPT."""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path
from typing import Any

from teeio import pki
from teeio.ghcx import FrameDecoder, GuestChannel, MsgType, Response
from teeio.spdm import codec
from teeio.spdm.requester import parse_vca, verify_measurement_transcript


class Guest:
    """The guest agent's side of GHCx, over the VM's socket (what QEMU relays)."""

    def __init__(self, path: Path, secret: bytes, vm: str) -> None:
        self.path = path
        self.channel = GuestChannel(secret, vm)
        self.connect()

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(self.path))
        self.decoder = FrameDecoder()
        self.bodies: list[bytes] = []

    def _body(self) -> bytes:
        while not self.bodies:
            data = self.sock.recv(1 << 16)
            assert data, "the TSM closed the GHCx connection"
            self.bodies += self.decoder.feed(data)
        return self.bodies.pop(0)

    def hello(self) -> bytes:
        self.sock.sendall(self.channel.hello())
        return self.channel.accept_hello_ack(self._body())

    def raw_call(self, mtype: MsgType, payload: dict[str, Any]) -> Response | MsgType:
        _rid, frame = self.channel.request(mtype, payload)
        self.sock.sendall(frame)
        return self.channel.open(self._body())

    def call(self, mtype: MsgType, payload: dict[str, Any] | None = None,
             error: str | None = None) -> dict[str, Any]:
        rsp = self.raw_call(mtype, payload or {})
        assert isinstance(rsp, Response), rsp
        assert rsp.error == error, f"{mtype.name}: {rsp.error}: {rsp.message}"
        return {"error": rsp.error, "message": rsp.message} if error else rsp.payload

    def close(self) -> None:
        self.sock.close()


def check_evidence(ev: dict[str, Any], nonce: bytes, anchor: Path) -> dict[str, str]:
    """What the guest checks: the chain to its anchor, the MEASUREMENTS signature over
    VCA + L1, its own nonce in the signed request.  Returns the blobs' SHA-384 digests."""
    chain, vca = bytes.fromhex(ev["cert_chain"]), bytes.fromhex(ev["vca"])
    pairs = [(bytes.fromhex(q), bytes.fromhex(r)) for q, r in ev["measurements"]]
    report = bytes.fromhex(ev["report"])
    neg, _ = parse_vca(vca)
    _root, certs = pki.parse_spdm_cert_chain(chain, "sha384")
    leaf_key = pki.verify_chain(certs, pki.load_anchors(anchor))
    assert verify_measurement_transcript(vca, pairs, leaf_key, neg)
    assert codec.GetMeasurements.decode(pairs[-1][0]).nonce == nonce
    return {"cert_chain": hashlib.sha384(chain).hexdigest(),
            "transcript": hashlib.sha384(vca + b"".join(q + r for q, r in pairs)).hexdigest(),
            "report": hashlib.sha384(report).hexdigest()}


def lock_verify_accept(guest: Guest, anchor: Path) -> dict[str, Any]:
    """The guest's accept flow: LOCK, evidence with its nonce, TDI_INFO, ACCEPT."""
    locked = guest.call(MsgType.TDI_LOCK)
    assert locked["state"] == "CONFIG_LOCKED"
    nonce = os.urandom(32)
    digests = check_evidence(guest.call(MsgType.GET_EVIDENCE, {"nonce": nonce.hex()}), nonce,
                             anchor)
    info = guest.call(MsgType.TDI_INFO)
    assert info["state"] == "CONFIG_LOCKED" and info["lock_epoch"] == locked["lock_epoch"]
    assert info["digests"] == digests and info["digest_alg"] == "sha384"
    assert info["stream"] == {"id": 3, "state": "secure"} and info["lock_flags"] & 1
    accepted = guest.call(MsgType.TDI_ACCEPT, {"digests": digests,
                                               "lock_epoch": info["lock_epoch"]})
    assert accepted == {"state": "RUN", "dma_stream": 3}
    return {"digests": digests, "lock_epoch": info["lock_epoch"]}
