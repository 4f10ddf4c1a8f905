"""NVMe wire formats and constants (NVM Express Base Specification 1.4), declared once.

Everything here is pure: register bit fields, command and completion layouts, status codes, and
the builders of the data structures the controller returns (Identify, log pages). The controller
in :mod:`egpu.devices.nvme` decodes guest input with these and nothing else.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import NamedTuple

# -- controller registers (BAR0, spec 3.1) ----------------------------------------------------

REG_CAP = 0x00
REG_VS = 0x08
REG_INTMS = 0x0C
REG_INTMC = 0x10
REG_CC = 0x14
REG_CSTS = 0x1C
REG_NSSR = 0x20
REG_AQA = 0x24
REG_ASQ = 0x28
REG_ACQ = 0x30
REG_CMBSZ = 0x3C
DOORBELL_BASE = 0x1000

NVME_VERSION_1_4 = 0x00010400

CAP_CQR = 1 << 16  # queues must be physically contiguous: no PRP-list queues
CAP_TO_SHIFT = 24
CAP_DSTRD_SHIFT = 32
CAP_CSS_NVM = 1 << 37
CAP_MPSMIN_SHIFT = 48

CC_EN = 1 << 0
CC_CSS_SHIFT, CC_CSS_MASK = 4, 0x7
CC_MPS_SHIFT, CC_MPS_MASK = 7, 0xF
CC_SHN_SHIFT, CC_SHN_MASK = 14, 0x3

CSTS_RDY = 1 << 0
CSTS_CFS = 1 << 1
CSTS_SHST_COMPLETE = 2 << 2

AQA_SIZE_MASK = 0xFFF
AQA_ACQS_SHIFT = 16

PAGE_SHIFT = 12  # CAP.MPSMIN = MPSMAX = 0: 4 KiB memory pages only
PAGE_SIZE = 1 << PAGE_SHIFT
PAGE_MASK = PAGE_SIZE - 1
QUEUE_BASE_RESERVED = PAGE_MASK  # ASQ/ACQ and queue bases: bits 11:0 reserved

SQE_SIZE = 64
CQE_SIZE = 16
SQES_LOG2 = 6
CQES_LOG2 = 4


# -- submission and completion entries (spec 4.2, 4.6) -----------------------------------------

# opcode, flags, cid, nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
SQE = struct.Struct("<BBHIIIQQQIIIIII")
# dw0 result, dw1 reserved, sq head, sq id, cid, status<<1 | phase
CQE = struct.Struct("<IIHHHH")

SQE_FUSE_PSDT_MASK = 0xFF  # fused operations and SGL data transfer: neither is offered


# -- shadow doorbells (Doorbell Buffer Config, spec 5.8) ------------------------------------------

# The host's shadow doorbell page and the controller's EventIdx page share the doorbell layout:
# a 32-bit slot per doorbell, SQ y tail at 8*y and CQ y head at 8*y + 4 (CAP.DSTRD 0). The host
# rings MMIO only when its new value passes the EventIdx the controller left (need_event below).
SHADOW_SLOT = struct.Struct("<I")
SHADOW_QUEUE_STRIDE = 8
SHADOW_CQ_OFFSET = 4
EVENT_INDEX_MASK = 0xFFFF  # the host compares 16-bit values


def need_event(event_idx: int, new: int, old: int) -> bool:
    """Whether a host moving a doorbell from ``old`` to ``new`` rings MMIO (crosses EventIdx)."""
    return (new - event_idx - 1) & EVENT_INDEX_MASK < (new - old) & EVENT_INDEX_MASK


class Command(NamedTuple):
    """A decoded submission queue entry (every field still untrusted).

    A NamedTuple so that decoding is one ``struct`` call plus a tuple: this runs per command.
    """

    opcode: int
    flags: int
    cid: int
    nsid: int
    cdw2: int
    cdw3: int
    mptr: int
    prp1: int
    prp2: int
    cdw10: int
    cdw11: int
    cdw12: int
    cdw13: int
    cdw14: int
    cdw15: int

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Command:
        """Decode one 64-byte entry at ``offset``."""
        return cls._make(SQE.unpack_from(buf, offset))

    def pack(self) -> bytes:
        """Encode (tests and tools build guest submissions with this)."""
        return SQE.pack(*self)


def make_command(opcode: int, cid: int = 0, *, nsid: int = 0, prp1: int = 0, prp2: int = 0,
                 cdw10: int = 0, cdw11: int = 0, cdw12: int = 0, cdw13: int = 0, cdw14: int = 0,
                 cdw15: int = 0, flags: int = 0) -> Command:
    """A Command with defaults for the fields a caller leaves out."""
    return Command(opcode, flags, cid, nsid, 0, 0, 0, prp1, prp2, cdw10, cdw11, cdw12, cdw13,
                   cdw14, cdw15)


class AdminOpcode(enum.IntEnum):
    """Admin command set opcodes the controller knows (spec 5)."""

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
    KEEP_ALIVE = 0x18
    DOORBELL_BUFFER_CONFIG = 0x7C


class IoOpcode(enum.IntEnum):
    """NVM command set opcodes the controller knows (NVM command set spec)."""

    FLUSH = 0x00
    WRITE = 0x01
    READ = 0x02
    WRITE_ZEROES = 0x08
    DATASET_MANAGEMENT = 0x09


RW_FUA = 1 << 30  # Read/Write CDW12: Force Unit Access
DSM_DEALLOCATE = 1 << 2  # Dataset Management CDW11: AD
DSM_RANGE = struct.Struct("<IIQ")  # context attributes, length in blocks, starting LBA


class Identify(enum.IntEnum):
    """Identify CNS values (spec 5.15)."""

    NAMESPACE = 0x00
    CONTROLLER = 0x01
    ACTIVE_NAMESPACES = 0x02
    NS_DESCRIPTORS = 0x03
    CS_NAMESPACE = 0x05
    CS_CONTROLLER = 0x06


class Feature(enum.IntEnum):
    """Feature identifiers (spec 5.21.1)."""

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
    """Log page identifiers (spec 5.14.1)."""

    ERROR_INFORMATION = 0x01
    SMART_HEALTH = 0x02
    FIRMWARE_SLOT = 0x03


NSID_BROADCAST = 0xFFFFFFFF
CSI_NVM = 0

# -- status codes (spec 4.6.1.2): value = SC | SCT << 8 | DNR << 14 ----------------------------

SCT_GENERIC = 0
SCT_COMMAND_SPECIFIC = 1
STATUS_DNR = 1 << 14


def status(sc: int, sct: int = SCT_GENERIC, *, dnr: bool = True) -> int:
    """The 15-bit status field of a completion."""
    return sc | sct << 8 | (STATUS_DNR if dnr else 0)


SUCCESS = 0
INVALID_OPCODE = status(0x01)
INVALID_FIELD = status(0x02)
DATA_TRANSFER_ERROR = status(0x04)
INTERNAL_ERROR = status(0x06)
INVALID_NAMESPACE = status(0x0B)
COMMAND_SEQUENCE_ERROR = status(0x0C)
INVALID_PRP_OFFSET = status(0x13)
LBA_OUT_OF_RANGE = status(0x80)
CQ_INVALID = status(0x00, SCT_COMMAND_SPECIFIC)
INVALID_QUEUE_ID = status(0x01, SCT_COMMAND_SPECIFIC)
INVALID_QUEUE_SIZE = status(0x02, SCT_COMMAND_SPECIFIC)
AER_LIMIT_EXCEEDED = status(0x05, SCT_COMMAND_SPECIFIC)
INVALID_INTERRUPT_VECTOR = status(0x08, SCT_COMMAND_SPECIFIC)
INVALID_LOG_PAGE = status(0x09, SCT_COMMAND_SPECIFIC)
INVALID_QUEUE_DELETION = status(0x0C, SCT_COMMAND_SPECIFIC)
FEATURE_NOT_SAVEABLE = status(0x0D, SCT_COMMAND_SPECIFIC)


def status_code(value: int) -> int:
    """Status code and type of a status field, without DNR/M/CRD (for tests and logs)."""
    return value & 0x7FF


# -- identify and log page builders -----------------------------------------------------------

IDENTIFY_SIZE = 4096
SMART_LOG_SIZE = 512
ERROR_LOG_ENTRY_SIZE = 64
FIRMWARE_LOG_SIZE = 512
NS_DESCRIPTOR_NGUID = 2
NGUID_SIZE = 16
KELVIN_40C = 313
KELVIN_WARNING = 343  # 70 C
KELVIN_CRITICAL = 358  # 85 C


@dataclass(frozen=True)
class ControllerIdentity:
    """What Identify Controller reports; the limits the controller enforces come from here."""

    vendor_id: int
    serial: str
    model: str
    firmware: str
    mdts: int  # max data transfer = 2**mdts pages
    max_io_queues: int
    aerl: int  # async event requests outstanding, 0-based
    oncs: int
    volatile_write_cache: bool
    subnqn: str
    namespaces: int = 1
    error_log_entries: int = 1  # ELPE + 1
    oacs: int = 0  # optional admin commands supported


OACS_DOORBELL_BUFFER_CONFIG = 1 << 8
ONCS_DSM = 1 << 2
ONCS_WRITE_ZEROES = 1 << 3
CNTRLTYPE_IO = 1
FRMW_SLOT1_READONLY = 0x03  # one slot, slot 1 read-only
VWC_PRESENT = 1 << 0


def _ascii(text: str, size: int) -> bytes:
    return text.encode("ascii", "replace")[:size].ljust(size, b" ")


def identify_controller(ident: ControllerIdentity) -> bytes:
    """The 4 KiB Identify Controller data structure (spec figure 247)."""
    page = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<HH", page, 0, ident.vendor_id, ident.vendor_id)
    page[4:24] = _ascii(ident.serial, 20)
    page[24:64] = _ascii(ident.model, 40)
    page[64:72] = _ascii(ident.firmware, 8)
    page[72] = 6  # recommended arbitration burst
    page[77] = ident.mdts
    struct.pack_into("<HI", page, 78, 1, NVME_VERSION_1_4)  # CNTLID, VER
    page[111] = CNTRLTYPE_IO
    struct.pack_into("<H", page, 256, ident.oacs)
    page[259] = ident.aerl
    page[260] = FRMW_SLOT1_READONLY
    page[262] = ident.error_log_entries - 1  # ELPE
    struct.pack_into("<HH", page, 266, KELVIN_WARNING, KELVIN_CRITICAL)  # WCTEMP, CCTEMP
    page[512] = SQES_LOG2 | SQES_LOG2 << 4
    page[513] = CQES_LOG2 | CQES_LOG2 << 4
    struct.pack_into("<IH", page, 516, ident.namespaces, ident.oncs)  # NN, ONCS
    page[525] = VWC_PRESENT if ident.volatile_write_cache else 0
    page[768:1024] = ident.subnqn.encode("ascii", "replace")[:255].ljust(256, b"\0")
    # Power state 0: 25 W max, entry/exit latencies 0 (a virtual device draws nothing).
    struct.pack_into("<H", page, 2048, 2500)
    return bytes(page)


def identify_namespace(blocks: int, lba_shift: int, nguid: bytes) -> bytes:
    """The 4 KiB Identify Namespace data structure for one format, LBA format 0."""
    page = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<QQQ", page, 0, blocks, blocks, blocks)  # NSZE, NCAP, NUSE
    page[25] = 0  # NLBAF: one format (0-based)
    page[26] = 0  # FLBAS: format 0, no metadata
    page[104:120] = nguid
    struct.pack_into("<HBB", page, 128, 0, lba_shift, 0)  # LBAF0: MS, LBADS, RP
    return bytes(page)


def namespace_descriptors(nguid: bytes) -> bytes:
    """The Namespace Identification Descriptor list (spec figure 249): one NGUID."""
    page = bytearray(IDENTIFY_SIZE)
    struct.pack_into("<BBH", page, 0, NS_DESCRIPTOR_NGUID, NGUID_SIZE, 0)
    page[4:4 + NGUID_SIZE] = nguid
    return bytes(page)


def active_namespaces(after: int, count: int) -> bytes:
    """Active Namespace ID list: ids greater than ``after`` among 1..count."""
    page = bytearray(IDENTIFY_SIZE)
    ids = [n for n in range(1, count + 1) if n > after][: IDENTIFY_SIZE // 4]
    struct.pack_into(f"<{len(ids)}I", page, 0, *ids)
    return bytes(page)


def smart_log(data_units_read: int, data_units_written: int, reads: int, writes: int) -> bytes:
    """SMART / Health Information log (spec figure 207): healthy, 40 C, counters."""
    page = bytearray(SMART_LOG_SIZE)
    struct.pack_into("<BHBBB", page, 0, 0, KELVIN_40C, 100, 10, 0)
    for offset, value in ((32, data_units_read), (48, data_units_written), (64, reads),
                          (80, writes)):
        page[offset:offset + 16] = (value & ((1 << 128) - 1)).to_bytes(16, "little")
    return bytes(page)


def firmware_log(firmware: str) -> bytes:
    """Firmware Slot Information log: slot 1 active with ``firmware``."""
    page = bytearray(FIRMWARE_LOG_SIZE)
    page[0] = 1
    page[8:16] = _ascii(firmware, 8)
    return bytes(page)
