"""The shared runner: harness discovery, contract checking and the atheris entry point.

A harness is a module of :mod:`fuzz.harnesses` with

* ``KIND``: ``"decoder"`` (pure function of the input: budget in inputs), ``"responder"``
  (an in-process responder fed arbitrary requests) or ``"stateful"`` (real sockets and
  threads: budget in seconds);
* ``seeds() -> list[bytes]``: valid inputs built from real messages;
* ``one_input(data: bytes) -> None``: returns when the code under test kept its contract;
  anything it raises is a crash (an unexpected exception, or :class:`ContractViolation`).

``python -m fuzz.runner NAME [libFuzzer flags] [corpus dirs]`` fuzzes one harness.
"""

from __future__ import annotations

import importlib
import logging
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType

#: Every harness module, in the order ``make fuzz`` runs them.
HARNESSES = (
    "vfio_protocol", "doe_object", "spdm_codec", "spdm_secured", "ide_km", "tdisp",
    "ghcx_frames", "ghcx_channel", "platform_ctl", "tsm_ctl", "journal_records",
    "link_capture", "doe_pcap", "tlp", "spdm_responder", "dsm_doe", "journal_replay",
    "vfio_server", "doe_socket", "link_ide", "nvme_commands", "dma_batch",
)


class ContractViolation(AssertionError):
    """The code under test returned something its contract rules out."""


def check(cond: bool, message: str) -> None:
    if not cond:
        raise ContractViolation(message)


@dataclass(frozen=True)
class Harness:
    name: str
    kind: str
    seeds: Callable[[], list[bytes]]
    one_input: Callable[[bytes], None]


def load(name: str) -> Harness:
    mod: ModuleType = importlib.import_module(f"fuzz.harnesses.{name}")
    kind = str(mod.KIND)
    if kind not in ("decoder", "responder", "stateful"):
        raise ValueError(f"harness {name}: unknown KIND {kind!r}")
    return Harness(name, kind, mod.seeds, mod.one_input)


def quiet() -> None:
    """The code under test logs every refusal; a fuzzer makes millions of them."""
    logging.disable(logging.CRITICAL)


class Bytes:
    """A consumer of the fuzzer's bytes (what atheris' FuzzedDataProvider does, without
    atheris): every read succeeds, with zeros once the input is used up."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def u8(self) -> int:
        return int.from_bytes(self.take(1).ljust(1, b"\0"), "little")

    def u16(self) -> int:
        return int.from_bytes(self.take(2).ljust(2, b"\0"), "little")

    def u32(self) -> int:
        return int.from_bytes(self.take(4).ljust(4, b"\0"), "little")

    def chunk(self) -> bytes:
        """A u16-length-prefixed slice (the way harnesses split an input into messages)."""
        return self.take(self.u16())

    def rest(self) -> bytes:
        return self.take(self.left)

    def patch(self, payload: bytes) -> bytes:
        """*payload* with up to 7 bytes overwritten at positions and values read here."""
        body = bytearray(payload)
        for _ in range(self.u8() % 8):
            pos, val = self.u8(), self.u8()
            if body:
                body[pos % len(body)] = val
        return bytes(body)


def frames(parts: list[bytes]) -> bytes:
    """Inverse of repeated :meth:`Bytes.chunk`: seeds for multi-message harnesses."""
    return b"".join(len(p).to_bytes(2, "little") + p for p in parts)


def chunks(data: bytes, limit: int = 64) -> Iterator[bytes]:
    b = Bytes(data)
    for _ in range(limit):
        if not b.left:
            return
        yield b.chunk()


# -- deterministic mutations (CI smoke, no atheris) ----------------------------------------------

def mutate(rng: random.Random, data: bytes, pool: list[bytes]) -> bytes:
    """One input derived from *data*: a few of bit flips, byte sets, interesting values,
    truncation, insertion, duplication and splicing with another seed."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(8)
        if op == 0 and buf:
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:
            buf[rng.randrange(len(buf))] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif op == 2 and len(buf) >= 4:
            i = rng.randrange(len(buf) - 3)
            buf[i:i + 4] = rng.choice((0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000,
                                       rng.getrandbits(32))).to_bytes(4, "little")
        elif op == 3:
            del buf[rng.randrange(len(buf) + 1):]
        elif op == 4:
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
        elif op == 5 and buf:
            i = rng.randrange(len(buf))
            j = min(len(buf), i + rng.randint(1, 32))
            buf[j:j] = buf[i:j]
        elif op == 6 and pool:
            other = rng.choice(pool)
            i = rng.randrange(len(buf) + 1)
            j = rng.randrange(len(other) + 1)
            buf = buf[:i] + other[j:]
        elif op == 7 and buf:
            i = rng.randrange(len(buf))
            del buf[i:i + rng.randint(1, 8)]
    return bytes(buf)


def smoke_inputs(seeds: list[bytes], count: int, seed: int) -> Iterator[bytes]:
    """The seeds, a few degenerate inputs, then *count* mutations (fixed *seed*)."""
    rng = random.Random(seed)
    yield from seeds
    yield from (b"", b"\0", b"\xff" * 64, bytes(range(256)))
    pool = seeds or [b""]
    for _ in range(count):
        yield mutate(rng, rng.choice(pool), pool)


# -- atheris entry ----------------------------------------------------------------------------

def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in HARNESSES:
        print(f"usage: python -m fuzz.runner {{{','.join(HARNESSES)}}} [libFuzzer flags]",
              file=sys.stderr)
        return 2
    import atheris

    name = argv[1]
    quiet()
    with atheris.instrument_imports(include=["teeio", "vfio_user_dev", "tsm"]):
        harness = load(name)
    # Setup (key generation, sockets, seed transcripts) happens before fuzzing starts.
    harness.seeds()

    def test_one_input(data: bytes) -> None:
        harness.one_input(data)

    atheris.Setup([argv[0], *argv[2:]], test_one_input)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    sys.exit(main(sys.argv))
