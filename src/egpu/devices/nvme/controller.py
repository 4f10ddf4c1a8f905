"""The NVMe controller core: registers, queues, admin and NVM commands. No PCI, no sockets."""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from egpu.devices.nvme import spec
from egpu.devices.nvme.backing import NvmeBacking, pwritev_all
from egpu.devices.nvme.falloc import punch_hole
from egpu.devices.nvme.spec import AdminOpcode, Command, Feature, Identify, IoOpcode, LogPage
from egpu.devices.pinned import PinnedGuestMemory
from egpu.dma import DmaError, GuestMemory
from egpu.dma.fence import full_fence
from egpu.errors import UsageError

log = logging.getLogger("egpu.devices.nvme")

VENDOR_ID = 0x1234  # the QEMU/Bochs vendor id the display function uses too (PCI and Identify)
DEFAULT_IO_QUEUES = 4
MAX_IO_QUEUES = 64  # doorbells for 65 queue pairs fit below the MSI-X table
DEFAULT_MQES = 1023  # CAP.MQES, 0-based: 1024 entries per I/O queue
DEFAULT_MDTS = 8  # 2**8 pages = 1 MiB per command
CAP_TIMEOUT_500MS = 20  # CAP.TO: the driver waits up to 10 s for CSTS.RDY
AER_LIMIT = 4  # outstanding Asynchronous Event Requests (AERL + 1)
HOSTILE_LOG_LIMIT = 32  # warnings about guest misbehaviour before going quiet
DATA_UNIT = 512_000  # SMART data units are thousands of 512-byte blocks
ZERO_CHUNK = 1 << 20

_FEATURE_IDS = frozenset(int(f) for f in Feature)

DoorbellWrite = tuple[int, bool]
# A completion entry written in two stores, the phase tag's dword last (see _post).
CQE_HEAD = struct.Struct("<IIHH")
CQE_TAIL = struct.Struct("<HH")
CQE_TAIL_OFFSET = CQE_HEAD.size  # queue id, True for a completion-queue head


@dataclass(slots=True)
class SubmissionQueue:
    """One submission queue: guest memory at ``base`` holding ``size`` 64-byte entries."""

    qid: int
    base: int
    size: int
    cqid: int
    head: int = 0
    tail: int = 0
    shadow: int = 0  # guest address of its shadow tail doorbell (0: none configured)
    event_idx: int = 0  # guest address of its EventIdx slot


@dataclass(slots=True)
class CompletionQueue:
    """One completion queue: ``size`` 16-byte entries at ``base``, interrupting ``vector``."""

    qid: int
    base: int
    size: int
    vector: int
    irq_enabled: bool
    head: int = 0
    tail: int = 0
    phase: int = 1
    sqs: list[int] = field(default_factory=list)
    shadow: int = 0  # guest address of its shadow head doorbell (0: none configured)
    event_idx: int = 0


@dataclass(frozen=True)
class _PrpWalk:
    """The last single-page PRP list walked: its command's pointers and length, its bytes."""

    key: tuple[int, int, int]  # prp1, prp2, length
    listed: bytes
    segments: list[tuple[int, int]]


class NvmeController:
    """The controller core: registers, queues, admin and NVM commands. No PCI, no sockets.

    ``memory`` is the guest-memory table; ``raise_irq(vector)`` signals an MSI-X vector.
    Callers serialise calls (the server calls devices from one thread).
    """

    def __init__(
        self,
        memory: GuestMemory,
        raise_irq: Callable[[int], None],
        backing: NvmeBacking,
        *,
        max_io_queues: int = DEFAULT_IO_QUEUES,
        mqes: int = DEFAULT_MQES,
        mdts: int = DEFAULT_MDTS,
        serial: str = "EGPU0001",
        model: str = "egpu virtual eGPU DMA engine",
        shadow_doorbells: bool = True,
    ) -> None:
        if not 1 <= max_io_queues <= MAX_IO_QUEUES:
            raise UsageError(f"NVMe queue count {max_io_queues} outside 1..{MAX_IO_QUEUES}")
        self.memory = memory
        self.pinned = PinnedGuestMemory(memory)
        self.raise_irq = raise_irq
        self.backing = backing
        self.max_io_queues = max_io_queues
        self.irq_vectors = max_io_queues + 1
        self.mqes = mqes
        self.max_transfer = spec.PAGE_SIZE << mdts
        self.shadow_doorbells = shadow_doorbells
        self.identity = spec.ControllerIdentity(
            vendor_id=VENDOR_ID, serial=serial, model=model, firmware="1.0", mdts=mdts,
            max_io_queues=max_io_queues, aerl=AER_LIMIT - 1,
            oncs=spec.ONCS_DSM | spec.ONCS_WRITE_ZEROES, volatile_write_cache=True,
            subnqn=f"nqn.2026-11.io.egpu:nvme:{serial}",
            oacs=spec.OACS_DOORBELL_BUFFER_CONFIG if shadow_doorbells else 0,
        )
        self.nguid = uuid.uuid5(uuid.NAMESPACE_URL, f"egpu:nvme:{serial}").bytes
        self.cap = (
            mqes
            | spec.CAP_CQR
            | CAP_TIMEOUT_500MS << spec.CAP_TO_SHIFT
            | spec.CAP_CSS_NVM
        )
        self._identify_ctrl = spec.identify_controller(self.identity)
        self._identify_ns = spec.identify_namespace(backing.blocks, backing.lba_shift, self.nguid)
        self._sqe = bytearray(spec.SQE_SIZE)
        self._cqe = bytearray(spec.CQE_SIZE)
        self._prp_list = bytearray(spec.PAGE_SIZE)
        self._last_walk: _PrpWalk | None = None
        self._hostile_count = 0
        self.bus_master = True  # the PCI function clears it while Bus Master Enable is off
        self.power_on_reset()

    # -- state --------------------------------------------------------------------------------

    def power_on_reset(self) -> None:
        """Registers and features back to power-on values (PCI reset)."""
        self.cc = 0
        self.aqa = 0
        self.asq = 0
        self.acq = 0
        self.features: dict[int, int] = {
            Feature.TEMPERATURE_THRESHOLD: spec.KELVIN_WARNING,
            Feature.VOLATILE_WRITE_CACHE: 1,
            Feature.NUMBER_OF_QUEUES: self._queue_count_value(self.max_io_queues),
        }
        self.counters = [0, 0, 0, 0]  # bytes read, bytes written, read and write commands
        self.controller_reset()

    def controller_reset(self) -> None:
        """CC.EN 1 -> 0: drop every queue and outstanding request (spec 7.3.2)."""
        self.csts = 0
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.pending_aers: list[int] = []
        self.io_queues_granted = self.max_io_queues
        self.shadow_pages: tuple[int, int] | None = None  # Doorbell Buffer Config: dbs, eis

    @staticmethod
    def _queue_count_value(n: int) -> int:
        return (n - 1) | (n - 1) << 16

    def _hostile(self, message: str) -> None:
        # A guest can repeat a bad access forever: log the first ones loudly, the rest quietly.
        self._hostile_count += 1
        level = logging.WARNING if self._hostile_count <= HOSTILE_LOG_LIMIT else logging.DEBUG
        log.log(level, "nvme: %s", message)

    def _fatal(self, message: str) -> None:
        log.warning("nvme: controller fatal status: %s", message)
        self.csts |= spec.CSTS_CFS

    @property
    def ready(self) -> bool:
        """CSTS.RDY set and not fatal: queues are live."""
        return self.csts & (spec.CSTS_RDY | spec.CSTS_CFS) == spec.CSTS_RDY

    # -- BAR0 ---------------------------------------------------------------------------------

    def _register_image(self) -> bytes:
        return struct.pack("<QIIIIIIIIQQII", self.cap, spec.NVME_VERSION_1_4, 0, 0, self.cc, 0,
                           self.csts, 0, self.aqa, self.asq, self.acq, 0, 0)

    def bar0_read(self, offset: int, count: int) -> bytes:
        """Read registers; doorbells, reserved space and the MSI-X area read as zero."""
        image = self._register_image()
        out = image[offset:offset + count] if offset < len(image) else b""
        return out.ljust(count, b"\0")

    def bar0_write(self, offset: int, data: bytes) -> None:
        """Apply a register or doorbell write (dword or qword, naturally aligned)."""
        size = len(data)
        if size not in (4, 8) or offset % size:
            self._hostile(f"ignored {size}-byte write at BAR0+{offset:#x}: not a dword/qword")
            return
        for i in range(0, size, 4):
            value = int.from_bytes(data[i:i + 4], "little")
            pos = offset + i
            if pos >= spec.DOORBELL_BASE:
                self.doorbell(pos, value)
            else:
                self._register_write(pos, value)

    def _register_write(self, offset: int, value: int) -> None:
        if offset == spec.REG_CC:
            self._write_cc(value)
        elif offset == spec.REG_AQA:
            self.aqa = value & (spec.AQA_SIZE_MASK | spec.AQA_SIZE_MASK << spec.AQA_ACQS_SHIFT)
        elif offset in (spec.REG_ASQ, spec.REG_ASQ + 4, spec.REG_ACQ, spec.REG_ACQ + 4):
            base = spec.REG_ASQ if offset < spec.REG_ACQ else spec.REG_ACQ
            shift = 32 * (offset - base) // 4
            old = self.asq if base == spec.REG_ASQ else self.acq
            new = (old & ~(0xFFFFFFFF << shift)) | value << shift
            new &= ~spec.QUEUE_BASE_RESERVED
            if base == spec.REG_ASQ:
                self.asq = new
            else:
                self.acq = new
        elif offset in (spec.REG_INTMS, spec.REG_INTMC, spec.REG_NSSR):
            pass  # MSI-X only (INTMS/INTMC are for pin and MSI); no subsystem reset offered
        else:
            self._hostile(f"ignored write of {value:#x} to read-only register {offset:#x}")

    def _write_cc(self, value: int) -> None:
        was_enabled = self.cc & spec.CC_EN
        self.cc = value & 0x00FFFFF1  # EN, CSS, MPS, AMS, SHN, IOSQES, IOCQES
        if self.cc & (spec.CC_SHN_MASK << spec.CC_SHN_SHIFT):
            # Normal or abrupt shutdown: make written data durable, then report it complete.
            with contextlib.suppress(OSError):
                os.fsync(self.backing.fd)
            self.csts |= spec.CSTS_SHST_COMPLETE
        if was_enabled and not self.cc & spec.CC_EN:
            self.controller_reset()
        elif not was_enabled and self.cc & spec.CC_EN:
            self._enable()

    def _enable(self) -> None:
        css = self.cc >> spec.CC_CSS_SHIFT & spec.CC_CSS_MASK
        mps = self.cc >> spec.CC_MPS_SHIFT & spec.CC_MPS_MASK
        asqs = (self.aqa & spec.AQA_SIZE_MASK) + 1
        acqs = (self.aqa >> spec.AQA_ACQS_SHIFT & spec.AQA_SIZE_MASK) + 1
        self.csts &= ~spec.CSTS_SHST_COMPLETE
        if css != 0 or mps != 0 or asqs < 2 or acqs < 2:
            self._fatal(f"enable with CSS {css}, MPS {mps}, admin queues {asqs}/{acqs}")
            return
        self.cqs[0] = CompletionQueue(0, self.acq, acqs, vector=0, irq_enabled=True, sqs=[0])
        self.sqs[0] = SubmissionQueue(0, self.asq, asqs, cqid=0)
        self.csts |= spec.CSTS_RDY

    # -- doorbells and queue processing -------------------------------------------------------

    def decode_doorbell(self, offset: int) -> DoorbellWrite | None:
        """Queue id and kind of the doorbell at BAR0 ``offset`` (stride 4 bytes, CAP.DSTRD 0)."""
        index = (offset - spec.DOORBELL_BASE) >> 2
        qid = index >> 1
        if index < 0 or qid > self.max_io_queues:
            return None
        return qid, bool(index & 1)

    def doorbell(self, offset: int, value: int) -> None:
        """A doorbell write: run the submission queue, or free completion-queue slots."""
        decoded = self.decode_doorbell(offset)
        if decoded is None:
            self._hostile(f"ignored doorbell write at BAR0+{offset:#x}: no such queue")
            return
        if not self.ready:
            return  # the spec leaves doorbells of a disabled controller undefined: drop them
        qid, is_cq = decoded
        if is_cq:
            cq = self.cqs.get(qid)
            if cq is None or value >= cq.size:
                self._hostile(f"ignored CQ {qid} head doorbell {value}: no such queue or slot")
                return
            was_full = (cq.tail + 1) % cq.size == cq.head
            cq.head = value
            if was_full:
                for sqid in list(cq.sqs):
                    sq = self.sqs.get(sqid)
                    if sq is not None:
                        self.process(sq)
            return
        sq = self.sqs.get(qid)
        if sq is None or value >= sq.size:
            self._hostile(f"ignored SQ {qid} tail doorbell {value}: no such queue or slot")
            return
        sq.tail = value
        self.process(sq)

    def process(self, sq: SubmissionQueue) -> None:
        """Run every entry between head and tail (the doorbell's whole batch).

        With shadow doorbells the tail comes from guest memory too, and after each batch the
        EventIdx tells the host which tail was seen; entries the host wrote before it could see
        that EventIdx did not ring, so the shadow tail is read again after a full barrier.
        """
        cq = self.cqs[sq.cqid]
        if sq.shadow and self.bus_master:
            self._shadow_tail(sq)
        while True:
            posted = self._run(sq, cq)
            live = self.cqs.get(cq.qid) is cq
            if posted and cq.irq_enabled and live:
                self.raise_irq(cq.vector)
            if not (sq.shadow and live and self.sqs.get(sq.qid) is sq and self.ready
                    and self.bus_master):
                return
            self._shadow_store(sq.event_idx, sq.tail)
            if cq.shadow and (cq.tail + 1) % cq.size != cq.head:
                # Never ask for a head doorbell while there is room: the host cannot move its
                # head past the tail, so an EventIdx at the tail never fires (need_event).
                self._shadow_store(cq.event_idx, cq.tail)
            full_fence()
            seen = sq.tail
            if not self._shadow_tail(sq) or sq.tail == seen:
                return

    def _run(self, sq: SubmissionQueue, cq: CompletionQueue) -> bool:
        """Run entries from head to tail until done or stalled; True when one was posted."""
        posted = False
        entry = self._sqe
        admin = sq.qid == 0
        while sq.head != sq.tail and self.ready and self.bus_master:
            if (cq.tail + 1) % cq.size == cq.head and not self._cq_room(cq):
                break  # completion queue full: resumes when the host frees a slot
            address = sq.base + sq.head * spec.SQE_SIZE
            window: memoryview | bytearray | None = self.pinned.window(address, spec.SQE_SIZE,
                                                                       False)
            if window is None:
                try:
                    self.memory.readinto(address, entry)
                except DmaError as e:
                    self._fatal(f"SQ {sq.qid} entry unreachable: {e}")
                    break
                window = entry
            # One unpack copies the entry: the guest changing it meanwhile cannot make us see
            # two different values of a field (no double fetch).
            cmd = Command._make(spec.SQE.unpack_from(window))
            sq.head = sq.head + 1 if sq.head + 1 < sq.size else 0
            result = self._admin(cmd) if admin else self._io(cmd)
            if result is None:
                continue  # an Asynchronous Event Request: completes when an event happens
            st, dw0 = result
            if not self._post(cq, sq, cmd.cid, st, dw0):
                break
            posted = True
            if sq.qid not in self.sqs:
                break  # the command deleted its own queue (hostile, but possible)
        return posted

    # -- shadow doorbells -------------------------------------------------------------------

    def _shadow_load(self, address: int) -> int | None:
        """A shadow doorbell value from guest memory (None when unreachable)."""
        window = self.pinned.window(address, spec.SHADOW_SLOT.size, False)
        try:
            raw = (window if window is not None
                   else self.memory.read(address, spec.SHADOW_SLOT.size))
        except DmaError as e:
            self._hostile(f"shadow doorbell at {address:#x} unreachable: {e}")
            return None
        value: int = spec.SHADOW_SLOT.unpack_from(raw)[0]
        return value

    def _shadow_store(self, address: int, value: int) -> None:
        window = self.pinned.window(address, spec.SHADOW_SLOT.size, True)
        if window is not None:
            spec.SHADOW_SLOT.pack_into(window, 0, value)
            return
        try:
            self.memory.write(address, spec.SHADOW_SLOT.pack(value))
        except DmaError as e:
            self._hostile(f"EventIdx at {address:#x} unreachable: {e}")

    def _shadow_tail(self, sq: SubmissionQueue) -> bool:
        """Take the SQ tail from its shadow doorbell; an out-of-range value is ignored."""
        value = self._shadow_index(sq, "SQ", "tail")
        if value is None:
            return False
        sq.tail = value
        return True

    def _shadow_index(self, queue: SubmissionQueue | CompletionQueue, kind: str,
                      pointer: str) -> int | None:
        """A queue's shadow doorbell as a slot index; None when unreadable or out of range.

        Called per doorbell: the message is formatted only for a bad value.
        """
        value = self._shadow_load(queue.shadow)
        if value is None:
            return None
        if value >= queue.size:
            self._hostile(f"ignored {kind} {queue.qid} shadow {pointer} {value}: no such slot")
            return None
        return value

    def _cq_room(self, cq: CompletionQueue) -> bool:
        """Whether a full-looking CQ has room after reading the host's shadow head.

        The EventIdx is set to the head first, so a host that frees a slot after our read
        rings the MMIO doorbell, which resumes the queue.
        """
        if not cq.shadow:
            return False
        self._shadow_store(cq.event_idx, cq.head)
        full_fence()
        value = self._shadow_index(cq, "CQ", "head")
        if value is None:
            return False
        cq.head = value
        return (cq.tail + 1) % cq.size != cq.head

    def _attach_shadow(self, queue: SubmissionQueue | CompletionQueue, is_cq: bool) -> None:
        """Point an I/O queue at its slots of the configured shadow and EventIdx pages."""
        if self.shadow_pages is None or queue.qid == 0:
            return  # the admin queues keep MMIO doorbells (as Linux and QEMU's nvme do)
        dbs, eis = self.shadow_pages
        offset = queue.qid * spec.SHADOW_QUEUE_STRIDE + (spec.SHADOW_CQ_OFFSET if is_cq else 0)
        queue.shadow, queue.event_idx = dbs + offset, eis + offset
        self._shadow_store(queue.event_idx, queue.tail)

    def _post(self, cq: CompletionQueue, sq: SubmissionQueue, cid: int, st: int, dw0: int
              ) -> bool:
        address = cq.base + cq.tail * spec.CQE_SIZE
        window = self.pinned.window(address, spec.CQE_SIZE, True)
        if window is not None:
            # The dword holding the phase tag goes last: the host polls it to see a new entry.
            CQE_HEAD.pack_into(window, 0, dw0 & 0xFFFFFFFF, 0, sq.head, sq.qid)
            CQE_TAIL.pack_into(window, CQE_TAIL_OFFSET, cid, st << 1 | cq.phase)
        else:
            spec.CQE.pack_into(self._cqe, 0, dw0 & 0xFFFFFFFF, 0, sq.head, sq.qid, cid,
                               st << 1 | cq.phase)
            try:
                self.memory.write(address, self._cqe)
            except DmaError as e:
                self._fatal(f"CQ {cq.qid} entry unreachable: {e}")
                return False
        cq.tail += 1
        if cq.tail == cq.size:
            cq.tail = 0
            cq.phase ^= 1
        return True

    # -- admin commands -----------------------------------------------------------------------

    def _admin(self, cmd: Command) -> tuple[int, int] | None:
        if cmd.flags & spec.SQE_FUSE_PSDT_MASK:
            return spec.INVALID_FIELD, 0  # fused commands and SGLs are not offered
        op = cmd.opcode
        if op == AdminOpcode.ASYNC_EVENT_REQUEST:
            if len(self.pending_aers) >= AER_LIMIT:
                return spec.AER_LIMIT_EXCEEDED, 0
            self.pending_aers.append(cmd.cid)
            return None
        handler = self._admin_handlers.get(op)
        if handler is None:
            return spec.INVALID_OPCODE, 0
        return handler(self, cmd)

    def _admin_identify(self, cmd: Command) -> tuple[int, int]:
        cns = cmd.cdw10 & 0xFF
        csi = cmd.cdw11 >> 24 & 0xFF
        if cns == Identify.CONTROLLER:
            page = self._identify_ctrl
        elif cns == Identify.NAMESPACE:
            if cmd.nsid == spec.NSID_BROADCAST:
                page = spec.identify_namespace(0, self.backing.lba_shift, bytes(spec.NGUID_SIZE))
            elif cmd.nsid != 1:
                return spec.INVALID_NAMESPACE, 0
            else:
                page = self._identify_ns
        elif cns == Identify.ACTIVE_NAMESPACES:
            if cmd.nsid >= spec.NSID_BROADCAST - 1:
                return spec.INVALID_NAMESPACE, 0
            page = spec.active_namespaces(cmd.nsid, self.identity.namespaces)
        elif cns == Identify.NS_DESCRIPTORS:
            if cmd.nsid != 1:
                return spec.INVALID_NAMESPACE, 0
            page = spec.namespace_descriptors(self.nguid)
        elif cns in (Identify.CS_CONTROLLER, Identify.CS_NAMESPACE) and csi == spec.CSI_NVM:
            if cns == Identify.CS_NAMESPACE and cmd.nsid != 1:
                return spec.INVALID_NAMESPACE, 0
            page = bytes(spec.IDENTIFY_SIZE)  # every NVM-specific field optional: none set
        else:
            return spec.INVALID_FIELD, 0
        return self._to_host(cmd, page), 0

    def _to_host(self, cmd: Command, data: bytes) -> int:
        """DMA ``data`` to the command's PRPs; returns a status."""
        segments = self.prp_segments(cmd.prp1, cmd.prp2, len(data))
        if isinstance(segments, int):
            return segments
        pos = 0
        try:
            for addr, n in segments:
                self.memory.write(addr, data[pos:pos + n])
                pos += n
        except DmaError as e:
            self._hostile(f"admin data transfer failed: {e}")
            return spec.DATA_TRANSFER_ERROR
        return spec.SUCCESS

    def _admin_get_log_page(self, cmd: Command) -> tuple[int, int]:
        lid = cmd.cdw10 & 0xFF
        dwords = ((cmd.cdw10 >> 16) | (cmd.cdw11 & 0xFFFF) << 16) + 1
        offset = cmd.cdw12 | cmd.cdw13 << 32
        if lid == LogPage.ERROR_INFORMATION:
            page = bytes(spec.ERROR_LOG_ENTRY_SIZE * self.identity.error_log_entries)
        elif lid == LogPage.SMART_HEALTH:
            rd, wr, nr, nw = self.counters
            page = spec.smart_log(-(-rd // DATA_UNIT), -(-wr // DATA_UNIT), nr, nw)
        elif lid == LogPage.FIRMWARE_SLOT:
            page = spec.firmware_log(self.identity.firmware)
        else:
            return spec.INVALID_LOG_PAGE, 0
        length = dwords * 4
        if offset % 4 or offset >= len(page) or length > self.max_transfer:
            return spec.INVALID_FIELD, 0
        # Reading past the end of a log returns zeros (spec 5.14: "undefined"; zeros are safe).
        return self._to_host(cmd, page[offset:offset + length].ljust(length, b"\0")), 0

    def _admin_set_features(self, cmd: Command) -> tuple[int, int]:
        fid = cmd.cdw10 & 0xFF
        if cmd.cdw10 & 1 << 31:
            return spec.FEATURE_NOT_SAVEABLE, 0
        value = cmd.cdw11
        if fid == Feature.NUMBER_OF_QUEUES:
            nsqr, ncqr = value & 0xFFFF, value >> 16
            if nsqr == 0xFFFF or ncqr == 0xFFFF:
                return spec.INVALID_FIELD, 0
            if len(self.sqs) > 1 or len(self.cqs) > 1:
                return spec.COMMAND_SEQUENCE_ERROR, 0  # only before I/O queues exist
            granted = min(max(nsqr, ncqr) + 1, self.max_io_queues)
            self.io_queues_granted = granted
            self.features[fid] = self._queue_count_value(granted)
            return spec.SUCCESS, self.features[fid]
        if fid == Feature.POWER_MANAGEMENT and value & 0x1F:
            return spec.INVALID_FIELD, 0  # one power state
        if fid == Feature.INTERRUPT_VECTOR_CONFIG and value & 0xFFFF >= self.irq_vectors:
            return spec.INVALID_FIELD, 0
        if fid == Feature.VOLATILE_WRITE_CACHE:
            value &= 1
        if fid not in (Feature.ARBITRATION, Feature.POWER_MANAGEMENT,
                       Feature.TEMPERATURE_THRESHOLD, Feature.ERROR_RECOVERY,
                       Feature.VOLATILE_WRITE_CACHE, Feature.INTERRUPT_COALESCING,
                       Feature.INTERRUPT_VECTOR_CONFIG, Feature.WRITE_ATOMICITY,
                       Feature.ASYNC_EVENT_CONFIG):
            return spec.INVALID_FIELD, 0
        self.features[fid] = value
        return spec.SUCCESS, 0

    def _admin_get_features(self, cmd: Command) -> tuple[int, int]:
        fid = cmd.cdw10 & 0xFF
        select = cmd.cdw10 >> 8 & 0x7
        if fid not in _FEATURE_IDS:
            return spec.INVALID_FIELD, 0
        if select == 3:
            return spec.SUCCESS, 0  # supported capabilities: not saveable, not per-namespace
        if fid == Feature.INTERRUPT_VECTOR_CONFIG:
            return spec.SUCCESS, cmd.cdw11 & 0xFFFF
        return spec.SUCCESS, self.features.get(fid, 0)

    def _admin_create_cq(self, cmd: Command) -> tuple[int, int]:
        qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        contiguous, ien, vector = cmd.cdw11 & 1, bool(cmd.cdw11 & 2), cmd.cdw11 >> 16
        if not 1 <= qid <= self.io_queues_granted or qid in self.cqs:
            return spec.INVALID_QUEUE_ID, 0
        if not 2 <= size <= self.mqes + 1:
            return spec.INVALID_QUEUE_SIZE, 0
        if vector >= self.irq_vectors:
            return spec.INVALID_INTERRUPT_VECTOR, 0
        if not contiguous or cmd.prp1 & spec.PAGE_MASK:
            return spec.INVALID_FIELD, 0
        if not self._reachable(cmd.prp1, size * spec.CQE_SIZE):
            return spec.INVALID_FIELD, 0
        self.cqs[qid] = CompletionQueue(qid, cmd.prp1, size, vector, ien)
        self._attach_shadow(self.cqs[qid], True)
        return spec.SUCCESS, 0

    def _admin_create_sq(self, cmd: Command) -> tuple[int, int]:
        qid, size = cmd.cdw10 & 0xFFFF, (cmd.cdw10 >> 16) + 1
        contiguous, cqid = cmd.cdw11 & 1, cmd.cdw11 >> 16
        if not 1 <= qid <= self.io_queues_granted or qid in self.sqs:
            return spec.INVALID_QUEUE_ID, 0
        if not 2 <= size <= self.mqes + 1:
            return spec.INVALID_QUEUE_SIZE, 0
        cq = self.cqs.get(cqid)
        if cqid == 0 or cq is None:
            return spec.CQ_INVALID, 0
        if not contiguous or cmd.prp1 & spec.PAGE_MASK:
            return spec.INVALID_FIELD, 0
        if not self._reachable(cmd.prp1, size * spec.SQE_SIZE):
            return spec.INVALID_FIELD, 0
        self.sqs[qid] = SubmissionQueue(qid, cmd.prp1, size, cqid)
        cq.sqs.append(qid)
        self._attach_shadow(self.sqs[qid], False)
        return spec.SUCCESS, 0

    def _reachable(self, address: int, size: int) -> bool:
        # A queue must lie in mapped guest memory when created; later unmaps are caught per
        # access. Probing first and last entries checks both ends without copying the queue.
        try:
            self.memory.read(address, 1)
            self.memory.read(address + size - 1, 1)
        except DmaError:
            self._hostile(f"queue at {address:#x}+{size:#x} is not in mapped guest memory")
            return False
        return True

    def _admin_delete_sq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        sq = self.sqs.get(qid)
        if qid == 0 or sq is None:
            return spec.INVALID_QUEUE_ID, 0
        del self.sqs[qid]
        cq = self.cqs.get(sq.cqid)
        if cq is not None and qid in cq.sqs:
            cq.sqs.remove(qid)
        return spec.SUCCESS, 0

    def _admin_delete_cq(self, cmd: Command) -> tuple[int, int]:
        qid = cmd.cdw10 & 0xFFFF
        cq = self.cqs.get(qid)
        if qid == 0 or cq is None:
            return spec.INVALID_QUEUE_ID, 0
        if cq.sqs:
            return spec.INVALID_QUEUE_DELETION, 0
        del self.cqs[qid]
        return spec.SUCCESS, 0

    def _admin_abort(self, cmd: Command) -> tuple[int, int]:
        # Commands complete synchronously, so there is never one left to abort: DW0 bit 0 set
        # means "not aborted" (spec 5.1).
        return spec.SUCCESS, 1

    def _admin_keep_alive(self, cmd: Command) -> tuple[int, int]:
        return spec.SUCCESS, 0

    def _admin_doorbell_buffer_config(self, cmd: Command) -> tuple[int, int]:
        """Shadow doorbell page (PRP1, host-written) and EventIdx page (PRP2, ours) (spec 5.8)."""
        if not self.shadow_doorbells:
            return spec.INVALID_OPCODE, 0
        dbs, eis = cmd.prp1, cmd.prp2
        if not dbs or not eis or (dbs | eis) & spec.PAGE_MASK:
            return spec.INVALID_FIELD, 0
        try:
            # Both whole pages must be guest memory we may use now: the host's page readable,
            # ours writable (written back unchanged); later unmaps are caught per access.
            self.memory.read(dbs, spec.PAGE_SIZE)
            self.memory.write(eis, self.memory.read(eis, spec.PAGE_SIZE))
        except DmaError as e:
            self._hostile(f"doorbell buffers at {dbs:#x}/{eis:#x} unusable: {e}")
            return spec.INVALID_FIELD, 0
        self.shadow_pages = (dbs, eis)
        log.info("nvme: shadow doorbells at %#x, EventIdx at %#x", dbs, eis)
        for cq in self.cqs.values():
            self._attach_shadow(cq, True)
        for sq in self.sqs.values():
            self._attach_shadow(sq, False)
        return spec.SUCCESS, 0

    _admin_handlers: ClassVar[dict[int, Callable[[NvmeController, Command], tuple[int, int]]]] = {
        AdminOpcode.IDENTIFY: _admin_identify,
        AdminOpcode.GET_LOG_PAGE: _admin_get_log_page,
        AdminOpcode.SET_FEATURES: _admin_set_features,
        AdminOpcode.GET_FEATURES: _admin_get_features,
        AdminOpcode.CREATE_IO_CQ: _admin_create_cq,
        AdminOpcode.CREATE_IO_SQ: _admin_create_sq,
        AdminOpcode.DELETE_IO_SQ: _admin_delete_sq,
        AdminOpcode.DELETE_IO_CQ: _admin_delete_cq,
        AdminOpcode.ABORT: _admin_abort,
        AdminOpcode.KEEP_ALIVE: _admin_keep_alive,
        AdminOpcode.DOORBELL_BUFFER_CONFIG: _admin_doorbell_buffer_config,
    }

    # -- data pointers ------------------------------------------------------------------------

    def prp_segments(self, prp1: int, prp2: int, length: int) -> list[tuple[int, int]] | int:
        """Guest address ranges of a ``length``-byte transfer (spec 4.3), coalesced.

        Returns a status instead when a pointer is misaligned or a PRP list is unreachable.
        ``length`` is at most the controller's maximum transfer, which bounds the list walk.
        The list may be shared with the next call: callers only read it.
        """
        if prp1 & 0x3:
            return spec.INVALID_PRP_OFFSET
        first = spec.PAGE_SIZE - (prp1 & spec.PAGE_MASK)
        if length <= first:
            return [(prp1, length)]
        segments = [(prp1, first)]
        remaining = length - first
        if remaining <= spec.PAGE_SIZE:
            if prp2 & spec.PAGE_MASK:
                return spec.INVALID_PRP_OFFSET
            self._append(segments, prp2, remaining)
            return segments
        if prp2 & 0x7:
            return spec.INVALID_PRP_OFFSET
        needed = (remaining + spec.PAGE_MASK) >> spec.PAGE_SHIFT
        list_addr = prp2
        buf = self._prp_list
        listed: bytes | None = None
        while needed:
            room = (spec.PAGE_SIZE - (list_addr & spec.PAGE_MASK)) >> 3
            chained = needed > room
            take = room - 1 if chained else needed
            count = take + 1 if chained else take
            source: memoryview | bytearray | None = self.pinned.window(list_addr, count * 8, False)
            if source is None:
                try:
                    self.memory.readinto(list_addr, memoryview(buf)[:count * 8])
                except DmaError as e:
                    self._hostile(f"PRP list at {list_addr:#x} unreachable: {e}")
                    return spec.DATA_TRANSFER_ERROR
                source = buf
            if not chained and list_addr == prp2:
                # The whole list is this one page. Drivers reuse list pages and programs reuse
                # buffers, so the same list often comes back: compare it with the last walk
                # (one memcmp) instead of checking every entry again.
                listed = bytes(source[:count * 8])
                last = self._last_walk
                if last is not None and last.key == (prp1, prp2, length) and last.listed == listed:
                    return last.segments
            entries = struct.unpack_from(f"<{count}Q", source)
            for entry in entries[:take]:
                if entry & spec.PAGE_MASK:
                    return spec.INVALID_PRP_OFFSET
                n = remaining if remaining < spec.PAGE_SIZE else spec.PAGE_SIZE
                last_addr, last_n = segments[-1]
                if last_addr + last_n == entry:  # physically contiguous: one segment
                    segments[-1] = (last_addr, last_n + n)
                else:
                    segments.append((entry, n))
                remaining -= n
            needed -= take
            if chained:
                list_addr = entries[take]
                if list_addr & spec.PAGE_MASK:
                    return spec.INVALID_PRP_OFFSET  # the next list is a whole page
        if listed is not None:
            self._last_walk = _PrpWalk((prp1, prp2, length), listed, segments)
        return segments

    @staticmethod
    def _append(segments: list[tuple[int, int]], address: int, n: int) -> None:
        last_addr, last_n = segments[-1]
        if last_addr + last_n == address:
            segments[-1] = (last_addr, last_n + n)
        else:
            segments.append((address, n))

    # -- NVM commands ---------------------------------------------------------------------------

    def _io(self, cmd: Command) -> tuple[int, int]:
        if cmd.flags & spec.SQE_FUSE_PSDT_MASK:
            return spec.INVALID_FIELD, 0
        op = cmd.opcode
        if op == IoOpcode.FLUSH:
            if cmd.nsid not in (1, spec.NSID_BROADCAST):
                return spec.INVALID_NAMESPACE, 0
            try:
                os.fdatasync(self.backing.fd)
            except OSError as e:
                log.warning("nvme: flush of %s failed: %s", self.backing.path, e)
                return spec.INTERNAL_ERROR, 0
            return spec.SUCCESS, 0
        if op == IoOpcode.DATASET_MANAGEMENT:
            return (self._deallocate(cmd) if cmd.nsid == 1 else spec.INVALID_NAMESPACE), 0
        if op not in (IoOpcode.READ, IoOpcode.WRITE, IoOpcode.WRITE_ZEROES):
            return spec.INVALID_OPCODE, 0
        if cmd.nsid != 1:
            return spec.INVALID_NAMESPACE, 0
        slba = cmd.cdw10 | cmd.cdw11 << 32
        nlb = (cmd.cdw12 & 0xFFFF) + 1
        if slba + nlb > self.backing.blocks:
            return spec.LBA_OUT_OF_RANGE, 0
        shift = self.backing.lba_shift
        offset, length = slba << shift, nlb << shift
        if op == IoOpcode.WRITE_ZEROES:
            return self._write_zeroes(offset, length), 0
        if length > self.max_transfer:
            return spec.INVALID_FIELD, 0
        segments = self.prp_segments(cmd.prp1, cmd.prp2, length)
        if isinstance(segments, int):
            return segments, 0
        if op == IoOpcode.READ:
            st = self._read(segments, offset, length)
            self.counters[0] += length
            self.counters[2] += 1
        else:
            st = self._write(segments, offset)
            self.counters[1] += length
            self.counters[3] += 1
            if st == spec.SUCCESS and cmd.cdw12 & spec.RW_FUA:
                # Force Unit Access: durable before completion, past the volatile cache.
                try:
                    os.fdatasync(self.backing.fd)
                except OSError as e:
                    log.warning("nvme: FUA sync of %s failed: %s", self.backing.path, e)
                    return spec.INTERNAL_ERROR, 0
        return st, 0

    def _read(self, segments: list[tuple[int, int]], offset: int, length: int) -> int:
        fd = self.backing.fd
        try:
            views = self.pinned.windows(segments, True)
            if views is not None:
                # One system call for the whole scatter list (<= MDTS pages, below IOV_MAX).
                got = os.preadv(fd, views, offset)
                if got < length:  # the file shrank under us: the rest reads as zeros
                    for v in views:
                        if got < len(v):
                            v[max(got, 0):] = bytes(len(v) - max(got, 0))
                        got -= len(v)
                return spec.SUCCESS
            for addr, n in segments:
                try:
                    with self.memory.view(addr, n, writable=True) as v:
                        got = os.preadv(fd, [v], offset)
                        if got < n:
                            v[got:] = bytes(n - got)
                except DmaError:
                    # Not one fd-backed mapping (remote memory, or split across maps): copy.
                    self.memory.write(addr, os.pread(fd, n, offset).ljust(n, b"\0"))
                offset += n
        except DmaError as e:
            self._hostile(f"read DMA failed: {e}")
            return spec.DATA_TRANSFER_ERROR
        except OSError as e:
            log.warning("nvme: read of %s failed: %s", self.backing.path, e)
            return spec.INTERNAL_ERROR
        return spec.SUCCESS

    def _write(self, segments: list[tuple[int, int]], offset: int) -> int:
        fd = self.backing.fd
        try:
            views = self.pinned.windows(segments, False)
            if views is not None:
                pwritev_all(fd, views, offset)
                return spec.SUCCESS
            for addr, n in segments:
                try:
                    with self.memory.view(addr, n) as v:
                        pwritev_all(fd, [v], offset)
                except DmaError:
                    pwritev_all(fd, [memoryview(self.memory.read(addr, n))], offset)
                offset += n
        except DmaError as e:
            self._hostile(f"write DMA failed: {e}")
            return spec.DATA_TRANSFER_ERROR
        except OSError as e:
            log.warning("nvme: write to %s failed: %s", self.backing.path, e)
            return spec.INTERNAL_ERROR
        return spec.SUCCESS

    def _deallocate(self, cmd: Command) -> int:
        """Dataset Management: punch the deallocated ranges out of the backing file.

        Deallocation is advisory and the namespace reports no deallocated-read behaviour
        (DLFEAT 0), so a range that cannot be punched simply keeps its data.
        """
        if not cmd.cdw11 & spec.DSM_DEALLOCATE:
            return spec.SUCCESS  # only attributes (access hints): nothing to do
        count = (cmd.cdw10 & 0xFF) + 1
        size = count * spec.DSM_RANGE.size
        segments = self.prp_segments(cmd.prp1, cmd.prp2, size)
        if isinstance(segments, int):
            return segments
        ranges = bytearray()
        try:
            for addr, n in segments:
                ranges += self.memory.read(addr, n)
        except DmaError as e:
            self._hostile(f"DSM range list unreachable: {e}")
            return spec.DATA_TRANSFER_ERROR
        shift = self.backing.lba_shift
        decoded = [spec.DSM_RANGE.unpack_from(ranges, i * spec.DSM_RANGE.size)
                   for i in range(count)]
        # Check every range before touching any: a bad one fails the command as a whole.
        if any(slba + nlb > self.backing.blocks for _attr, nlb, slba in decoded):
            return spec.LBA_OUT_OF_RANGE
        for _attr, nlb, slba in decoded:
            if nlb:
                punch_hole(self.backing.fd, slba << shift, nlb << shift)
        return spec.SUCCESS

    def _write_zeroes(self, offset: int, length: int) -> int:
        if punch_hole(self.backing.fd, offset, length):
            return spec.SUCCESS  # the range reads as zeros and the file stays sparse
        zeros = memoryview(bytes(min(length, ZERO_CHUNK)))
        try:
            while length:
                n = min(length, len(zeros))
                pwritev_all(self.backing.fd, [zeros[:n]], offset)
                offset += n
                length -= n
        except OSError as e:
            log.warning("nvme: write zeroes to %s failed: %s", self.backing.path, e)
            return spec.INTERNAL_ERROR
        return spec.SUCCESS

