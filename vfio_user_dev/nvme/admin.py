"""The admin command set (NVMe 1.4 §5) of the controller."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vfio_user_dev.nvme import identify
from vfio_user_dev.nvme.commands import Command
from vfio_user_dev.nvme.queues import CompletionQueue, SubmissionQueue
from vfio_user_dev.nvme.spec import (
    AERL,
    IDENTIFY_SIZE,
    MAX_QUEUE_ENTRIES,
    PAGE,
    AdminOp,
    Cns,
    CommandError,
    Feature,
    Status,
)

if TYPE_CHECKING:
    from vfio_user_dev.nvme.controller import NvmeController

HELD = -1     # DW0 of a command that completes later (an Asynchronous Event Request)


def execute(ctl: NvmeController, cmd: Command) -> int:
    """Run one admin command; returns DW0, :data:`HELD`, or raises CommandError."""
    try:
        op = AdminOp(cmd.opcode)
    except ValueError:
        raise CommandError(Status.INVALID_OPCODE, f"admin opcode {cmd.opcode:#x}") from None
    return _HANDLERS[op](ctl, cmd)


def _identify(ctl: NvmeController, cmd: Command) -> int:
    cns, csi = cmd.cdw10 & 0xFF, cmd.cdw11 >> 24
    if cns == Cns.CONTROLLER:
        data = identify.controller(ctl.serial, ctl.io_queue_limit)
    elif cns == Cns.NAMESPACE:
        if cmd.nsid != identify.NSID:
            raise CommandError(Status.INVALID_NAMESPACE, f"NSID {cmd.nsid}")
        data = identify.namespace(ctl.namespace)
    elif cns == Cns.ACTIVE_NAMESPACES:
        if cmd.nsid >= 0xFFFFFFFE:
            raise CommandError(Status.INVALID_NAMESPACE, f"NSID {cmd.nsid:#x}")
        data = identify.active_namespaces(cmd.nsid)
    elif cns == Cns.NAMESPACE_DESCRIPTORS:
        if cmd.nsid != identify.NSID:
            raise CommandError(Status.INVALID_NAMESPACE, f"NSID {cmd.nsid}")
        data = identify.namespace_descriptors(ctl.namespace)
    elif cns == Cns.CSI_CONTROLLER and csi == 0:    # NVM command set: no extra limits
        data = bytes(IDENTIFY_SIZE)
    else:
        raise CommandError(Status.INVALID_FIELD, f"Identify CNS {cns:#x} CSI {csi}")
    ctl.scatter(cmd, data)
    return 0


def _get_log_page(ctl: NvmeController, cmd: Command) -> int:
    lid = cmd.cdw10 & 0xFF
    dwords = ((cmd.cdw10 >> 16) | (cmd.cdw11 & 0xFFFF) << 16) + 1
    offset = cmd.cdw12 | cmd.cdw13 << 32
    page = identify.log_page(lid, ctl.namespace, ctl.errors, ctl.started)
    if page is None:
        raise CommandError(Status.INVALID_LOG_PAGE, f"log page {lid:#x}")
    if offset & 3 or offset >= len(page):
        raise CommandError(Status.INVALID_FIELD, f"log page offset {offset}")
    length = dwords * 4
    if length > PAGE << 5:
        raise CommandError(Status.INVALID_FIELD, f"log page length {length}")
    ctl.scatter(cmd, page[offset:offset + length].ljust(length, b"\0"))
    return 0


def _create_cq(ctl: NvmeController, cmd: Command) -> int:
    qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    contiguous, ien, vector = cmd.cdw11 & 1, bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
    if not 1 <= qid <= ctl.io_queue_limit or qid in ctl.cqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    if not 2 <= size <= MAX_QUEUE_ENTRIES:
        raise CommandError(Status.INVALID_QUEUE_SIZE, f"CQ size {size}")
    if not contiguous or cmd.prp1 & (PAGE - 1):
        raise CommandError(Status.INVALID_FIELD, "CQ must be contiguous and page aligned")
    if vector >= ctl.vectors:
        raise CommandError(Status.INVALID_INTERRUPT_VECTOR, f"vector {vector}")
    ctl.cqs[qid] = CompletionQueue(qid, cmd.prp1, size, vector, ien)
    return 0


def _create_sq(ctl: NvmeController, cmd: Command) -> int:
    qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
    contiguous, cqid = cmd.cdw11 & 1, cmd.cdw11 >> 16
    if not 1 <= qid <= ctl.io_queue_limit or qid in ctl.sqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    if not 2 <= size <= MAX_QUEUE_ENTRIES:
        raise CommandError(Status.INVALID_QUEUE_SIZE, f"SQ size {size}")
    if not contiguous or cmd.prp1 & (PAGE - 1):
        raise CommandError(Status.INVALID_FIELD, "SQ must be contiguous and page aligned")
    if cqid == 0 or cqid not in ctl.cqs:
        raise CommandError(Status.COMPLETION_QUEUE_INVALID, f"CQ {cqid}")
    ctl.sqs[qid] = SubmissionQueue(qid, cmd.prp1, size, cqid)
    ctl.cqs[cqid].sqs.add(qid)
    return 0


def _delete_sq(ctl: NvmeController, cmd: Command) -> int:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctl.sqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"SQ {qid}")
    sq = ctl.sqs.pop(qid)
    ctl.cqs[sq.cqid].sqs.discard(qid)
    return 0


def _delete_cq(ctl: NvmeController, cmd: Command) -> int:
    qid = cmd.cdw10 & 0xFFFF
    if qid == 0 or qid not in ctl.cqs:
        raise CommandError(Status.INVALID_QUEUE_IDENTIFIER, f"CQ {qid}")
    if ctl.cqs[qid].sqs:
        raise CommandError(Status.INVALID_QUEUE_DELETION, f"CQ {qid} still has SQs")
    del ctl.cqs[qid]
    return 0


def _set_features(ctl: NvmeController, cmd: Command) -> int:
    fid, save = cmd.cdw10 & 0xFF, cmd.cdw10 >> 31
    if save:
        raise CommandError(Status.FEATURE_NOT_SAVEABLE, f"feature {fid:#x}")
    try:
        feature = Feature(fid)
    except ValueError:
        raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}") from None
    if feature == Feature.NUMBER_OF_QUEUES:        # §5.21.1.7: 0's based counts
        nsq, ncq = cmd.cdw11 & 0xFFFF, cmd.cdw11 >> 16
        if nsq == 0xFFFF or ncq == 0xFFFF:
            raise CommandError(Status.INVALID_FIELD, "65536 queues requested")
        limit = ctl.io_queue_limit - 1
        value = min(nsq, limit) | min(ncq, limit) << 16
        ctl.features[feature] = value
        return value
    ctl.features[feature] = cmd.cdw11
    return 0


def _get_features(ctl: NvmeController, cmd: Command) -> int:
    fid, select = cmd.cdw10 & 0xFF, (cmd.cdw10 >> 8) & 0x7
    try:
        feature = Feature(fid)
    except ValueError:
        raise CommandError(Status.INVALID_FIELD, f"feature {fid:#x}") from None
    if select == 3:                                 # supported capabilities: changeable
        return 1 << 2
    if select not in (0, 1, 2):
        raise CommandError(Status.INVALID_FIELD, f"SEL {select}")
    if feature == Feature.NUMBER_OF_QUEUES and feature not in ctl.features:
        limit = ctl.io_queue_limit - 1
        return limit | limit << 16
    if feature == Feature.INTERRUPT_VECTOR_CONFIG:
        return cmd.cdw11 & 0xFFFF
    return ctl.features.get(feature, 0) if select == 0 else 0


def _async_event(ctl: NvmeController, cmd: Command) -> int:
    if len(ctl.aers) > AERL:
        raise CommandError(Status.AER_LIMIT_EXCEEDED, "too many outstanding AERs")
    ctl.aers.append(cmd.cid)
    return HELD                                     # completes when an event occurs


def _abort(ctl: NvmeController, cmd: Command) -> int:
    return 1            # DW0 bit 0: not aborted (commands run to completion in order)


_HANDLERS = {
    AdminOp.IDENTIFY: _identify, AdminOp.GET_LOG_PAGE: _get_log_page,
    AdminOp.CREATE_IO_CQ: _create_cq, AdminOp.CREATE_IO_SQ: _create_sq,
    AdminOp.DELETE_IO_SQ: _delete_sq, AdminOp.DELETE_IO_CQ: _delete_cq,
    AdminOp.SET_FEATURES: _set_features, AdminOp.GET_FEATURES: _get_features,
    AdminOp.ASYNC_EVENT_REQUEST: _async_event, AdminOp.ABORT: _abort,
}
