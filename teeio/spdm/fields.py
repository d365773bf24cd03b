"""SPDM field kinds on the :mod:`teeio.codec` core.

DSP0274 §9: reserved fields are sent as zero and ignored on receipt (:func:`ignored`).
Sizes fixed by the negotiated algorithms (§10.5: hash H, signature S, DHE D) or by what
the request asked for come from a :class:`~teeio.spdm.negotiated.Context`
(:func:`sized`).  The rest are layouts the core has no kind for: lists
of integers and of context-sized digests, a derived integer (counts packed with other
bits, a message's own Length), the 1.3 self-sized supported-algorithms block, the
ERROR extended data, and AlgStructures in ascending AlgType order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

from teeio.codec import (
    Data,
    Field,
    Items,
    Reader,
    Reserved,
    Struct,
    UInt,
    Writer,
    declare,
    fixed,
    raw,
    strategy,
    uint,
)

from .negotiated import Context, Known, Unsized

SizeFn = Callable[[Known, Any], int]
Condition = Callable[[Known, Any], bool]

MAX_DOE_PAD = 3


def _resolve(size: int | SizeFn, known: Known, ctx: Any) -> int:
    return size if isinstance(size, int) else size(known, ctx)


# --- field kinds ----------------------------------------------------------------------------------

class Ignored(Reserved):
    """Reserved bytes (DSP0274 §9): zero when sent, ignored when received."""

    def __init__(self, size: int, *, when: Condition | None = None) -> None:
        super().__init__(size)
        self.when = when

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        r.pull_bytes(self.size, self.name)
        return None


class Sized(Data):
    """Bytes whose size comes from the context or from earlier fields.  Encoding without a
    context writes the bytes as they are (a responder signs what it encoded, then appends
    the signature); decoding needs the context."""

    def __init__(self, size: SizeFn, *, when: Condition | None = None) -> None:
        super().__init__(size, when=when)
        self.size_fn = size

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        try:
            n = self.size_fn(known, ctx)
        except Unsized as exc:
            raise r.fail(f"{self.name}: {exc}") from None
        return r.pull_bytes(n, self.name)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        if ctx is not None:
            try:
                n = self.size_fn(known, ctx)
            except Unsized:
                n = len(value)
            if len(value) != n:
                raise ValueError(f"{self.name} is {len(value)} bytes, must be {n}")
        w.push_bytes(value)


class UIntList(Field):
    """A counted list of little-endian integers of one size (VersionNumberEntry, ExtAsym)."""

    def __init__(self, size: int, count: str | SizeFn, *, max_count: int = 255,
                 when: Condition | None = None) -> None:
        self.size, self.count, self.max_count, self.when = size, count, max_count, when

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        n = int(known[self.count]) if isinstance(self.count, str) else self.count(known, ctx)
        return tuple(r.pull_uint(self.size, self.name) for _ in range(n))

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        for v in value:
            w.push_uint(v, self.size)

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, int) for v in value):
            raise ValueError(f"{self.name} must be a tuple of int")
        if len(value) > self.max_count:
            raise ValueError(f"{self.name}: {len(value)} items, at most {self.max_count}")
        if any(not 0 <= v < 1 << (8 * self.size) for v in value):
            raise ValueError(f"{self.name}: an item does not fit in {self.size * 8} bits")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        return st.lists(st.integers(0, (1 << (8 * self.size)) - 1),
                        max_size=min(self.max_count, 4)).map(tuple)


class DataList(Field):
    """A counted list of byte strings of one size (DIGESTS: one H-byte digest per slot)."""

    def __init__(self, size: int | SizeFn, count: SizeFn) -> None:
        self.size, self.count = size, count

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        try:
            n = _resolve(self.size, known, ctx)
        except Unsized as exc:
            raise r.fail(f"{self.name}: {exc}") from None
        return tuple(r.pull_bytes(n, f"{self.name}[{i}]") for i in range(self.count(known, ctx)))

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        if len(value) != self.count(known, ctx):
            raise ValueError(f"{self.name}: {len(value)} items, must be "
                             f"{self.count(known, ctx)}")
        if ctx is not None:
            n = _resolve(self.size, known, ctx)
            if any(len(v) != n for v in value):
                raise ValueError(f"{self.name}: every item must be {n} bytes")
        for v in value:
            w.push_bytes(v)

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(v, bytes) for v in value):
            raise ValueError(f"{self.name} must be a tuple of bytes")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        n = _resolve(self.size, known, ctx)
        return st.lists(st.binary(min_size=n, max_size=n), min_size=self.count(known, ctx),
                        max_size=self.count(known, ctx)).map(tuple)


class Derived(UInt):
    """An integer computed from other fields when encoding (a count packed with fixed bits,
    a Length); *valid* and *reason* check the received value."""

    def __init__(self, size: int, fn: Callable[[Known], int], *,
                 valid: Callable[[int], bool] | None = None,
                 reason: Callable[[int], str] | None = None,
                 when: Condition | None = None) -> None:
        super().__init__(size, when=when)
        self.init = False
        self.fn, self.check_valid, self.reason = fn, valid, reason

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        at = r.pos
        v = r.pull_uint(self.size, self.name)
        if self.check_valid is not None and not self.check_valid(v):
            raise r.fail(self.reason(v) if self.reason else f"{self.name} = {v} is not allowed",
                         at)
        return v

    def derive(self, values: Known, ctx: Any) -> Any:
        return self.fn(values)


class MessageLength(Derived):
    """The message's own Length field at byte *at* (NEGOTIATE_ALGORITHMS, ALGORITHMS):
    computed when encoding; on receipt it must equal the bytes the message took."""

    def __init__(self, size: int, at: int, fn: Callable[[Known], int]) -> None:
        super().__init__(size, fn)
        self.at = at

    def verify(self, r: Reader, start: int) -> None:
        wire = int.from_bytes(r.buf[start + self.at:start + self.at + self.size], "little")
        if wire != r.pos - start:
            raise r.fail(f"Length field {wire} != message length {r.pos - start}",
                         start + self.at)


class SelfSized(Data):
    """A block carrying its own total Length (u16 at byte 2, counting its 4-byte header):
    the 1.3 CAPABILITIES supported-algorithms block (DSP0274 1.3 §10.4)."""

    def __init__(self, what: str, *, when: Condition | None = None) -> None:
        super().__init__(0, when=when)
        self.what = what

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        if r.remaining < 4:
            raise r.fail(f"truncated {self.what}")
        length = int.from_bytes(r.buf[r.pos + 2:r.pos + 4], "little")
        if length < 4:
            raise r.fail(f"{self.what} Length {length} is shorter than its 4-byte header")
        return r.pull_bytes(length, self.what)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_bytes(value)

    def check(self, value: Any) -> None:
        if not isinstance(value, bytes):
            raise ValueError(f"{self.name} must be bytes")
        if value and (len(value) < 4 or int.from_bytes(value[2:4], "little") != len(value)):
            raise ValueError(f"{self.what}: its Length must be its size (at least 4)")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        return st.one_of(st.just(b""), st.tuples(st.binary(min_size=2, max_size=2),
                                                 st.binary(max_size=16)).map(
            lambda t: t[0] + (4 + len(t[1])).to_bytes(2, "little") + t[1]))


class ExtendedErrorData(Data):
    """ERROR ExtendedErrorData (DSP0274 §10.13): the rest of the message, at most 32 bytes.
    For error codes whose data size is fixed, bytes past it are DOE padding when the
    message arrived with padding allowed."""

    MAX = 32

    def __init__(self, fixed_sizes: Mapping[int, int], code_field: str) -> None:
        super().__init__(0)
        self.fixed_sizes, self.code_field = fixed_sizes, code_field

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        size = self.fixed_sizes.get(known[self.code_field]) if Context.of(ctx).pad else None
        at = r.pos
        out = r.pull_bytes(min(size, r.remaining) if size is not None else r.remaining,
                           self.name)
        if len(out) > self.MAX:
            raise r.fail(f"extended error data of {len(out)} bytes exceeds {self.MAX}", at)
        return out

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_bytes(value)

    def check(self, value: Any) -> None:
        if not isinstance(value, bytes) or len(value) > self.MAX:
            raise ValueError(f"{self.name} must be at most {self.MAX} bytes")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        return st.binary(max_size=self.MAX)


class Ascending(Items):
    """A counted list of structs in strictly ascending order of one field (AlgStructure
    by AlgType, DSP0274 §10.5)."""

    def __init__(self, kind: type[Struct], count: str, key: str, *,
                 when: Condition | None = None) -> None:
        super().__init__(kind, count, max_count=255, when=when)
        self.key = key

    def pull(self, r: Reader, known: Known, ctx: Any) -> Any:
        n = int(known[str(self.count)])
        out: list[Struct] = []
        for i in range(n):
            at = r.pos
            item = self.kind.pull(r, ctx)
            if out and getattr(item, self.key) <= getattr(out[-1], self.key):
                raise r.fail(f"{self.name}[{i}] {self.key} {getattr(item, self.key)} out of "
                             "ascending order", at)
            out.append(item)
        return tuple(out)

    def check(self, value: Any) -> None:
        super().check(value)
        keys = [getattr(v, self.key) for v in value]
        if any(b <= a for a, b in zip(keys, keys[1:], strict=False)):
            raise ValueError(f"{self.name} must be in ascending {self.key} order")

    def strategy(self, known: Known, ctx: Any) -> Any:
        from hypothesis import strategies as st
        return st.lists(strategy(self.kind, ctx), max_size=4,
                        unique_by=lambda v: getattr(v, self.key)).map(
            lambda xs: tuple(sorted(xs, key=lambda v: getattr(v, self.key))))


# --- declaring fields ------------------------------------------------------------------------
# Declarators of fields that are not constructor arguments carry ``init: Literal[False]``:
# type checkers read it (PEP 681 field-specifier convention) to leave them out of __init__.

def header_code(value: int, *, init: Literal[False] = False) -> Any:
    """RequestResponseCode (DSP0274 §9): a constant, checked on receipt."""
    return fixed(1, value)


def raw_bytes(*, init: Literal[False] = False) -> Any:
    """The exact bytes a decode consumed (transcripts hash these)."""
    return raw()


def count_of(size: int, items: str, *, when: Condition | None = None,
             init: Literal[False] = False) -> Any:
    """The number of entries of the later list field *items*."""
    return uint(size, count_of=items, when=when)


def length_of(size: int, data_field: str, *, init: Literal[False] = False) -> Any:
    """The length in bytes of the later bytes field *data_field*."""
    return uint(size, length_of=data_field)


def ignored(size: int, *, when: Condition | None = None,
            init: Literal[False] = False) -> Any:
    return declare(Ignored(size, when=when), init=False)


def derived(size: int, fn: Callable[[Known], int], *,
            valid: Callable[[int], bool] | None = None,
            reason: Callable[[int], str] | None = None,
            init: Literal[False] = False) -> Any:
    return declare(Derived(size, fn, valid=valid, reason=reason), init=False)


def message_length(size: int, at: int, fn: Callable[[Known], int], *,
                   init: Literal[False] = False) -> Any:
    return declare(MessageLength(size, at, fn), init=False)


def sized(size: SizeFn, default: Any = dataclasses.MISSING, *,
          when: Condition | None = None) -> Any:
    return declare(Sized(size, when=when), default)


def uint_list(size: int, count: str | SizeFn, default: Any = dataclasses.MISSING,
              **kw: Any) -> Any:
    return declare(UIntList(size, count, **kw), default)


def data_list(size: int | SizeFn, count: SizeFn) -> Any:
    return declare(DataList(size, count))


def self_sized(what: str, default: Any = dataclasses.MISSING, *,
               when: Condition | None = None) -> Any:
    return declare(SelfSized(what, when=when), default)


def extended_error_data(fixed_sizes: Mapping[int, int], code_field: str,
                        default: Any = dataclasses.MISSING) -> Any:
    return declare(ExtendedErrorData(fixed_sizes, code_field), default)


def ascending(kind: type[Struct], count: str, key: str, default: Any = dataclasses.MISSING, *,
              when: Condition | None = None) -> Any:
    return declare(Ascending(kind, count, key, when=when), default)
