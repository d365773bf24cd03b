"""The NVM command set (NVMe 1.4 §6): Read, Write, Flush, Write Zeroes, Dataset Management."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfio_user_dev.nvme.commands import Command
from vfio_user_dev.nvme.identify import NSID
from vfio_user_dev.nvme.spec import MDTS, PAGE, CommandError, IoOp, Status

if TYPE_CHECKING:
    from vfio_user_dev.nvme.controller import NvmeController

MAX_TRANSFER = PAGE << MDTS


def execute(ctl: NvmeController, cmd: Command) -> int:
    """Run one I/O command; returns DW0 or raises :class:`CommandError`."""
    try:
        op = IoOp(cmd.opcode)
    except ValueError:
        raise CommandError(Status.INVALID_OPCODE, f"I/O opcode {cmd.opcode:#x}") from None
    if cmd.nsid != NSID:
        raise CommandError(Status.INVALID_NAMESPACE, f"NSID {cmd.nsid}")
    if cmd.flags & 0xC0:
        raise CommandError(Status.INVALID_FIELD, "SGLs are not supported (PSDT != 0)")
    ns = ctl.namespace
    if op == IoOp.FLUSH:                        # §6.8: completes once media holds it all
        ns.flush()
        return 0
    if op == IoOp.DATASET_MANAGEMENT:           # §6.7: ranges checked, hints accepted
        ranges = (cmd.cdw10 & 0xFF) + 1
        raw = ctl.gather(cmd, ranges * 16)
        for i in range(ranges):
            nlb = int.from_bytes(raw[16 * i + 4:16 * i + 8], "little")
            slba = int.from_bytes(raw[16 * i + 8:16 * i + 16], "little")
            if nlb and not ns.check(slba, nlb):
                raise CommandError(Status.LBA_OUT_OF_RANGE, f"DSM range {slba}+{nlb}")
        return 0
    slba = cmd.cdw10 | cmd.cdw11 << 32
    nlb = (cmd.cdw12 & 0xFFFF) + 1
    if not ns.check(slba, nlb):
        raise CommandError(Status.LBA_OUT_OF_RANGE, f"LBA {slba}+{nlb} beyond {ns.blocks}")
    if op == IoOp.WRITE_ZEROES:                 # §6.16
        ns.zero(slba, nlb)
        return 0
    length = nlb << ns.lba_shift
    if length > MAX_TRANSFER:
        raise CommandError(Status.INVALID_FIELD, f"{length} bytes exceed MDTS")
    if op == IoOp.WRITE:                        # §6.15: data is in the file before the CQE
        ns.write(slba, ctl.gather(cmd, length))
        return 0
    ctl.scatter(cmd, ns.read(slba, nlb))        # READ, §6.9
    return 0


