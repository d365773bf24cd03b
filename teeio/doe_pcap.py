"""DOE objects as a pcap file that DMTF ``spdm_dump -r FILE`` decodes; SPDM session secrets.

The classic pcap spdm-emu writes with ``--pcap`` over PCI_DOE (link type 292), one whole DOE
object per record (PCIe 6.x §6.30.1); the DHE secrets file is a debugging aid, never on by
default.  The byte layout: docs/attestation.md, "The capture format".
"""

from __future__ import annotations

import enum
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import field
from pathlib import Path
from typing import BinaryIO, TextIO

from teeio.lite_dataclass import dataclass

log = logging.getLogger(__name__)

PCAP_MAGIC_US = 0xA1B2C3D4      # microsecond timestamps (what spdm-emu writes)
PCAP_MAGIC_NS = 0xA1B23C4D      # nanosecond timestamps (spdm_dump reads these too)
PCAP_VERSION = (2, 4)
LINKTYPE_PCI_DOE = 292          # spdm-dump doc/spdm_dump.md "SPDM message dump file format"
LINKTYPE_MCTP = 291
SNAPLEN = 0x10000               # spdm-emu PCAP_PACKET_MAX_SIZE: spdm_dump's upper bound
GLOBAL_HEADER = struct.Struct("<IHHiIII")
RECORD_HEADER = struct.Struct("<IIII")


class DoeDirection(enum.IntEnum):
    """Which way an object went.  Not in the file (see the module doc): it only orders
    the records and counts them."""

    REQUEST = 0     # requester -> responder (host -> device)
    RESPONSE = 1    # responder -> requester


# -- encode ---------------------------------------------------------------------------------

def global_header(linktype: int = LINKTYPE_PCI_DOE, snaplen: int = SNAPLEN) -> bytes:
    return GLOBAL_HEADER.pack(PCAP_MAGIC_US, *PCAP_VERSION, 0, 0, snaplen, linktype)


def record(timestamp_ns: int, data: bytes, snaplen: int = SNAPLEN) -> bytes:
    """One record: header and the data, cut to *snaplen* as spdm-emu does."""
    sec, ns = divmod(timestamp_ns, 1_000_000_000)
    incl = min(len(data), snaplen)
    return RECORD_HEADER.pack(sec & 0xFFFFFFFF, ns // 1000, incl, len(data)) + data[:incl]


# -- decode ---------------------------------------------------------------------------------

class PcapFormatError(ValueError):
    pass


@dataclass(frozen=True)
class PcapRecord:
    timestamp_ns: int
    orig_len: int
    data: bytes = field(repr=False)


@dataclass(frozen=True)
class Pcap:
    magic: int
    version: tuple[int, int]
    snaplen: int
    linktype: int
    records: list[PcapRecord]


def decode(raw: bytes) -> Pcap:
    """A little-endian classic pcap file (micro- or nanosecond), every record."""
    if len(raw) < GLOBAL_HEADER.size:
        raise PcapFormatError("too short for a pcap global header")
    magic, major, minor, _zone, _sig, snaplen, linktype = GLOBAL_HEADER.unpack_from(raw)
    if magic not in (PCAP_MAGIC_US, PCAP_MAGIC_NS):
        raise PcapFormatError(f"not a little-endian pcap file (magic {magic:#010x})")
    scale = 1000 if magic == PCAP_MAGIC_US else 1
    records = []
    pos = GLOBAL_HEADER.size
    while pos < len(raw):
        if pos + RECORD_HEADER.size > len(raw):
            raise PcapFormatError(f"truncated record header at offset {pos}")
        sec, frac, incl, orig = RECORD_HEADER.unpack_from(raw, pos)
        pos += RECORD_HEADER.size
        if pos + incl > len(raw):
            raise PcapFormatError(f"truncated record at offset {pos}")
        records.append(PcapRecord(sec * 1_000_000_000 + frac * scale, orig,
                                  raw[pos:pos + incl]))
        pos += incl
    return Pcap(magic, (major, minor), snaplen, linktype, records)


def read(path: Path | str) -> Pcap:
    try:
        return decode(Path(path).read_bytes())
    except PcapFormatError as exc:
        raise PcapFormatError(f"{path}: {exc}") from None


# -- writer ---------------------------------------------------------------------------------

class DoePcapWriter:
    """Appends DOE objects to a LINKTYPE_PCI_DOE pcap file; thread-safe.  Every record is
    flushed, so the file is readable while the process runs and after it dies."""

    def __init__(self, path: Path | str, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.Lock()
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (kept open)
        self._file.write(global_header())
        self._file.flush()
        self.counts = {DoeDirection.REQUEST: 0, DoeDirection.RESPONSE: 0}

    def write(self, direction: DoeDirection, obj: bytes) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(record(self._clock(), bytes(obj)))
            self._file.flush()
            self.counts[direction] += 1

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None

    def __repr__(self) -> str:
        return f"DoePcapWriter({str(self.path)!r})"


# -- session secrets ------------------------------------------------------------------------

SECRETS_HEADER = ("# teeio DHE secrets for spdm_dump (DSP0274 §10.15 KEY_EXCHANGE); DEBUG ONLY:\n"
                  "# whoever holds this file and the DOE capture reads and can forge every\n"
                  "# secured message of these sessions.\n"
                  "# usage: spdm_dump -r CAPTURE $(grep -v '^#' THIS_FILE)\n")


class SessionSecretLog:
    """Writes each SPDM session's DHE shared secret in spdm_dump's ``--dhe_secret`` form
    (module doc).  Mode 0600; loud on purpose."""

    def __init__(self, path: Path | str, who: str = "") -> None:
        self.path = Path(path)
        self.who = who
        self._lock = threading.Lock()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        self._file: TextIO | None = os.fdopen(fd, "w")
        self._file.write(SECRETS_HEADER)
        self._file.flush()
        self.sessions = 0
        log.warning("DEBUG: SPDM session secrets of %s are exported to %s: every secured "
                    "session it opens can be decrypted from a capture; never use this "
                    "outside debugging", who or "this process", self.path)

    def record(self, session_id: int, dhe_secret: bytes) -> None:
        with self._lock:
            if self._file is None:
                return
            self._file.write(f"# session 0x{session_id:08x}\n--dhe_secret {dhe_secret.hex()}\n")
            self._file.flush()
            self.sessions += 1
        log.warning("DEBUG: the DHE secret of SPDM session 0x%08x was written to %s",
                    session_id, self.path)

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def read_secrets(path: Path | str) -> list[str]:
    """The ``--dhe_secret`` hex strings of a :class:`SessionSecretLog` file, in order."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.startswith("--dhe_secret "):
            out.append(line.split(None, 1)[1].strip())
    return out


__all__ = ["LINKTYPE_PCI_DOE", "SNAPLEN", "DoeDirection", "DoePcapWriter", "Pcap",
           "PcapFormatError", "PcapRecord", "SessionSecretLog", "decode", "global_header",
           "read", "read_secrets", "record"]
