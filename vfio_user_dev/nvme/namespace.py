"""One namespace backed by a sparse host file (NVMe 1.4 §6: the NVM command set's media).

A write completes once its data is in the file (``pwrite``); a Flush completes once the
file is ``fsync``ed, so what was acknowledged as flushed survives killing the server."""

from __future__ import annotations

import os
from pathlib import Path


class Namespace:
    def __init__(self, path: Path | str, size: int, lba_shift: int = 9) -> None:
        self.lba_shift = lba_shift
        self.block = 1 << lba_shift
        if size <= 0 or size % self.block:
            raise ValueError(f"namespace size {size} is not a positive multiple of "
                             f"{self.block}-byte blocks")
        self.path = Path(path)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)                  # sparse: holes read as zeros
        self.size = size
        self.blocks = size >> lba_shift
        self.counters = {"read_commands": 0, "write_commands": 0, "blocks_read": 0,
                         "blocks_written": 0, "flushes": 0}

    def check(self, slba: int, nlb: int) -> bool:
        return nlb > 0 and slba + nlb <= self.blocks

    def read(self, slba: int, nlb: int) -> bytes:
        n = nlb << self.lba_shift
        data = os.pread(self.fd, n, slba << self.lba_shift)
        self.counters["read_commands"] += 1
        self.counters["blocks_read"] += nlb
        return data.ljust(n, b"\0")

    def write(self, slba: int, data: bytes) -> None:
        off = slba << self.lba_shift
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, off)
            view, off = view[done:], off + done
        self.counters["write_commands"] += 1
        self.counters["blocks_written"] += len(data) >> self.lba_shift

    def zero(self, slba: int, nlb: int) -> None:
        chunk = max(1, (1 << 20) >> self.lba_shift)
        for lba in range(slba, slba + nlb, chunk):
            self.write(lba, bytes(min(chunk, slba + nlb - lba) << self.lba_shift))

    def flush(self) -> None:
        os.fsync(self.fd)
        self.counters["flushes"] += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
