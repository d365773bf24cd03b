"""The platform channel's format (teeio/platform_channel.py): the wrapped-key blob declared
on teeio.codec, and the strict decodes of what a client receives."""

from __future__ import annotations

import json
import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings

from teeio.codec import DecodeError, strategy
from teeio.ide import IdeKey
from teeio.platform_channel import (
    KEY_AAD,
    NONCE_LEN,
    PROTOCOL,
    KeyBlob,
    PlatformCtlError,
    canonical,
    decode_hello,
    decode_response,
    unwrap_key,
    wrap_key,
)


@settings(max_examples=100, deadline=None)
@given(strategy(KeyBlob))
def test_key_blob_round_trip(b: KeyBlob) -> None:
    wire = b.encode()
    assert len(wire) == 40 and wire[32:] == b.ifv.to_bytes(8, "big")
    back = KeyBlob.decode(wire)
    assert back == b and back.encode() == wire
    assert b.key.hex() not in repr(b)


def test_key_wrap_round_trip_and_refusals() -> None:
    k_wrap, key = os.urandom(32), IdeKey(os.urandom(32), 0x0102030405060708)
    assert unwrap_key(k_wrap, 9, wrap_key(k_wrap, 9, key)) == key
    with pytest.raises(DecodeError, match="truncated"):
        KeyBlob.decode(bytes(39))
    short = AESGCM(k_wrap).encrypt((9).to_bytes(12, "big"), bytes(39), KEY_AAD).hex()
    with pytest.raises(ValueError, match="32 key bytes and an 8-byte IFV") as info:
        unwrap_key(k_wrap, 9, short)
    assert info.value.__cause__ is None and info.value.__context__ is not None


def _line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def test_hello() -> None:
    nonce = os.urandom(NONCE_LEN)
    assert decode_hello(_line({"type": "hello", "protocol": PROTOCOL,
                               "nonce": nonce.hex()})).nonce == nonce
    for bad, why in [
        (b"nope", "not JSON"),
        (_line([1]), "not a JSON object"),
        (_line({"type": "hi", "protocol": PROTOCOL, "nonce": nonce.hex()}), "greeting"),
        (_line({"type": "hello", "protocol": "other/1", "nonce": nonce.hex()}), "greeting"),
        (_line({"type": "hello", "protocol": PROTOCOL}), "'nonce' must be 32 bytes"),
        (_line({"type": "hello", "protocol": PROTOCOL, "nonce": "zz"}), "'nonce'"),
        (_line({"type": "hello", "protocol": PROTOCOL, "nonce": "00" * 31}), "'nonce'"),
    ]:
        with pytest.raises(PlatformCtlError, match=why) as info:
            decode_hello(bad)
        assert info.value.code == "malformed"


def test_responses() -> None:
    ok = decode_response(canonical({"seq": 3, "ok": True, "result": {"a": 1}, "mac": "ab"}))
    assert (ok.seq, ok.ok, ok.result, ok.mac, ok.error_code) == (3, True, {"a": 1}, "ab", None)
    assert ok.body == {"seq": 3, "ok": True, "result": {"a": 1}, "mac": "ab"}
    err = decode_response(_line({"seq": None, "ok": False,
                                 "error": {"code": "malformed", "message": "x"}}))
    assert (err.seq, err.result, err.error_code, err.error_message, err.mac) == \
        (None, None, "malformed", "x", None)
    for bad, why in [
        (b"[" * 30000, "not JSON"),
        (_line("x"), "not a JSON object"),
        (_line({"seq": True, "ok": True, "result": {}}), "'seq'"),
        (_line({"seq": -1, "ok": True, "result": {}}), "'seq'"),
        (_line({"seq": 1, "ok": 1, "result": {}}), "'ok'"),
        (_line({"seq": 1, "ok": True, "result": []}), "'result'"),
        (_line({"seq": 1, "ok": True, "result": {}, "mac": 5}), "'mac'"),
        (_line({"seq": 1, "ok": False}), "'error'"),
        (_line({"seq": 1, "ok": False, "error": {"code": 1, "message": "m"}}), "'error'"),
    ]:
        with pytest.raises(PlatformCtlError, match=why) as info:
            decode_response(bad)
        assert info.value.code == "malformed"
