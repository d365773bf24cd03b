"""The one codec core: a Reader/Writer (aioquic ``Buffer`` style) and declarative messages.

A message is a frozen dataclass deriving :class:`Struct` whose fields carry a wire spec
(:func:`u8` … :func:`u64`, :func:`fixed`, :func:`reserved`, :func:`data`, :func:`items`,
:func:`nested`, :func:`raw`).  From that one declaration come mirror-image ``encode`` and
``decode``, range and reserved checks, the ``raw`` bytes a decode consumed (kept for
transcripts) and a hypothesis strategy (:func:`strategy`).  All integers are little-endian
unless declared otherwise, as in PCIe, SPDM (DSP0274 §6) and vfio-user.

Every decoder failure is a :class:`DecodeError` (raw bytes, offset, reason); an error that a
protocol answers on the wire carries its code in a :class:`ProtocolError`.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, Self, dataclass_transform

__all__ = [
    "REST", "DecodeError", "Field", "ProtocolError", "Reader", "Struct", "Writer",
    "data", "declare", "fixed", "items", "iter_fields", "nested", "raw", "reserved",
    "strategy", "u8", "u16", "u24", "u32", "u64", "uint",
]

#: size/count of a field that takes the rest of the input
REST = -1

#: decode-time view of what is known so far: the values decoded before this field + context
Known = Mapping[str, Any]
SizeSpec = int | str | Callable[[Known, Any], int]
Condition = Callable[[Known, Any], bool]


# --- errors ----------------------------------------------------------------------------------

class DecodeError(ValueError):
    """Malformed input: the bytes, where decoding stopped, and why."""

    def __init__(self, raw: bytes | bytearray | memoryview, offset: int, reason: str) -> None:
        self.raw = bytes(raw)
        self.offset = offset
        self.reason = reason
        super().__init__(f"{reason} (at offset {offset} of {len(self.raw)} bytes)")


class ProtocolError(Exception):
    """An error the protocol reports on the wire: ``code`` is the spec's error code."""

    def __init__(self, code: int, message: str = "") -> None:
        self.code = code
        super().__init__(message or f"error code 0x{int(code):x}")


# --- byte buffers ----------------------------------------------------------------------------

class Reader:
    """Pull values from bytes, front to back; every short read is a :class:`DecodeError`."""

    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0,
                 end: int | None = None) -> None:
        self.buf = bytes(buf)
        self.pos = pos
        self.end = len(self.buf) if end is None else end

    def fail(self, reason: str, offset: int | None = None) -> DecodeError:
        return DecodeError(self.buf, self.pos if offset is None else offset, reason)

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def eof(self) -> bool:
        return self.pos >= self.end

    def expect_end(self, what: str = "message") -> None:
        if self.pos != self.end:
            raise self.fail(f"{self.end - self.pos} trailing byte(s) after the {what}")

    def pull_bytes(self, n: int, name: str = "field") -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise self.fail(f"truncated: {name} needs {n} byte(s), {self.remaining} left")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def pull_uint(self, size: int, name: str = "field", big: bool = False) -> int:
        return int.from_bytes(self.pull_bytes(size, name), "big" if big else "little")

    def pull_u8(self, name: str = "field") -> int:
        return self.pull_uint(1, name)

    def pull_u16(self, name: str = "field") -> int:
        return self.pull_uint(2, name)

    def pull_u32(self, name: str = "field") -> int:
        return self.pull_uint(4, name)

    def pull_u64(self, name: str = "field") -> int:
        return self.pull_uint(8, name)

    def pull_struct(self, fmt: struct.Struct, name: str = "field") -> tuple[Any, ...]:
        return fmt.unpack(self.pull_bytes(fmt.size, name))


class Writer:
    """Push values into a growing buffer; :attr:`data` is what was pushed."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray()

    @property
    def data(self) -> bytes:
        return bytes(self.buf)

    def tell(self) -> int:
        return len(self.buf)

    def push_bytes(self, value: bytes | bytearray | memoryview) -> None:
        self.buf += value

    def push_uint(self, value: int, size: int, big: bool = False) -> None:
        self.buf += value.to_bytes(size, "big" if big else "little")

    def push_u8(self, value: int) -> None:
        self.buf.append(value)

    def push_u16(self, value: int) -> None:
        self.push_uint(value, 2)

    def push_u32(self, value: int) -> None:
        self.push_uint(value, 4)

    def push_u64(self, value: int) -> None:
        self.push_uint(value, 8)

    def push_struct(self, fmt: struct.Struct, *values: Any) -> None:
        self.buf += fmt.pack(*values)


# --- field specs -----------------------------------------------------------------------------

def _resolve(spec: SizeSpec, known: Known, ctx: Any) -> int:
    if isinstance(spec, int):
        return spec
    if isinstance(spec, str):
        return int(known[spec])
    return int(spec(known, ctx))


class Field:
    """How one field goes on the wire.  Subclasses implement pull/push/check/strategy."""

    name = ""
    #: False for fields derived from others or constant (not constructor arguments)
    init = True
    when: Condition | None = None

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        raise NotImplementedError

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        raise NotImplementedError

    def check(self, value: Any) -> None:
        """Raise ValueError when ``value`` cannot be encoded."""

    def derive(self, values: Known, ctx: Any) -> Any:
        """The value of a non-init field at encode time."""
        return None

    def strategy(self, known: Known, ctx: Any) -> Any:
        raise NotImplementedError


class UInt(Field):
    def __init__(self, size: int, *, big: bool = False, kind: type[int] | None = None,
                 reserved_mask: int = 0, valid: Callable[[int], bool] | None = None,
                 length_of: str | None = None, count_of: str | None = None,
                 when: Condition | None = None) -> None:
        self.size, self.big, self.kind = size, big, kind
        self.reserved_mask, self.valid = reserved_mask, valid
        self.length_of, self.count_of, self.when = length_of, count_of, when
        self.init = length_of is None and count_of is None
        self.limit = 1 << (8 * size)

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        at = r.pos
        v = r.pull_uint(self.size, self.name, self.big)
        if v & self.reserved_mask:
            raise r.fail(f"{self.name} 0x{v:x} has reserved bits set "
                         f"(mask 0x{self.reserved_mask:x})", at)
        if self.valid is not None and not self.valid(v):
            raise r.fail(f"{self.name} = {v} is not allowed", at)
        if self.kind is not None:
            try:
                return self.kind(v)
            except ValueError:
                raise r.fail(f"{self.name} = 0x{v:x} is not a known "
                             f"{self.kind.__name__}", at) from None
        return v

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_uint(int(value), self.size, self.big)

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{self.name} must be an int, not {type(value).__name__}")
        if not 0 <= value < self.limit:
            raise ValueError(f"{self.name} = {value} does not fit in {self.size * 8} bits")
        if value & self.reserved_mask:
            raise ValueError(f"{self.name} 0x{value:x} sets reserved bits")
        if self.valid is not None and not self.valid(value):
            raise ValueError(f"{self.name} = {value} is not allowed")

    def derive(self, values: Known, ctx: Any) -> Any:
        if self.length_of is not None:
            return len(values[self.length_of])
        if self.count_of is not None:
            return len(values[self.count_of])
        return 0

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        if self.kind is not None and issubclass(self.kind, enum.Enum) \
                and not issubclass(self.kind, enum.Flag):
            return st.sampled_from(list(self.kind))
        s = st.integers(0, self.limit - 1).map(lambda v: v & ~self.reserved_mask)
        if self.valid is not None:
            s = s.filter(self.valid)
        if self.kind is not None:
            s = s.map(self.kind)
        return s


class Fixed(Field):
    """A constant (a message code, a version the type implies): decode checks it."""

    init = False

    def __init__(self, size: int, value: int, *, big: bool = False) -> None:
        self.size, self.value, self.big = size, value, big

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        at = r.pos
        v = r.pull_uint(self.size, self.name, self.big)
        if v != self.value:
            raise r.fail(f"{self.name} is 0x{v:x}, expected 0x{self.value:x}", at)
        return v

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_uint(self.value, self.size, self.big)

    def derive(self, values: Known, ctx: Any) -> Any:
        return self.value


class Reserved(Field):
    """Reserved bytes: zero when sent, zero required when received."""

    init = False

    def __init__(self, size: int) -> None:
        self.size = size

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        at = r.pos
        chunk = r.pull_bytes(self.size, self.name)
        if any(chunk):
            i = next(i for i, b in enumerate(chunk) if b)
            raise r.fail(f"reserved byte is 0x{chunk[i]:02x}", at + i)
        return None

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_bytes(bytes(self.size))


class Data(Field):
    """Bytes: a fixed size, a size given by an earlier field or the context, or the rest."""

    def __init__(self, size: SizeSpec, *, max_size: int = 4096,
                 when: Condition | None = None) -> None:
        self.size, self.max_size, self.when = size, max_size, when

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        n = r.remaining if self.size == REST else _resolve(self.size, known, ctx)
        return r.pull_bytes(n, self.name)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        if self.size != REST and not isinstance(self.size, str):
            n = _resolve(self.size, known, ctx)
            if len(value) != n:
                raise ValueError(f"{self.name} is {len(value)} bytes, must be {n}")
        w.push_bytes(value)

    def check(self, value: Any) -> None:
        if not isinstance(value, bytes):
            raise ValueError(f"{self.name} must be bytes, not {type(value).__name__}")
        if isinstance(self.size, int) and self.size != REST and len(value) != self.size:
            raise ValueError(f"{self.name} is {len(value)} bytes, must be {self.size}")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        if self.size == REST or isinstance(self.size, str):
            return st.binary(max_size=min(self.max_size, 64))
        n = _resolve(self.size, known, ctx)
        return st.binary(min_size=n, max_size=n)


class Nested(Field):
    """One embedded :class:`Struct`."""

    def __init__(self, kind: type[Struct], *, when: Condition | None = None) -> None:
        self.kind, self.when = kind, when

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        return self.kind.pull(r, ctx)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        value.push(w, ctx)

    def check(self, value: Any) -> None:
        if not isinstance(value, self.kind):
            raise ValueError(f"{self.name} must be a {self.kind.__name__}")

    def strategy(self, known: Known, ctx: Any) -> Any:
        return strategy(self.kind, ctx)


class Items(Field):
    """A counted list of :class:`Struct` items (count from an earlier field, or until the
    end of the input with ``count=REST``)."""

    def __init__(self, kind: type[Struct], count: SizeSpec, *, max_count: int = 4096,
                 when: Condition | None = None) -> None:
        self.kind, self.count, self.max_count, self.when = kind, count, max_count, when

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        out: list[Struct] = []
        if self.count == REST:
            while not r.eof():
                if len(out) >= self.max_count:
                    raise r.fail(f"{self.name}: more than {self.max_count} items")
                out.append(self.kind.pull(r, ctx))
            return tuple(out)
        n = _resolve(self.count, known, ctx)
        if n > self.max_count:
            raise r.fail(f"{self.name}: {n} items, at most {self.max_count}")
        return tuple(self.kind.pull(r, ctx) for _ in range(n))

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        for item in value:
            item.push(w, ctx)

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, self.kind) for v in value):
            raise ValueError(f"{self.name} must be a tuple of {self.kind.__name__}")
        if len(value) > self.max_count:
            raise ValueError(f"{self.name}: {len(value)} items, at most {self.max_count}")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        return st.lists(strategy(self.kind, ctx), max_size=min(self.max_count, 4)).map(tuple)


class Raw(Field):
    """The bytes a decode consumed (``b""`` for a message built locally); not on the wire."""

    init = False

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        return b""

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        pass

    def derive(self, values: Known, ctx: Any) -> Any:
        return b""


# --- declaring fields ------------------------------------------------------------------------

def _declare(spec: Field, default: Any = dataclasses.MISSING) -> Any:
    meta = {"codec": spec}
    if not spec.init:
        return dataclasses.field(default=default if default is not dataclasses.MISSING
                                 else None, init=False, repr=isinstance(spec, Fixed),
                                 compare=not isinstance(spec, (Raw, Reserved)),
                                 metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def uint(size: int, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    """An unsigned integer of ``size`` bytes; ``kind`` (an enum) decodes to it and rejects
    unknown values; ``reserved_mask`` bits must be zero; ``length_of``/``count_of`` derive
    it from a later bytes/items field at encode time."""
    return _declare(UInt(size, **kw), default)


def u8(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return uint(1, default, **kw)


def u16(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return uint(2, default, **kw)


def u24(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return uint(3, default, **kw)


def u32(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return uint(4, default, **kw)


def u64(default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return uint(8, default, **kw)


def declare(spec: Field, default: Any = dataclasses.MISSING, *, init: bool = True) -> Any:
    """A field of a protocol's own kind (a :class:`Field` subclass).  ``init`` must say what
    ``spec.init`` says: type checkers read it (and ``default=`` by keyword) from the call."""
    if init != spec.init:
        raise TypeError(f"declare: init={init} but {type(spec).__name__}.init={spec.init}")
    return _declare(spec, default)


# ``init: Literal[False]`` below is for type checkers only (Struct's dataclass_transform)

def fixed(size: int, value: int, *, big: bool = False, init: Literal[False] = False) -> Any:
    return _declare(Fixed(size, value, big=big), value)


def reserved(size: int, *, init: Literal[False] = False) -> Any:
    return _declare(Reserved(size))


def data(size: SizeSpec, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return _declare(Data(size, **kw), default)


def nested(kind: type[Struct], default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    return _declare(Nested(kind, **kw), default)


def items(kind: type[Struct], count: SizeSpec, default: Any = dataclasses.MISSING,
          **kw: Any) -> Any:
    return _declare(Items(kind, count, **kw), default)


def raw(*, init: Literal[False] = False) -> Any:
    return _declare(Raw())


# --- messages --------------------------------------------------------------------------------

def _plan(cls: type) -> tuple[Field, ...]:
    cached = cls.__dict__.get("_codec_plan")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    plan = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get("codec")
        if spec is None:
            continue
        spec.name = f.name
        plan.append(spec)
    out = tuple(plan)
    cls._codec_plan = out  # type: ignore[attr-defined]
    return out


def _names(cls: type) -> tuple[str, ...]:
    """The dataclass field names of *cls*, in order (cached on the class)."""
    cached = cls.__dict__.get("_codec_names")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    out = tuple(f.name for f in dataclasses.fields(cls))
    cls._codec_names = out  # type: ignore[attr-defined]
    return out


def _present(spec: Field, known: Known, ctx: Any) -> bool:
    return spec.when is None or spec.when(known, ctx)


@dataclass_transform(frozen_default=True, field_specifiers=(fixed, reserved, raw, declare))
class Struct:
    """Base of every declared message; subclasses are ``@dataclass(frozen=True)``.  (The
    dataclass_transform lets type checkers leave constant and derived fields out of
    ``__init__``, as the runtime does.)"""

    _codec_plan: ClassVar[tuple[Field, ...] | None] = None
    _codec_names: ClassVar[tuple[str, ...] | None] = None
    #: what :meth:`decode` raises: a protocol's subclass of DecodeError taking
    #: ``(raw, offset, reason)``, e.g. one that also carries the protocol's error code
    DECODE_ERROR: ClassVar[type[DecodeError]] = DecodeError

    def __post_init__(self) -> None:
        known: dict[str, Any] = {n: getattr(self, n) for n in _names(type(self))}
        for spec in _plan(type(self)):
            if spec.init:
                if _present(spec, known, None):
                    spec.check(known[spec.name])
            elif not isinstance(spec, (Reserved, Raw)):
                object.__setattr__(self, spec.name, spec.derive(known, None))

    @classmethod
    def fields_spec(cls) -> tuple[Field, ...]:
        return _plan(cls)

    def _values(self, ctx: Any) -> dict[str, Any]:
        return {n: getattr(self, n) for n in _names(type(self))}

    def push(self, w: Writer, ctx: Any = None) -> None:
        values = self._values(ctx)
        for spec in _plan(type(self)):
            if _present(spec, values, ctx):
                spec.push(w, values[spec.name], values, ctx)

    def encode(self, ctx: Any = None) -> bytes:
        w = Writer()
        self.push(w, ctx)
        return w.data

    @classmethod
    def pull(cls, r: Reader, ctx: Any = None) -> Self:
        start = r.pos
        known: dict[str, Any] = {}
        raw_name = None
        for spec in _plan(cls):
            if isinstance(spec, Raw):
                raw_name = spec.name
                continue
            if not _present(spec, known, ctx):
                continue
            known[spec.name] = spec.pull(r, known, ctx)
        args = {s.name: known[s.name] for s in _plan(cls) if s.init and s.name in known}
        try:
            obj = cls(**args)
        except (TypeError, ValueError) as exc:
            raise r.fail(f"{cls.__name__}: {exc}", start) from None
        if raw_name is not None:
            object.__setattr__(obj, raw_name, r.buf[start:r.pos])
        return obj

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, ctx: Any = None) -> Self:
        """Decode exactly one message: trailing bytes are an error."""
        r = Reader(buf)
        try:
            obj = cls.pull(r, ctx)
            r.expect_end(cls.__name__)
        except DecodeError as exc:
            if isinstance(exc, cls.DECODE_ERROR):
                raise
            raise cls.DECODE_ERROR(exc.raw, exc.offset, exc.reason) from None
        return obj


def strategy(cls: type[Struct], ctx: Any = None) -> Any:
    """A hypothesis strategy for valid instances of ``cls`` (hypothesis imported lazily)."""
    from hypothesis import strategies as st

    @st.composite
    def build(draw: Any) -> Struct:
        known: dict[str, Any] = {}
        for spec in _plan(cls):
            if not spec.init:       # derived from the drawn fields when built
                continue
            if not _present(spec, known, ctx):
                f = next(f for f in dataclasses.fields(cls)  # type: ignore[arg-type]
                         if f.name == spec.name)
                known[spec.name] = f.default
                continue
            known[spec.name] = draw(spec.strategy(known, ctx))
        return cls(**{s.name: known[s.name] for s in _plan(cls) if s.init})

    return build()


def iter_fields(obj: Struct) -> Iterator[tuple[str, Any]]:
    """(name, value) of each wire field of ``obj`` in wire order (for dumps)."""
    for spec in _plan(type(obj)):
        if not isinstance(spec, (Reserved, Raw)):
            yield spec.name, getattr(obj, spec.name)
