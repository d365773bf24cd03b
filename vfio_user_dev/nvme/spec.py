"""NVMe 1.4 base specification constants: controller registers (§3.1), command opcodes
(§5, §6), status codes (§4.6.1.2) and the queue entry sizes (§4.2, §4.6)."""

from __future__ import annotations

import enum

PAGE = 4096                 # CC.MPS = 0: the only memory page size CAP offers
SQE_SIZE = 64               # CC.IOSQES = 6
CQE_SIZE = 16               # CC.IOCQES = 4
IDENTIFY_SIZE = 4096
DOORBELL_BASE = 0x1000      # §3.1.24: SQ y tail at 0x1000 + 2y * (4 << DSTRD), DSTRD = 0
MAX_QUEUE_ENTRIES = 1024    # CAP.MQES + 1
IO_QUEUES = 8               # I/O submission and completion queues offered
MDTS = 5                    # max data transfer 2^5 pages = 128 KiB
AERL = 3                    # Asynchronous Event Request Limit, 0's based
VERSION = 0x0001_0400       # NVMe 1.4.0


class Reg(enum.IntEnum):
    """Controller registers (§3.1, Figure 78)."""
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C


REGS_SIZE = 0x40

# CC (§3.1.5)
CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3
CC_IOSQES_SHIFT, CC_IOCQES_SHIFT = 16, 20
CC_WRITABLE = 0x00FF_FFF1

# CSTS (§3.1.6)
CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_COMPLETE = 2 << 2

CAP_VALUE = ((MAX_QUEUE_ENTRIES - 1)      # MQES
             | 1 << 16                    # CQR: queues physically contiguous
             | 20 << 24                   # TO: 10 s in 500 ms units
             | 1 << 37)                   # CSS: NVM command set; DSTRD = MPSMIN = MPSMAX = 0


class AdminOp(enum.IntEnum):
    """Admin command set (§5, Figure 139)."""
    DELETE_IO_SQ = 0x00
    CREATE_IO_SQ = 0x01
    GET_LOG_PAGE = 0x02
    DELETE_IO_CQ = 0x04
    CREATE_IO_CQ = 0x05
    IDENTIFY = 0x06
    ABORT = 0x08
    SET_FEATURES = 0x09
    GET_FEATURES = 0x0A
    ASYNC_EVENT_REQUEST = 0x0C


class IoOp(enum.IntEnum):
    """NVM command set (§6, Figure 346)."""
    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


class Feature(enum.IntEnum):
    """Feature identifiers (§5.21.1, Figure 271) the controller keeps."""
    ARBITRATION = 0x01
    POWER_MANAGEMENT = 0x02
    TEMPERATURE_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WRITE_CACHE = 0x06
    NUMBER_OF_QUEUES = 0x07
    INTERRUPT_COALESCING = 0x08
    INTERRUPT_VECTOR_CONFIG = 0x09
    WRITE_ATOMICITY = 0x0A
    ASYNC_EVENT_CONFIG = 0x0B


class LogPage(enum.IntEnum):
    """Log page identifiers (§5.14.1, Figure 191)."""
    ERROR = 0x01
    SMART = 0x02
    FIRMWARE_SLOT = 0x03


class Cns(enum.IntEnum):
    """Identify CNS values (§5.15.1, Figure 244)."""
    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NAMESPACE_DESCRIPTORS = 0x03
    CSI_CONTROLLER = 0x06


class Sct(enum.IntEnum):
    """Status Code Type (§4.6.1.2, Figure 125)."""
    GENERIC = 0
    COMMAND_SPECIFIC = 1


class Status(enum.IntEnum):
    """(SCT << 8) | SC: generic (Figure 127, 129) and command specific (Figure 128)."""
    SUCCESS = 0x000
    INVALID_OPCODE = 0x001
    INVALID_FIELD = 0x002
    DATA_TRANSFER_ERROR = 0x004
    INTERNAL_ERROR = 0x006
    ABORT_REQUESTED = 0x007
    ABORTED_SQ_DELETION = 0x008
    INVALID_NAMESPACE = 0x00B
    PRP_OFFSET_INVALID = 0x013
    LBA_OUT_OF_RANGE = 0x080
    COMPLETION_QUEUE_INVALID = 0x100
    INVALID_QUEUE_IDENTIFIER = 0x101
    INVALID_QUEUE_SIZE = 0x102
    AER_LIMIT_EXCEEDED = 0x105
    INVALID_INTERRUPT_VECTOR = 0x108
    INVALID_LOG_PAGE = 0x109
    INVALID_QUEUE_DELETION = 0x10C
    FEATURE_NOT_SAVEABLE = 0x10D

    def dw3_bits(self) -> int:
        """Status field of CQE DW3 [31:17]: SC in [24:17], SCT in [27:25]; DNR [31] set for
        every error (retrying the same command cannot succeed here)."""
        if self == Status.SUCCESS:
            return 0
        return (self & 0xFF) << 17 | (self >> 8) << 25 | 1 << 31


class CommandError(Exception):
    """A command completes with this status (and optionally a DW0 result)."""

    def __init__(self, status: Status, why: str = "") -> None:
        self.status = status
        super().__init__(why or status.name)
