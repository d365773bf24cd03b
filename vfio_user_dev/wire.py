"""vfio-user's own pieces on :mod:`teeio.codec` (QEMU ``docs/interop/vfio-user.rst``).

* the errors: :class:`ProtocolError` carries the errno the reply uses (the core's
  ProtocolError code); :class:`VfioDecodeError` is a malformed payload (EINVAL), also the
  core's DecodeError;
* field kinds: ``argsz`` (:class:`Argsz`), fields the server does not read
  (:class:`Unused`), the VERSION capabilities JSON (:class:`Capabilities`);
* :func:`compile_layout`: the leading fixed-size fields of a declaration as one
  precompiled ``struct.Struct`` (the constants and the hot messages' fast paths).
"""

from __future__ import annotations

import errno
import json
import struct
from typing import Any

from teeio import codec
from teeio.codec import REST, Data, Field, Reader, Reserved, Struct, UInt, Writer

__all__ = ["MAX_JSON_DEPTH", "Argsz", "Capabilities", "ProtocolError", "Unused",
           "VfioDecodeError", "compile_layout", "json_too_deep"]

# VERSION capabilities are a shallow JSON object ("capabilities" -> "migration" -> its
# fields: depth 3); anything nested deeper is refused before the parser recurses into it.
MAX_JSON_DEPTH = 8


class ProtocolError(codec.ProtocolError):
    """A malformed or refused message; ``errno`` (the code) goes into the error reply."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)
        self.errno = err


class VfioDecodeError(ProtocolError, codec.DecodeError):
    """A malformed payload: the core's (raw, offset, reason); answered EINVAL."""

    def __init__(self, raw: bytes | bytearray | memoryview, offset: int, reason: str) -> None:
        # not the cooperative chain: the two bases take different arguments
        codec.DecodeError.__init__(self, raw, offset, reason)
        self.code = self.errno = errno.EINVAL


class Argsz(Field):
    """``argsz``: the payload size the sender declares.  Sent as ``fixed`` (+ the length
    of ``tail``, the data after the fixed part); on receipt at least ``fixed``, or with
    ``tail`` exactly the payload's size."""

    init = False

    def __init__(self, fixed: int, tail: str | None = None) -> None:
        self.fixed, self.tail = fixed, tail

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        at = r.pos
        v = r.pull_u32(self.name)
        if self.tail is not None and v != r.end - at:
            raise r.fail(f"argsz {v} != payload {r.end - at}", at)
        if v < self.fixed:
            raise r.fail(f"argsz {v} < {self.fixed}", at)
        return v

    def push(self, w: Writer, value: Any, known: Any, ctx: Any) -> None:
        w.push_u32(value)

    def derive(self, values: Any, ctx: Any) -> Any:
        return self.fixed + (len(values[self.tail]) if self.tail is not None else 0)


class Unused(Reserved):
    """Bytes of a request the server does not read: zero when sent, ignored on receipt."""

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        r.pull_bytes(self.size, self.name)
        return None


def json_too_deep(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether JSON *text* nests arrays and objects more than *limit* deep, found without
    recursion (brackets inside strings do not count), so that a hostile document cannot
    exhaust the parser's stack."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


class Capabilities(Field):
    """VERSION's capabilities: the rest of the payload, a NUL-terminated JSON string
    ``{"capabilities": {...}}`` (nothing when there are none; trailing NULs and other keys
    ignored).  Bounded before parsing: nesting depth (a deep document would raise
    RecursionError) and, through ValueError, integers longer than the interpreter converts."""

    def pull(self, r: Reader, known: Any, ctx: Any) -> Any:
        at = r.pos
        rest = r.pull_bytes(r.remaining, self.name).rstrip(b"\0")
        if not rest:
            return {}
        try:
            text = rest.decode()
        except UnicodeDecodeError as exc:
            raise r.fail(f"bad JSON: {exc}", at) from None
        if json_too_deep(text):
            raise r.fail(f"JSON nested deeper than {MAX_JSON_DEPTH} levels", at)
        try:
            doc = json.loads(text)
        except (ValueError, RecursionError) as exc:    # JSONDecodeError is a ValueError
            raise r.fail(f"bad JSON: {exc}", at) from None
        if not isinstance(doc, dict) or not isinstance(doc.get("capabilities", {}), dict):
            raise r.fail("capabilities must be an object", at)
        return dict(doc.get("capabilities", {}))

    def push(self, w: Writer, value: Any, known: Any, ctx: Any) -> None:
        if value:
            w.push_bytes(json.dumps({"capabilities": value},
                                    separators=(",", ":")).encode() + b"\0")

    def check(self, value: Any) -> None:
        if not isinstance(value, dict):
            raise ValueError(f"{self.name} must be a dict")

    def strategy(self, known: Any, ctx: Any) -> Any:
        # from the core's bytes strategy (a role does not import hypothesis itself)
        return Data(REST).strategy(known, ctx).map(_sample_capabilities)


def _sample_capabilities(seed: bytes) -> dict[str, object]:
    """Capabilities made from *seed* (property tests): every kind of JSON value."""
    caps: dict[str, object] = {}
    for i in range(0, len(seed) - 2, 3):
        kind, a, b = seed[i] % 7, seed[i + 1], seed[i + 2]
        values: list[object] = [None, a % 2 == 1, (a - b) << 60, f"s\u00e9{a:02x}", a / 4,
                                [a, b, None], {"x": a, "y": [b]}]
        caps[f"k{i}"] = values[kind]
    return caps


_FORMAT = {1: "B", 2: "H", 4: "I", 8: "Q"}


def compile_layout(cls: type[Struct]) -> struct.Struct:
    """The leading fixed-size little-endian integers (and unread bytes) of *cls*'s
    declaration as one ``struct.Struct``; it stops at the first variable-size field."""
    fmt = "<"
    for spec in cls.fields_spec():
        if isinstance(spec, UInt) and not spec.big and spec.size in _FORMAT:
            fmt += _FORMAT[spec.size]
        elif isinstance(spec, Argsz):
            fmt += "I"
        elif isinstance(spec, Unused):
            fmt += f"{spec.size}x"
        else:
            break
    return struct.Struct(fmt)
