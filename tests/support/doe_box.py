"""A DOE mailbox (PCIe 6.x §6.30.2, §7.9.24) with a clock the test moves, driven the way
a driver drives it: DWs written to the Write Data Mailbox, Go, DWs read back."""

from __future__ import annotations

from teeio.doe import DoeControl, DoeDispatcher, DoeMailbox, DoeReg, DoeStatus, MailboxState

READY = DoeStatus.DATA_OBJECT_READY


def dw(data: bytes) -> list[int]:
    return [int.from_bytes(data[i:i + 4], "little") for i in range(0, len(data), 4)]


class Box:
    """A mailbox with a clock the test moves, and helpers that act like a driver."""

    def __init__(self, dispatcher: DoeDispatcher | None = None, **kw: object) -> None:
        self.d = dispatcher or DoeDispatcher()
        self.mb = DoeMailbox(self.d.handle_object, **kw)  # type: ignore[arg-type]
        self.now = 100.0

    def rd(self, reg: DoeReg) -> int:
        return self.mb.read(reg, self.now)

    def wr(self, reg: DoeReg, value: int, be: int = 0xF) -> None:
        self.mb.write(reg, value, self.now, be)

    def status(self) -> int:
        return self.rd(DoeReg.STATUS)

    def state(self) -> MailboxState:
        return self.mb.state

    def send(self, obj: bytes, go: bool = True) -> None:
        for v in dw(obj):
            self.wr(DoeReg.WRITE_MAILBOX, v)
        if go:   # read-modify-write: a bare Go would also clear Interrupt Enable (RW)
            self.wr(DoeReg.CONTROL, self.rd(DoeReg.CONTROL) | DoeControl.GO)

    def receive(self) -> bytes:
        out = b""
        while self.status() & READY:
            out += self.rd(DoeReg.READ_MAILBOX).to_bytes(4, "little")
            self.wr(DoeReg.READ_MAILBOX, 0)
        return out
