"""Submission and completion queues (NVMe 1.4 §4.1): ring state, phase tags, doorbells."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionQueue:
    qid: int
    base: int
    size: int                   # entries (1's based)
    vector: int = 0             # MSI-X vector (IV)
    irq_enabled: bool = True    # IEN
    tail: int = 0               # next entry the controller writes
    head: int = 0               # last head the host reported (CQ y head doorbell)
    phase: int = 1
    sqs: set[int] = field(default_factory=set)

    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    def pending(self) -> bool:
        """Entries posted that the host has not consumed (drives INTx, §7.5.1)."""
        return self.tail != self.head

    def advance(self) -> None:
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1


@dataclass
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0               # next entry the controller fetches
    tail: int = 0               # last tail the host wrote (SQ y tail doorbell)

    def empty(self) -> bool:
        return self.head == self.tail

    def take(self) -> int:
        """Address of the entry at the head; advances the head."""
        from vfio_user_dev.nvme.spec import SQE_SIZE
        addr = self.base + self.head * SQE_SIZE
        self.head = (self.head + 1) % self.size
        return addr
