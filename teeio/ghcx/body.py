"""Typed GHCx bodies: JSON fields declared once on frozen dataclasses.

A body derives :class:`Body` and declares each field with :func:`wire` and a :class:`Spec`
(:class:`Int`, :class:`Text`, :class:`Hex`, :class:`HexText`, :class:`Named`,
:class:`Obj`, :class:`List`, :class:`Pair`, :class:`Nullable`).  From that come one strict
``decode`` (a JSON object in; a wrong type, a value out of range, an unknown or a missing
field is a :class:`MessageError`) and one ``encode`` (the JSON object, keys in declaration
order).  Payloads are JSON objects with binary values as lowercase hex (docs/ghcx.md
"Messages").
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Sequence
from typing import Any, ClassVar, Self

__all__ = ["U64_MAX", "Body", "Hex", "HexText", "Int", "List", "MessageError", "Named",
           "Nullable", "Obj", "Pair", "Spec", "Text", "wire"]

U64_MAX = (1 << 64) - 1
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


class MessageError(ValueError):
    """A body that does not follow docs/ghcx.md "Messages"; the TSM answers a request that
    raises it with an error response of code :attr:`code` (``bad_request``)."""

    code = "bad_request"

    def __init__(self, where: str, reason: str) -> None:
        self.where = where
        self.reason = reason
        super().__init__(f"{where}: {reason}" if where else reason)


def _type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__


class Spec:
    """How one JSON value is checked, decoded and encoded; ``kind`` names it in docs."""

    kind = "value"

    def decode(self, value: object, where: str) -> Any:
        raise NotImplementedError

    def encode(self, value: Any) -> Any:
        raise NotImplementedError

    def check(self, value: Any, where: str) -> None:
        """Raise :class:`MessageError` unless *value* encodes to a valid JSON value."""
        try:
            encoded = self.encode(value)
        except (AttributeError, TypeError, ValueError):
            raise MessageError(where, f"{_type_name(value)} cannot be sent as {self.kind}") \
                from None
        self.decode(encoded, where)


class Int(Spec):
    """An integer (not a boolean) in ``lo..hi``."""

    def __init__(self, lo: int = 0, hi: int = U64_MAX) -> None:
        self.lo, self.hi = lo, hi
        self.kind = f"integer {lo}..{hi:#x}" if hi > 0xFFFF else f"integer {lo}..{hi}"

    def decode(self, value: object, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(where, f"must be an integer, not {_type_name(value)}")
        if not self.lo <= value <= self.hi:
            raise MessageError(where, f"{value} is outside {self.lo}..{self.hi}")
        return value

    def encode(self, value: Any) -> Any:
        return value


class Text(Spec):
    """A string: one of *choices*, or matching *pattern*, or any (of at most *max_len*)."""

    def __init__(self, *, choices: Sequence[str] = (), pattern: str | None = None,
                 max_len: int | None = None) -> None:
        self.choices = tuple(choices)
        self.pattern = re.compile(pattern) if pattern else None
        self.max_len = max_len
        self.kind = (" | ".join(f'"{c}"' for c in self.choices) if self.choices else
                     f"string {pattern}" if pattern else "string")

    def decode(self, value: object, where: str) -> str:
        if not isinstance(value, str):
            raise MessageError(where, f"must be a string, not {_type_name(value)}")
        if self.choices and value not in self.choices:
            raise MessageError(where, f"{value!r} is not one of {', '.join(self.choices)}")
        if self.pattern is not None and not self.pattern.fullmatch(value):
            raise MessageError(where, f"{value!r} does not match {self.pattern.pattern}")
        if self.max_len is not None and len(value) > self.max_len:
            raise MessageError(where, f"longer than {self.max_len} characters")
        return value

    def encode(self, value: Any) -> Any:
        return value


class HexText(Spec):
    """Lowercase hex of exactly *size* bytes, kept as the hex string (digests)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.kind = f"hex ({size} bytes)"

    def decode(self, value: object, where: str) -> str:
        if not isinstance(value, str) or len(value) != 2 * self.size \
                or not _HEX.fullmatch(value):
            raise MessageError(where, f"must be {2 * self.size} lowercase hex digits")
        return value

    def encode(self, value: Any) -> Any:
        return value


class Hex(Spec):
    """Bytes as lowercase hex: exactly *size* of them, or *min_size* or more."""

    def __init__(self, size: int | None = None, *, min_size: int = 0) -> None:
        self.size, self.min_size = size, min_size
        self.kind = (f"hex ({size} bytes)" if size is not None else
                     f"hex (at least {min_size} byte{'s' if min_size > 1 else ''})"
                     if min_size else "hex")

    def decode(self, value: object, where: str) -> bytes:
        if not isinstance(value, str) or not _HEX.fullmatch(value):
            raise MessageError(where, "must be a string of lowercase hex digit pairs")
        n = len(value) // 2
        if (self.size is not None and n != self.size) or n < self.min_size:
            want = self.size if self.size is not None else f"at least {self.min_size}"
            raise MessageError(where, f"{n} bytes, must be {want}")
        return bytes.fromhex(value)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, bytes):
            raise TypeError("not bytes")
        return value.hex()


class Named(Spec):
    """A member of enum *kind*, on the wire by name (``by_value``: by its string value)."""

    def __init__(self, kind: type[enum.Enum], *, by_value: bool = False) -> None:
        self.enum, self.by_value = kind, by_value
        self.names = tuple(str(m.value) if by_value else m.name for m in kind)
        self.kind = " | ".join(f'"{n}"' for n in self.names)

    def decode(self, value: object, where: str) -> enum.Enum:
        if not isinstance(value, str) or value not in self.names:
            raise MessageError(where, f"{value!r} is not one of {', '.join(self.names)}")
        return self.enum(value) if self.by_value else self.enum[value]

    def encode(self, value: Any) -> Any:
        if not isinstance(value, self.enum):
            raise TypeError(f"not a {self.enum.__name__}")
        return str(value.value) if self.by_value else value.name


class Obj(Spec):
    """A nested :class:`Body`."""

    def __init__(self, body: type[Body]) -> None:
        self.body = body
        self.kind = f"object ({body.__name__})"

    def decode(self, value: object, where: str) -> Body:
        return self.body.decode(value, where)

    def encode(self, value: Any) -> Any:
        if not isinstance(value, self.body):
            raise TypeError(f"not a {self.body.__name__}")
        return value.encode()


class List(Spec):
    """A JSON array of *item*, at least *min_items*; decoded to a tuple."""

    def __init__(self, item: Spec, *, min_items: int = 0) -> None:
        self.item, self.min_items = item, min_items
        self.kind = f"array of {item.kind}" + (f" (at least {min_items})" if min_items else "")

    def decode(self, value: object, where: str) -> tuple[Any, ...]:
        if not isinstance(value, list):
            raise MessageError(where, f"must be an array, not {_type_name(value)}")
        if len(value) < self.min_items:
            raise MessageError(where, f"{len(value)} items, at least {self.min_items}")
        return tuple(self.item.decode(v, f"{where}[{i}]") for i, v in enumerate(value))

    def encode(self, value: Any) -> Any:
        if not isinstance(value, tuple | list):
            raise TypeError("not a sequence")
        return [self.item.encode(v) for v in value]


class Pair(Spec):
    """A JSON array of exactly two *item*; decoded to a 2-tuple."""

    def __init__(self, item: Spec) -> None:
        self.item = item
        self.kind = f"[{item.kind}, {item.kind}]"

    def decode(self, value: object, where: str) -> tuple[Any, Any]:
        if not isinstance(value, list) or len(value) != 2:
            raise MessageError(where, "must be an array of two items")
        return (self.item.decode(value[0], f"{where}[0]"),
                self.item.decode(value[1], f"{where}[1]"))

    def encode(self, value: Any) -> Any:
        first, second = value
        return [self.item.encode(first), self.item.encode(second)]


class Nullable(Spec):
    """*inner*, or JSON null (None)."""

    def __init__(self, inner: Spec) -> None:
        self.inner = inner
        self.kind = f"{inner.kind} or null"

    def decode(self, value: object, where: str) -> Any:
        return None if value is None else self.inner.decode(value, where)

    def encode(self, value: Any) -> Any:
        return None if value is None else self.inner.encode(value)


def wire(spec: Spec, default: Any = dataclasses.MISSING) -> Any:
    """Declare a body field: its :class:`Spec`, and a default if it may be left out."""
    return dataclasses.field(default=default, metadata={"ghcx": spec})


class Body:
    """Base of every typed body; subclasses are ``@dataclass(frozen=True)`` and declare
    their fields with :func:`wire`.  Constructing one checks every field (and
    :meth:`check`), so only valid bodies are ever encoded."""

    _fields_cache: ClassVar[tuple[tuple[str, Spec, bool], ...] | None] = None

    @classmethod
    def fields_spec(cls) -> tuple[tuple[str, Spec, bool], ...]:
        """(name, spec, required) of each field, in wire order."""
        cached = cls.__dict__.get("_fields_cache")
        if cached is None:
            cached = tuple((f.name, f.metadata["ghcx"], f.default is dataclasses.MISSING)
                           for f in dataclasses.fields(cls))  # type: ignore[arg-type]
            cls._fields_cache = cached
        return cached

    def __post_init__(self) -> None:
        for name, spec, _ in self.fields_spec():
            spec.check(getattr(self, name), name)
        self.check()

    def check(self) -> None:
        """Rules between fields; raise :class:`MessageError`."""

    @classmethod
    def decode(cls, payload: object, where: str = "") -> Self:
        """The body in JSON object *payload*; raises :class:`MessageError`."""
        if not isinstance(payload, dict):
            raise MessageError(where, f"must be an object, not {_type_name(payload)}")
        specs = cls.fields_spec()
        known = {name for name, _, _ in specs}
        unknown = sorted(str(k) for k in payload if k not in known)
        if unknown:
            raise MessageError(where, f"unknown field(s) {', '.join(unknown)}")
        args: dict[str, Any] = {}
        for name, spec, required in specs:
            at = f"{where}.{name}" if where else name
            if name in payload:
                args[name] = spec.decode(payload[name], at)
            elif required:
                raise MessageError(at, "missing")
        try:
            return cls(**args)
        except MessageError as exc:
            raise MessageError(f"{where}.{exc.where}" if where and exc.where else
                               where or exc.where, exc.reason) from None

    def encode(self) -> dict[str, Any]:
        """The JSON object, keys in declaration order."""
        return {name: spec.encode(getattr(self, name)) for name, spec, _ in self.fields_spec()}
