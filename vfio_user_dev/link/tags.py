"""Tags of a requester's outstanding non-posted requests (PCIe 6.x §2.2.6.2): 8-bit tags
(256 outstanding) with Extended Tag Field Enable set (§7.5.3.4), else 5-bit tags (32);
handed out round-robin so successive requests carry different tags.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from teeio.tlp import memory_read_tagged

MAX_OUTSTANDING = 256           # 8-bit tags (Extended Tag Field Enable set, §7.5.3.4)
TAGS_5BIT = 32                  # Extended Tag Field Enable clear: tags 0..31 (§2.2.6.2)


class TagAllocator:
    """The tags of one requester's outstanding non-posted requests (PCIe 6.x §2.2.6.2):
    each request gets a tag no other outstanding request of the requester carries, handed
    out round-robin so that successive requests carry different tags.  *space* is 256
    (8-bit tags) or 32 (5-bit tags: Extended Tag Field Enable clear)."""

    def __init__(self, space: int = MAX_OUTSTANDING) -> None:
        self._lock = threading.Lock()
        self._busy: set[int] = set()
        self._next = 0
        self.space = MAX_OUTSTANDING
        self.set_space(space)

    def set_space(self, space: int) -> None:
        if space not in (TAGS_5BIT, MAX_OUTSTANDING):
            raise ValueError(f"tag space must be {TAGS_5BIT} or {MAX_OUTSTANDING}; got {space}")
        with self._lock:
            self.space = space
            self._next %= space

    @property
    def outstanding(self) -> int:
        return len(self._busy)

    def allocate(self, n: int) -> list[int]:
        """*n* free tags (ValueError if fewer are free), now outstanding."""
        with self._lock:
            if n > self.space - len(self._busy):
                raise ValueError(f"{n} tags wanted, {self.space - len(self._busy)} free")
            out: list[int] = []
            tag = self._next
            if not self._busy:              # none outstanding: the next n, round-robin
                space = self.space
                out = [t % space for t in range(tag, tag + n)]
                tag = (tag + n) % space
            while len(out) < n:
                if tag not in self._busy and tag < self.space:
                    out.append(tag)
                tag = (tag + 1) % self.space
            self._busy.update(out)
            self._next = tag
            return out

    def free(self, tags: Sequence[int]) -> None:
        """*tags* are no longer outstanding (completed, or given up: completion timeout)."""
        with self._lock:
            self._busy.difference_update(tags)


def read_headers(requester_id: int, pieces: Sequence[tuple[int, int]],
                 tags: Sequence[int]) -> list[bytes]:
    """MRd headers for *pieces*, the i-th tagged ``tags[i]``
    (:func:`~teeio.tlp.memory_read_tagged`)."""
    return memory_read_tagged(requester_id, pieces, tags)

