"""IDE_KM field kinds for the codec core (PCIe 6.x §6.33.3) that :mod:`teeio.codec` lacks.

* :class:`KeySubStream` — the KSS byte, ``[7:4]`` Sub-Stream, ``[3:2]`` reserved,
  ``[1]`` RxTxB, ``[0]`` Key Set — and :class:`KssPart`, each part a field of its own;
* :class:`DwordReversed` — bytes sent one DW at a time, each DW's bytes reversed (the key,
  PCIe Appendix L);
* :class:`Ifv` — the 64-bit IFV as two LE u32s, bits 63:32 first;
* :class:`Dwords` — LE u32s up to the end of the object (QUERY_RESP's IDE registers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from enum import IntEnum
from typing import Any

from ..codec import Data, Field, Known, Reader, UInt, Writer
from ..ide import SubStream

__all__ = ["DwordReversed", "Dwords", "Ifv", "KeySubStream", "KssPart", "declare",
           "reverse_dwords"]

_KSS_RESERVED = 0x0C


def declare(spec: Field, default: Any = dataclasses.MISSING, *, repr: bool = True) -> Any:
    """A dataclass field carrying *spec*, as the core's helpers declare one; ``repr=False``
    keeps a secret (a key, an IFV) out of the object's repr."""
    meta = {"codec": spec}
    if not spec.init:
        return dataclasses.field(default=None if default is dataclasses.MISSING else default,
                                 init=False, repr=False, metadata=meta)
    if default is dataclasses.MISSING:
        return dataclasses.field(repr=repr, metadata=meta)
    return dataclasses.field(default=default, repr=repr, metadata=meta)


def reverse_dwords(data: bytes) -> bytes:
    """Each DW's bytes reversed (its own inverse)."""
    if len(data) % 4:
        raise ValueError("key length must be a multiple of 4")
    return b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))


class KeySubStream(Field):
    """The KSS byte itself, derived from the ``key_set``, ``direction`` and ``substream``
    fields when encoding; decoding checks the reserved bits and the sub-stream (0..2)."""

    init = False

    def pull(self, r: Reader, known: Known, ctx: Any) -> int:
        at = r.pos
        kss = r.pull_u8(self.name)
        if kss & _KSS_RESERVED:
            raise r.fail(f"KeySubStream 0x{kss:02x}: reserved bits 3:2 set", at)
        if kss >> 4 not in set(SubStream):
            raise r.fail(f"KeySubStream 0x{kss:02x}: unknown sub-stream {kss >> 4}", at)
        return kss

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_u8(value)

    def derive(self, values: Known, ctx: Any) -> int:
        return (int(values["key_set"]) | int(values["direction"]) << 1
                | int(values["substream"]) << 4)


class KssPart(Field):
    """One part of the KSS byte read before it (*source*): no bytes of its own."""

    def __init__(self, kind: type[IntEnum], shift: int, mask: int,
                 source: str = "kss") -> None:
        self.kind, self.shift, self.mask, self.source = kind, shift, mask, source

    def pull(self, r: Reader, known: Known, ctx: Any) -> IntEnum:
        return self.kind(known[self.source] >> self.shift & self.mask)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        pass

    def coerce(self, value: Any) -> IntEnum:
        return self.kind(value)

    def check(self, value: Any) -> None:
        if not isinstance(value, self.kind):
            raise ValueError(f"{self.name} must be a {self.kind.__name__}")

    def strategy(self, known: Known, ctx: Any) -> Any:
        return UInt(1, kind=self.kind).strategy(known, ctx)


class DwordReversed(Data):
    """*size* bytes sent with each DW's bytes reversed."""

    def __init__(self, size: int, what: str) -> None:
        super().__init__(size)
        self.what = what

    def pull(self, r: Reader, known: Known, ctx: Any) -> bytes:
        return reverse_dwords(super().pull(r, known, ctx))

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        super().push(w, reverse_dwords(value), known, ctx)

    def coerce(self, value: Any) -> bytes:
        return bytes(value)

    def check(self, value: Any) -> None:
        if len(value) != self.size:
            raise ValueError(f"{self.what} must be {self.size} bytes, got {len(value)}")


class Ifv(Field):
    """A 64-bit value as two LE u32s, bits 63:32 first."""

    def pull(self, r: Reader, known: Known, ctx: Any) -> int:
        high = r.pull_u32(self.name)
        return high << 32 | r.pull_u32(self.name)

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        w.push_u32(value >> 32)
        w.push_u32(value & 0xFFFFFFFF)

    def check(self, value: Any) -> None:
        if not 0 <= value < 1 << 64:
            raise ValueError("IFV must fit in 64 bits")

    def strategy(self, known: Known, ctx: Any) -> Any:
        return UInt(8).strategy(known, ctx)


class Dwords(Field):
    """LE u32s up to the end of the object, at least *min_count*; *validate* raises
    ValueError when the values do not belong together."""

    def __init__(self, what: str, min_count: int,
                 validate: Callable[[tuple[int, ...]], None]) -> None:
        self.what, self.min_count, self.validate = what, min_count, validate

    def pull(self, r: Reader, known: Known, ctx: Any) -> tuple[int, ...]:
        at, n = r.pos, r.remaining
        if n < 4 * self.min_count or n % 4:
            raise r.fail(f"{self.what} must be at least {self.min_count} whole DWs, got "
                         f"{n} bytes", r.end)
        values = tuple(r.pull_u32(self.name) for _ in range(n // 4))
        try:
            self.validate(values)
        except ValueError as exc:
            raise r.fail(str(exc), at) from None
        return values

    def push(self, w: Writer, value: Any, known: Known, ctx: Any) -> None:
        for v in value:
            w.push_u32(v)

    def coerce(self, value: Any) -> tuple[int, ...]:
        return tuple(value)

    def check(self, value: Any) -> None:
        if any(not 0 <= v <= 0xFFFFFFFF for v in value):
            raise ValueError(f"{self.what} values must be u32")
        self.validate(value)
