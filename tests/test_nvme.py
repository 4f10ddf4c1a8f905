"""The NVMe controller core driven the way Linux's nvme driver drives it, plus hostile input.

Guest RAM is a real memfd mapped into a real :class:`GuestMemory` (the server's table); the test
plays the guest driver by writing queue entries into that memory and ringing doorbells.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egpu.devices import create_device
from egpu.devices.base import IrqIndex, RegionIndex
from egpu.devices.nvme import spec
from egpu.devices.nvme.backing import NvmeBacking, pwritev_all
from egpu.devices.nvme.controller import NvmeController
from egpu.devices.nvme.function import BAR0_SIZE, CLASS_NVME, NvmeFunction, create
from egpu.devices.nvme.spec import AdminOpcode, IoOpcode, make_command
from egpu.dma import DmaProt, GuestMemory
from egpu.errors import UsageError
from egpu.pci import CapabilityId

RAM_BASE = 0x4000_0000
RAM_SIZE = 4 << 20
ROM_BASE = 0x8000_0000  # a read-only mapping: the device may read it, never write it
ROM_SIZE = 64 << 10
PAGE = spec.PAGE_SIZE
ASQ, ACQ = RAM_BASE, RAM_BASE + PAGE
IOSQ, IOCQ = RAM_BASE + 2 * PAGE, RAM_BASE + 4 * PAGE
DATA = RAM_BASE + (1 << 20)  # data buffers from here
LISTS = RAM_BASE + (3 << 20)  # PRP lists from here
QUEUE_DEPTH = 32
REMOTE_BASE = 0x9000_0000  # memory without an fd: reached through the client
REMOTE_SIZE = 64 << 10


class Guest:
    """A minimal NVMe host driver over real guest memory."""

    def __init__(self, tmp_path: Path, blocks: int = 4096) -> None:
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, RAM_SIZE)
        self.ram = mmap.mmap(self.fd, RAM_SIZE)
        rom_fd = os.memfd_create("guest-rom")
        os.ftruncate(rom_fd, ROM_SIZE)
        self.memory = GuestMemory()
        self.memory.add(RAM_BASE, RAM_SIZE, DmaProt.READ | DmaProt.WRITE, self.fd)
        self.memory.add(ROM_BASE, ROM_SIZE, DmaProt.READ, rom_fd)
        os.close(rom_fd)
        self.remote = bytearray(REMOTE_SIZE)  # guest memory reached by DMA_READ/WRITE messages
        self.memory.remote = self
        self.memory.add(REMOTE_BASE, REMOTE_SIZE, DmaProt.READ | DmaProt.WRITE)
        self.irqs: list[int] = []
        self.backing = NvmeBacking(tmp_path / "disk.img", blocks * 512)
        self.ctrl = NvmeController(self.memory, self.irqs.append, self.backing, max_io_queues=4)
        self.tails: dict[int, int] = {}
        self.heads: dict[int, int] = {}
        self.phases: dict[int, int] = {}
        self.sizes: dict[int, tuple[int, int, int, int]] = {}  # qid -> sq base, size, cq base, size

    def close(self) -> None:
        # The server's order: the device drops its pins (dma_unmapped), then the table unmaps.
        self.ctrl.pinned.unpin_all()
        self.memory.clear()
        self.ram.close()
        os.close(self.fd)
        self.backing.close()

    # -- memory -----------------------------------------------------------------------------

    def dma_read(self, address: int, count: int) -> bytes:
        off = address - REMOTE_BASE
        return bytes(self.remote[off:off + count])

    def dma_write(self, address: int, data: bytes) -> None:
        off = address - REMOTE_BASE
        self.remote[off:off + len(data)] = data

    def poke(self, addr: int, data: bytes) -> None:
        off = addr - RAM_BASE
        self.ram[off:off + len(data)] = data

    def peek(self, addr: int, n: int) -> bytes:
        off = addr - RAM_BASE
        return bytes(self.ram[off:off + n])

    # -- registers ----------------------------------------------------------------------------

    def reg32(self, offset: int) -> int:
        return int.from_bytes(self.ctrl.bar0_read(offset, 4), "little")

    def write32(self, offset: int, value: int) -> None:
        self.ctrl.bar0_write(offset, value.to_bytes(4, "little"))

    def write64(self, offset: int, value: int) -> None:
        self.ctrl.bar0_write(offset, value.to_bytes(8, "little"))

    def enable(self, depth: int = QUEUE_DEPTH) -> None:
        self.poke(ASQ, bytes(6 * PAGE))  # a driver hands the controller zeroed queues
        self.write32(spec.REG_AQA, (depth - 1) | (depth - 1) << 16)
        self.write64(spec.REG_ASQ, ASQ)
        self.write64(spec.REG_ACQ, ACQ)
        self.write32(spec.REG_CC, spec.CC_EN | 6 << 16 | 4 << 20)
        self.sizes[0] = (ASQ, depth, ACQ, depth)
        self.tails[0], self.heads[0], self.phases[0] = 0, 0, 1

    # -- queues ---------------------------------------------------------------------------------

    def submit(self, qid: int, *cmds: spec.Command, ring: bool = True) -> None:
        sq_base, sq_size, _, _ = self.sizes[qid]
        for cmd in cmds:
            self.poke(sq_base + self.tails[qid] * 64, cmd.pack())
            self.tails[qid] = (self.tails[qid] + 1) % sq_size
        if ring:
            self.write32(spec.DOORBELL_BASE + 8 * qid, self.tails[qid])

    def reap(self, qid: int, ring: bool = True) -> list[tuple[int, int, int]]:
        """(cid, status, dw0) of every new completion; rings the CQ head doorbell."""
        _, _, cq_base, cq_size = self.sizes[qid]
        out = []
        while True:
            dw0, _, _sqhd, _sqid, cid, sf = spec.CQE.unpack(
                self.peek(cq_base + self.heads[qid] * 16, 16))
            if sf & 1 != self.phases[qid]:
                break
            out.append((cid, sf >> 1, dw0))
            self.heads[qid] += 1
            if self.heads[qid] == cq_size:
                self.heads[qid], self.phases[qid] = 0, self.phases[qid] ^ 1
        if ring and out:
            self.write32(spec.DOORBELL_BASE + 8 * qid + 4, self.heads[qid])
        return out

    def admin(self, cmd: spec.Command) -> tuple[int, int]:
        self.submit(0, cmd)
        done = self.reap(0)
        assert len(done) == 1 and done[0][0] == cmd.cid
        return done[0][1], done[0][2]

    def setup_io(self, depth: int = QUEUE_DEPTH) -> None:
        self.enable()
        assert self.admin(make_command(AdminOpcode.SET_FEATURES, 1,
                                       cdw10=spec.Feature.NUMBER_OF_QUEUES,
                                       cdw11=0x0003_0003))[0] == spec.SUCCESS
        assert self.admin(make_command(AdminOpcode.CREATE_IO_CQ, 2, prp1=IOCQ,
                                       cdw10=(depth - 1) << 16 | 1, cdw11=1 << 16 | 3)) == (0, 0)
        assert self.admin(make_command(AdminOpcode.CREATE_IO_SQ, 3, prp1=IOSQ,
                                       cdw10=(depth - 1) << 16 | 1, cdw11=1 << 16 | 1)) == (0, 0)
        self.sizes[1] = (IOSQ, depth, IOCQ, depth)
        self.tails[1], self.heads[1], self.phases[1] = 0, 0, 1

    def io(self, cmd: spec.Command) -> int:
        self.submit(1, cmd)
        done = self.reap(1)
        assert len(done) == 1 and done[0][0] == cmd.cid
        return done[0][1]


@pytest.fixture
def guest(tmp_path: Path) -> Iterator[Guest]:
    g = Guest(tmp_path)
    yield g
    g.close()


def prp_list(entries: list[int], at: int, guest: Guest) -> int:
    guest.poke(at, struct.pack(f"<{len(entries)}Q", *entries))
    return at


# -- registers ------------------------------------------------------------------------------------


def test_capabilities_and_version(guest: Guest) -> None:
    cap = int.from_bytes(guest.ctrl.bar0_read(spec.REG_CAP, 8), "little")
    assert cap & 0xFFFF == 1023
    assert cap & spec.CAP_CQR and cap & spec.CAP_CSS_NVM
    assert (cap >> spec.CAP_DSTRD_SHIFT) & 0xF == 0
    assert (cap >> spec.CAP_MPSMIN_SHIFT) & 0xF == 0
    assert guest.reg32(spec.REG_VS) == 0x00010400
    assert guest.reg32(spec.REG_CMBSZ) == 0
    assert guest.ctrl.bar0_read(0x1000, 4) == bytes(4)  # doorbells read as zero


def test_enable_disable_and_shutdown(guest: Guest) -> None:
    assert guest.reg32(spec.REG_CSTS) == 0
    guest.enable()
    assert guest.reg32(spec.REG_CSTS) == spec.CSTS_RDY
    assert int.from_bytes(guest.ctrl.bar0_read(spec.REG_ASQ, 8), "little") == ASQ
    guest.write32(spec.REG_CC, guest.reg32(spec.REG_CC) | 1 << 14)  # normal shutdown
    assert guest.reg32(spec.REG_CSTS) & 0xC == spec.CSTS_SHST_COMPLETE
    guest.write32(spec.REG_CC, 0)
    assert guest.reg32(spec.REG_CSTS) & spec.CSTS_RDY == 0
    assert guest.ctrl.sqs == {} and guest.ctrl.cqs == {}


def test_enable_with_unsupported_page_size_is_fatal(guest: Guest) -> None:
    guest.write32(spec.REG_AQA, 0x001F001F)
    guest.write32(spec.REG_CC, spec.CC_EN | 1 << 7)  # MPS = 8 KiB, not offered
    assert guest.reg32(spec.REG_CSTS) & spec.CSTS_CFS
    guest.write32(spec.REG_CC, 0)  # a reset clears it
    assert guest.reg32(spec.REG_CSTS) == 0


def test_admin_queue_of_one_entry_is_fatal(guest: Guest) -> None:
    guest.write32(spec.REG_AQA, 0)
    guest.write32(spec.REG_CC, spec.CC_EN)
    assert guest.reg32(spec.REG_CSTS) & spec.CSTS_CFS


def test_sub_dword_and_misaligned_register_writes_are_ignored(guest: Guest) -> None:
    guest.ctrl.bar0_write(spec.REG_CC, b"\x01")
    guest.ctrl.bar0_write(spec.REG_CC + 2, b"\x01\x00\x00\x00")
    assert guest.reg32(spec.REG_CC) == 0
    guest.write32(spec.REG_CAP, 0)  # read-only
    assert guest.reg32(spec.REG_CAP) & 0xFFFF == 1023


def test_queue_base_low_bits_are_masked(guest: Guest) -> None:
    guest.write64(spec.REG_ASQ, ASQ | 0xFFF)
    assert int.from_bytes(guest.ctrl.bar0_read(spec.REG_ASQ, 8), "little") == ASQ


# -- admin commands -------------------------------------------------------------------------------


def test_identify_controller_has_what_linux_reads(guest: Guest) -> None:
    guest.enable()
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 7, prp1=DATA, cdw10=1))
    assert st_ == spec.SUCCESS
    page = guest.peek(DATA, 4096)
    assert struct.unpack_from("<I", page, 80)[0] == 0x00010400
    assert page[77] == 8  # MDTS: 1 MiB
    assert page[512] == 0x66 and page[513] == 0x44
    assert struct.unpack_from("<I", page, 516)[0] == 1  # one namespace
    assert page[768:775] == b"nqn.202"
    assert guest.irqs == [0]


def test_identify_across_a_page_boundary_uses_prp2(guest: Guest) -> None:
    guest.enable()
    prp1 = DATA + 0x800
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 1, prp1=prp1, prp2=DATA + 0x10000,
                                      cdw10=1))
    assert st_ == spec.SUCCESS
    whole = guest.peek(prp1, 0x800) + guest.peek(DATA + 0x10000, 0x800)
    assert whole == guest.ctrl._identify_ctrl


def test_identify_namespace_and_lists(guest: Guest) -> None:
    guest.enable()
    assert guest.admin(make_command(AdminOpcode.IDENTIFY, 1, nsid=1, prp1=DATA, cdw10=0))[0] == 0
    nsze, ncap, _ = struct.unpack_from("<QQQ", guest.peek(DATA, 24))
    assert nsze == ncap == 4096
    assert guest.peek(DATA + 128, 4)[2] == 9  # 512-byte LBAs
    assert guest.admin(make_command(AdminOpcode.IDENTIFY, 2, nsid=0, prp1=DATA, cdw10=2))[0] == 0
    assert struct.unpack_from("<II", guest.peek(DATA, 8)) == (1, 0)
    assert guest.admin(make_command(AdminOpcode.IDENTIFY, 3, nsid=1, prp1=DATA, cdw10=3))[0] == 0
    assert guest.peek(DATA, 2) == bytes([spec.NS_DESCRIPTOR_NGUID, 16])
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 4, nsid=2, prp1=DATA, cdw10=0))
    assert st_ == spec.INVALID_NAMESPACE
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 5, prp1=DATA, cdw10=0x55))
    assert st_ == spec.INVALID_FIELD


def test_identify_into_read_only_memory_is_a_transfer_error(guest: Guest) -> None:
    guest.enable()
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 1, prp1=ROM_BASE, cdw10=1))
    assert st_ == spec.DATA_TRANSFER_ERROR
    st_, _ = guest.admin(make_command(AdminOpcode.IDENTIFY, 2, prp1=0x10, cdw10=1))
    assert st_ == spec.DATA_TRANSFER_ERROR


def test_features_logs_abort_aer_and_unknown_opcode(guest: Guest) -> None:
    guest.enable()
    st_, dw0 = guest.admin(make_command(AdminOpcode.SET_FEATURES, 1,
                                        cdw10=spec.Feature.NUMBER_OF_QUEUES, cdw11=0x00FF_00FF))
    assert (st_, dw0) == (spec.SUCCESS, 0x0003_0003)  # asked 256, granted 4
    st_, dw0 = guest.admin(make_command(AdminOpcode.GET_FEATURES, 2,
                                        cdw10=spec.Feature.TEMPERATURE_THRESHOLD))
    assert (st_, dw0) == (spec.SUCCESS, spec.KELVIN_WARNING)
    st_, _ = guest.admin(make_command(AdminOpcode.SET_FEATURES, 3, cdw10=0x7E))
    assert st_ == spec.INVALID_FIELD
    st_, _ = guest.admin(make_command(AdminOpcode.SET_FEATURES, 4, cdw10=1 << 31 | 4))
    assert spec.status_code(st_) == spec.status_code(spec.FEATURE_NOT_SAVEABLE)
    # SMART log, 512 bytes: temperature 313 K
    st_, _ = guest.admin(make_command(AdminOpcode.GET_LOG_PAGE, 5, prp1=DATA,
                                      cdw10=(512 // 4 - 1) << 16 | spec.LogPage.SMART_HEALTH))
    assert st_ == spec.SUCCESS
    assert struct.unpack_from("<H", guest.peek(DATA + 1, 2))[0] == spec.KELVIN_40C
    st_, _ = guest.admin(make_command(AdminOpcode.GET_LOG_PAGE, 6, prp1=DATA, cdw10=0x7F))
    assert st_ == spec.INVALID_LOG_PAGE
    assert guest.admin(make_command(AdminOpcode.ABORT, 7, cdw10=1 << 16 | 3)) == (0, 1)
    assert guest.admin(make_command(AdminOpcode.KEEP_ALIVE, 8)) == (0, 0)
    assert guest.admin(make_command(0x7F, 9))[0] == spec.INVALID_OPCODE
    # AERs stay outstanding (no events) up to the limit, then the limit is reported.
    guest.submit(0, *(make_command(AdminOpcode.ASYNC_EVENT_REQUEST, 100 + i) for i in range(4)))
    assert guest.reap(0) == []
    st_, _ = guest.admin(make_command(AdminOpcode.ASYNC_EVENT_REQUEST, 10))
    assert st_ == spec.AER_LIMIT_EXCEEDED


def test_queue_creation_checks(guest: Guest) -> None:
    guest.setup_io()
    cases = [
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=31 << 16 | 1, cdw11=1),
         spec.INVALID_QUEUE_ID),  # exists
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=31 << 16 | 5, cdw11=1),
         spec.INVALID_QUEUE_ID),  # beyond the 4 granted
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=0 << 16 | 2, cdw11=1),
         spec.INVALID_QUEUE_SIZE),  # one entry
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=1024 << 16 | 2, cdw11=1),
         spec.INVALID_QUEUE_SIZE),  # beyond MQES
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=31 << 16 | 2,
                      cdw11=5 << 16 | 3), spec.INVALID_INTERRUPT_VECTOR),
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ, cdw10=31 << 16 | 2, cdw11=0),
         spec.INVALID_FIELD),  # not physically contiguous
        (make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=0x1000, cdw10=31 << 16 | 2, cdw11=1),
         spec.INVALID_FIELD),  # unmapped
        (make_command(AdminOpcode.CREATE_IO_SQ, 1, prp1=IOSQ, cdw10=31 << 16 | 2,
                      cdw11=3 << 16 | 1), spec.CQ_INVALID),
        (make_command(AdminOpcode.CREATE_IO_SQ, 1, prp1=IOSQ, cdw10=31 << 16 | 2,
                      cdw11=0 << 16 | 1), spec.CQ_INVALID),  # the admin CQ
        (make_command(AdminOpcode.DELETE_IO_CQ, 1, cdw10=1), spec.INVALID_QUEUE_DELETION),
        (make_command(AdminOpcode.DELETE_IO_SQ, 1, cdw10=0), spec.INVALID_QUEUE_ID),
        (make_command(AdminOpcode.DELETE_IO_SQ, 1, cdw10=3), spec.INVALID_QUEUE_ID),
        (make_command(AdminOpcode.SET_FEATURES, 1, cdw10=spec.Feature.NUMBER_OF_QUEUES,
                      cdw11=0), spec.COMMAND_SEQUENCE_ERROR),
    ]
    for cmd, expected in cases:
        assert spec.status_code(guest.admin(cmd)[0]) == spec.status_code(expected), cmd
    assert guest.admin(make_command(AdminOpcode.DELETE_IO_SQ, 1, cdw10=1)) == (0, 0)
    assert guest.admin(make_command(AdminOpcode.DELETE_IO_CQ, 1, cdw10=1)) == (0, 0)
    assert set(guest.ctrl.sqs) == {0} and set(guest.ctrl.cqs) == {0}


# -- I/O ------------------------------------------------------------------------------------------


def rw(op: int, cid: int, slba: int, blocks: int, prp1: int, prp2: int = 0) -> spec.Command:
    return make_command(op, cid, nsid=1, prp1=prp1, prp2=prp2, cdw10=slba & 0xFFFFFFFF,
                        cdw11=slba >> 32, cdw12=blocks - 1)


def test_write_then_read_through_a_chained_prp_list(guest: Guest) -> None:
    guest.setup_io()
    nbytes = 600 * 1024  # 150 pages after an offset first page: needs PRP list entries
    payload = os.urandom(nbytes)
    prp1 = DATA + 0x200
    first = PAGE - 0x200
    pages = [DATA + 0x40000 + i * 2 * PAGE for i in range((nbytes - first + PAGE - 1) // PAGE)]
    # Put the list near the end of a page so it must chain to a second list page.
    list1 = LISTS + PAGE - 8 * 10
    list2 = LISTS + 4 * PAGE
    prp_list([*pages[:9], list2], list1, guest)
    prp_list(pages[9:], list2, guest)
    guest.poke(prp1, payload[:first])
    for i, page in enumerate(pages):
        guest.poke(page, payload[first + i * PAGE:first + (i + 1) * PAGE])
    assert guest.io(rw(IoOpcode.WRITE, 1, 8, nbytes // 512, prp1, list1)) == spec.SUCCESS
    with open(guest.backing.path, "rb") as f:
        f.seek(8 * 512)
        assert f.read(nbytes) == payload
    # Read back into a different, contiguous buffer described by a one-page PRP list.
    dest = DATA + 0x100000
    entries = [dest + PAGE * (i + 1) for i in range(nbytes // PAGE - 1 + 1)][: (nbytes - PAGE +
                                                                               PAGE - 1) // PAGE]
    prp_list(entries, LISTS + 8 * PAGE, guest)
    assert guest.io(rw(IoOpcode.READ, 2, 8, nbytes // 512, dest, LISTS + 8 * PAGE)) == 0
    assert guest.peek(dest, nbytes) == payload
    assert guest.ctrl.counters[0] == guest.ctrl.counters[1] == nbytes


def test_a_reused_prp_list_page_is_read_again_for_every_command(guest: Guest) -> None:
    # Drivers rewrite the same list page for each command; the controller may remember its last
    # walk, but only while the page's bytes are unchanged.
    guest.setup_io()
    pages = 64
    payload = os.urandom(pages * PAGE)
    list_at = LISTS + 2 * PAGE
    first = [DATA + 0x40000 + i * 2 * PAGE for i in range(pages - 1)]
    prp_list(first, list_at, guest)
    guest.poke(DATA, payload[:PAGE])
    for i, page in enumerate(first):
        guest.poke(page, payload[(i + 1) * PAGE:(i + 2) * PAGE])
    blocks = pages * PAGE // 512
    assert guest.io(rw(IoOpcode.WRITE, 1, 0, blocks, DATA, list_at)) == spec.SUCCESS

    def gathered(buffers: list[int]) -> bytes:
        return guest.peek(DATA, PAGE) + b"".join(guest.peek(p, PAGE) for p in buffers)

    for page in [DATA, *first]:
        guest.poke(page, bytes(PAGE))
    assert guest.io(rw(IoOpcode.READ, 2, 0, blocks, DATA, list_at)) == spec.SUCCESS
    assert gathered(first) == payload
    # same pointers, new list contents: the data must land in the new pages
    second = [DATA + 0x100000 + i * 3 * PAGE for i in range(pages - 1)]
    prp_list(second, list_at, guest)
    assert guest.io(rw(IoOpcode.READ, 3, 0, blocks, DATA, list_at)) == spec.SUCCESS
    assert gathered(second) == payload
    # a misaligned entry written into the same page is caught, never served from memory
    prp_list([*second[:10], second[10] + 8, *second[11:]], list_at, guest)
    assert guest.io(rw(IoOpcode.READ, 4, 0, blocks, DATA, list_at)) == spec.INVALID_PRP_OFFSET


def test_two_page_transfer_uses_prp2_directly(guest: Guest) -> None:
    guest.setup_io()
    payload = os.urandom(8192)
    guest.poke(DATA, payload[:4096])
    guest.poke(DATA + 5 * PAGE, payload[4096:])
    assert guest.io(rw(IoOpcode.WRITE, 1, 0, 16, DATA, DATA + 5 * PAGE)) == 0
    assert guest.io(rw(IoOpcode.READ, 2, 0, 16, DATA + 9 * PAGE, DATA + 12 * PAGE)) == 0
    assert guest.peek(DATA + 9 * PAGE, 4096) + guest.peek(DATA + 12 * PAGE, 4096) == payload


def test_io_errors(guest: Guest) -> None:
    guest.setup_io()
    assert guest.io(rw(IoOpcode.READ, 1, 4095, 2, DATA)) == spec.LBA_OUT_OF_RANGE
    assert guest.io(rw(IoOpcode.READ, 2, (1 << 64) - 1, 1, DATA)) == spec.LBA_OUT_OF_RANGE
    assert guest.io(rw(IoOpcode.READ, 3, 0, 16, DATA, DATA + 5)) == spec.INVALID_PRP_OFFSET
    assert guest.io(rw(IoOpcode.READ, 4, 0, 1, DATA + 2)) == spec.INVALID_PRP_OFFSET
    assert guest.io(rw(IoOpcode.READ, 5, 0, 1, ROM_BASE)) == spec.DATA_TRANSFER_ERROR
    assert guest.io(rw(IoOpcode.WRITE, 6, 0, 1, ROM_BASE)) == spec.SUCCESS  # reading ROM is fine
    assert guest.io(rw(IoOpcode.READ, 7, 0, 1, 0x1000)) == spec.DATA_TRANSFER_ERROR
    assert guest.io(rw(IoOpcode.READ, 8, 0, 64, DATA, 0x2000)) == spec.DATA_TRANSFER_ERROR
    prp_list([DATA + 0x123] * 16, LISTS, guest)
    assert guest.io(rw(IoOpcode.READ, 9, 0, 64, DATA, LISTS)) == spec.INVALID_PRP_OFFSET
    assert guest.io(rw(IoOpcode.READ, 10, 0, 4096, DATA, LISTS)) == spec.INVALID_FIELD  # > MDTS
    bad_ns = make_command(IoOpcode.READ, 11, nsid=2, prp1=DATA)
    assert guest.io(bad_ns) == spec.INVALID_NAMESPACE
    assert guest.io(make_command(0x7E, 12, nsid=1)) == spec.INVALID_OPCODE
    assert guest.io(make_command(IoOpcode.READ, 13, nsid=1, prp1=DATA, flags=0x40)) == \
        spec.INVALID_FIELD  # SGL requested
    assert guest.io(make_command(IoOpcode.FLUSH, 14, nsid=1)) == spec.SUCCESS
    assert guest.io(make_command(IoOpcode.DATASET_MANAGEMENT, 15, nsid=1)) == spec.SUCCESS


def test_deallocate_punches_holes_after_checking_every_range(guest: Guest) -> None:
    guest.setup_io()
    guest.poke(DATA, os.urandom(4096))
    for lba in (0, 8, 16):
        assert guest.io(rw(IoOpcode.WRITE, lba, lba, 8, DATA)) == 0
    blocks = os.stat(guest.backing.path).st_blocks
    ranges = spec.DSM_RANGE.pack(0, 8, 0) + spec.DSM_RANGE.pack(0, 8, 4095)  # 2nd is too far
    guest.poke(LISTS, ranges)
    dsm = make_command(IoOpcode.DATASET_MANAGEMENT, 1, nsid=1, prp1=LISTS, cdw10=1,
                       cdw11=spec.DSM_DEALLOCATE)
    assert guest.io(dsm) == spec.LBA_OUT_OF_RANGE
    assert os.stat(guest.backing.path).st_blocks == blocks  # nothing punched
    guest.poke(LISTS, spec.DSM_RANGE.pack(0, 8, 0) + spec.DSM_RANGE.pack(0, 8, 16))
    assert guest.io(dsm) == spec.SUCCESS
    with open(guest.backing.path, "rb") as f:
        data = f.read(24 * 512)
    assert data[:4096] == bytes(4096) and data[8192:] == bytes(4096)
    assert data[4096:8192] != bytes(4096)
    dsm_bad_list = make_command(IoOpcode.DATASET_MANAGEMENT, 2, nsid=1, prp1=0x1000,
                                cdw10=255, cdw11=spec.DSM_DEALLOCATE)
    assert guest.io(dsm_bad_list) == spec.DATA_TRANSFER_ERROR


def test_data_in_memory_without_fd_and_across_mappings(guest: Guest) -> None:
    guest.setup_io()
    payload = os.urandom(4096)
    guest.remote[0x1000:0x2000] = payload
    assert guest.io(rw(IoOpcode.WRITE, 1, 0, 8, REMOTE_BASE + 0x1000)) == spec.SUCCESS
    assert guest.io(rw(IoOpcode.READ, 2, 0, 8, REMOTE_BASE + 0x3000)) == spec.SUCCESS
    assert bytes(guest.remote[0x3000:0x4000]) == payload
    # Pages in two different mappings (one shared, one remote) in one command.
    assert guest.io(rw(IoOpcode.READ, 3, 0, 8, RAM_BASE + RAM_SIZE - 0x800,
                       REMOTE_BASE)) == spec.SUCCESS
    assert guest.peek(RAM_BASE + RAM_SIZE - 0x800, 0x800) + bytes(guest.remote[:0x800]) == \
        payload


def test_unmapping_a_range_drops_the_pin_first(guest: Guest) -> None:
    guest.setup_io()
    rom = next(r for r in guest.memory.ranges() if r.iova == ROM_BASE)
    guest.ctrl.pinned.unpin(rom)
    guest.memory.remove(ROM_BASE, ROM_SIZE)  # would wait forever if a pin were left
    assert guest.io(rw(IoOpcode.WRITE, 1, 0, 1, ROM_BASE)) == spec.DATA_TRANSFER_ERROR
    assert guest.io(rw(IoOpcode.READ, 2, 0, 1, DATA)) == spec.SUCCESS


def test_write_zeroes(guest: Guest) -> None:
    guest.setup_io()
    guest.poke(DATA, b"\xAA" * 4096)
    assert guest.io(rw(IoOpcode.WRITE, 1, 0, 8, DATA)) == 0
    assert guest.io(make_command(IoOpcode.WRITE_ZEROES, 2, nsid=1, cdw10=2, cdw12=3)) == 0
    with open(guest.backing.path, "rb") as f:
        data = f.read(4096)
    assert data == b"\xAA" * 1024 + bytes(2048) + b"\xAA" * 1024
    # A large range is deallocated, not written: the backing file stays sparse.
    assert guest.io(make_command(IoOpcode.WRITE_ZEROES, 3, nsid=1, cdw10=0, cdw12=4095)) == 0
    assert os.stat(guest.backing.path).st_blocks == 0
    assert guest.io(rw(IoOpcode.READ, 4, 0, 8, DATA)) == 0
    assert guest.peek(DATA, 4096) == bytes(4096)


def test_completion_queue_full_pauses_until_head_moves(guest: Guest) -> None:
    guest.setup_io(depth=4)  # 3 usable completion slots
    flushes = [make_command(IoOpcode.FLUSH, 50 + i, nsid=1) for i in range(3)]
    guest.submit(1, *flushes)
    assert guest.ctrl.sqs[1].head == 3
    guest.submit(1, make_command(IoOpcode.FLUSH, 60, nsid=1))  # fills; 1 more would overflow
    done = guest.reap(1, ring=False)
    assert [c[0] for c in done] == [50, 51, 52]
    assert guest.ctrl.sqs[1].head == 3  # the fourth waits for a free completion slot
    guest.write32(spec.DOORBELL_BASE + 12, guest.heads[1])
    assert [c[0] for c in guest.reap(1)] == [60]


def test_batched_doorbell_raises_one_interrupt_per_queue(guest: Guest) -> None:
    guest.setup_io()
    guest.irqs.clear()
    guest.submit(1, *(make_command(IoOpcode.FLUSH, i, nsid=1) for i in range(10)))
    assert len(guest.reap(1)) == 10
    assert guest.irqs == [1]


def test_hostile_doorbells_are_ignored(guest: Guest) -> None:
    guest.write32(spec.DOORBELL_BASE, 5)  # before enable
    guest.setup_io()
    sq_tail, cq_head = guest.ctrl.sqs[0].tail, guest.ctrl.cqs[0].head
    for offset, value in [(0x1000, 32), (0x1000, 0xFFFFFFFF), (0x1004, 99), (0x1010, 1),
                          (0x1000 + 8 * 64, 1), (0x1FFC, 7)]:
        guest.write32(offset, value)
    assert guest.ctrl.sqs[0].tail == sq_tail and guest.ctrl.cqs[0].head == cq_head
    assert guest.reg32(spec.REG_CSTS) == spec.CSTS_RDY


def test_submission_queue_in_memory_that_goes_away_is_fatal(guest: Guest) -> None:
    guest.setup_io()
    guest.ctrl.sqs[1].base = 0x10  # as if the guest's RAM vanished under the queue
    guest.submit(1, make_command(IoOpcode.FLUSH, 1, nsid=1))
    assert guest.reg32(spec.REG_CSTS) & spec.CSTS_CFS
    guest.write32(spec.REG_CC, 0)
    guest.setup_io()
    assert guest.io(make_command(IoOpcode.FLUSH, 2, nsid=1)) == 0


def test_no_dma_without_bus_master(guest: Guest) -> None:
    guest.setup_io()
    guest.ctrl.bus_master = False
    guest.submit(1, make_command(IoOpcode.FLUSH, 1, nsid=1))
    assert guest.reap(1) == []
    guest.ctrl.bus_master = True
    guest.submit(1)
    assert len(guest.reap(1)) == 1


# -- shadow doorbells (Doorbell Buffer Config) ---------------------------------------------------

DBS, EIS = RAM_BASE + 8 * PAGE, RAM_BASE + 9 * PAGE  # the host's shadow page, the EventIdx page


class ShadowHost:
    """Linux's dbbuf use (drivers/nvme/host/pci.c): write the shadow, ring MMIO on need_event."""

    def __init__(self, guest: Guest) -> None:
        self.guest = guest
        self.rings: dict[str, int] = {"sq": 0, "cq": 0}

    def configure(self) -> int:
        self.guest.poke(DBS, bytes(2 * PAGE))
        return self.guest.admin(make_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, 9, prp1=DBS,
                                             prp2=EIS))[0]

    def _update(self, offset: int, value: int, kind: str, doorbell: int) -> None:
        old = int.from_bytes(self.guest.peek(DBS + offset, 4), "little")
        self.guest.poke(DBS + offset, value.to_bytes(4, "little"))
        event_idx = int.from_bytes(self.guest.peek(EIS + offset, 4), "little")
        if spec.need_event(event_idx, value, old):
            self.rings[kind] += 1
            self.guest.write32(doorbell, value)

    def submit(self, qid: int, *cmds: spec.Command) -> None:
        self.guest.submit(qid, *cmds, ring=False)
        self._update(qid * 8, self.guest.tails[qid], "sq", spec.DOORBELL_BASE + 8 * qid)

    def reap(self, qid: int) -> list[tuple[int, int, int]]:
        done = self.guest.reap(qid, ring=False)
        if done:
            self._update(qid * 8 + 4, self.guest.heads[qid], "cq",
                         spec.DOORBELL_BASE + 8 * qid + 4)
        return done

    def io(self, cmd: spec.Command) -> int:
        self.submit(1, cmd)
        done = self.reap(1)
        assert len(done) == 1 and done[0][0] == cmd.cid
        return done[0][1]


def test_shadow_doorbells_spare_the_completion_doorbell(guest: Guest) -> None:
    guest.setup_io()
    assert guest.admin(make_command(AdminOpcode.IDENTIFY, 1, prp1=DATA, cdw10=1))[0] == 0
    oacs = struct.unpack_from("<H", guest.peek(DATA, 258), 256)[0]
    assert oacs & spec.OACS_DOORBELL_BUFFER_CONFIG
    host = ShadowHost(guest)
    assert host.configure() == spec.SUCCESS
    for i in range(40):  # QD1 past a wrap of the 32-entry queues, data checked every time
        data = bytes([i + 1]) * 4096
        guest.poke(DATA, data)
        assert host.io(rw(IoOpcode.WRITE, 2 * i, 8 * i, 8, DATA)) == 0
        guest.poke(DATA, bytes(4096))
        assert host.io(rw(IoOpcode.READ, 2 * i + 1, 8 * i, 8, DATA)) == 0
        assert guest.peek(DATA, 4096) == data
    # At QD1 the controller has caught up when the host submits, so every tail rings; the
    # completion head rings only when the host's head wraps past zero (2 wraps in 80 I/Os).
    assert host.rings == {"sq": 80, "cq": 2}
    guest.write32(spec.REG_CC, 0)
    assert guest.ctrl.shadow_pages is None  # a controller reset forgets the buffers


def test_entries_that_did_not_ring_are_found_in_the_shadow(guest: Guest) -> None:
    guest.setup_io()
    host = ShadowHost(guest)
    assert host.configure() == spec.SUCCESS
    # Three entries, the shadow tail at 3, but MMIO told only of the first (as when the host
    # wrote the rest while the controller was still working and saw no need to ring).
    guest.submit(1, *(make_command(IoOpcode.FLUSH, 70 + i, nsid=1) for i in range(3)),
                 ring=False)
    guest.poke(DBS + 8, (3).to_bytes(4, "little"))
    guest.write32(spec.DOORBELL_BASE + 8, 1)
    assert [c[0] for c in guest.reap(1, ring=False)] == [70, 71, 72]
    assert int.from_bytes(guest.peek(EIS + 8, 4), "little") == 3  # the tail it has seen


def test_full_completion_queue_asks_for_the_head_doorbell(guest: Guest) -> None:
    guest.setup_io(depth=4)
    host = ShadowHost(guest)
    assert host.configure() == spec.SUCCESS
    host.submit(1, *(make_command(IoOpcode.FLUSH, 50 + i, nsid=1) for i in range(3)))
    host.submit(1, make_command(IoOpcode.FLUSH, 53, nsid=1))  # the completion queue is full
    assert guest.ctrl.sqs[1].head == 3  # the fourth waits for a free completion slot
    assert [c[0] for c in host.reap(1)] == [50, 51, 52]
    assert host.rings["cq"] == 1  # the EventIdx asked for the head: the host rang
    assert [c[0] for c in host.reap(1)] == [53]


def test_doorbell_buffer_config_refusals(guest: Guest) -> None:
    guest.setup_io()
    bad = [(0, EIS), (DBS, 0), (DBS + 8, EIS), (DBS, EIS + 0x800),
           (0x10_0000_0000, EIS), (DBS, RAM_BASE + RAM_SIZE),  # not in mapped memory
           (RAM_BASE + RAM_SIZE - 8, EIS),  # a page that runs past the mapping
           (DBS, ROM_BASE)]  # our EventIdx page must be writable
    for dbs, eis in bad:
        st_, _ = guest.admin(make_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, 1, prp1=dbs,
                                          prp2=eis))
        assert st_ == spec.INVALID_FIELD, (hex(dbs), hex(eis))
        assert guest.ctrl.shadow_pages is None
    irqs: list[int] = []
    off = NvmeController(guest.memory, irqs.append, guest.backing, shadow_doorbells=False)
    try:
        assert off.identity.oacs == 0
        assert off._admin(make_command(AdminOpcode.DOORBELL_BUFFER_CONFIG, 1, prp1=DBS,
                                       prp2=EIS)) == (spec.INVALID_OPCODE, 0)
    finally:
        off.pinned.unpin_all()  # its pins would keep the guest's RAM from unmapping


def test_shadow_page_that_goes_away_falls_back_to_mmio(guest: Guest) -> None:
    guest.setup_io()
    assert ShadowHost(guest).configure() == spec.SUCCESS
    sq = guest.ctrl.sqs[1]
    sq.shadow = sq.event_idx = 0x10  # as if the guest's RAM vanished under the pages
    assert guest.io(make_command(IoOpcode.FLUSH, 1, nsid=1)) == 0  # the MMIO value serves


# -- property tests ------------------------------------------------------------------------------

ADDRESSES = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.integers(RAM_BASE - PAGE, RAM_BASE + RAM_SIZE + PAGE),
    st.integers(ROM_BASE, ROM_BASE + ROM_SIZE),
    st.sampled_from([0, DATA, LISTS, RAM_BASE + RAM_SIZE - 8, ROM_BASE]),
)
U32 = st.integers(0, 0xFFFFFFFF)
SMALL = st.one_of(st.integers(0, 70), st.integers(0, 0xFFFF) .map(lambda x: x << 16 | 1), U32)
COMMANDS = st.builds(
    make_command,
    st.sampled_from([*AdminOpcode, *IoOpcode]),
    st.integers(0, 0xFFFF),
    nsid=st.sampled_from([0, 1, 2, 0xFFFFFFFF]),
    prp1=ADDRESSES, prp2=ADDRESSES, cdw10=SMALL, cdw11=SMALL, cdw12=SMALL,
    cdw13=U32, flags=st.sampled_from([0, 0, 0, 1, 0x40]),
)

# Examples share the test's guest (or tmp_path) on purpose: each one writes what it then reads,
# and a fresh controller per example would cost more than the example itself.
reuses_fixture = settings(
    suppress_health_check=[*settings().suppress_health_check, HealthCheck.function_scoped_fixture]
)


@reuses_fixture
@given(prp1=ADDRESSES, prp2=ADDRESSES, length=st.integers(1, 1 << 20),
       list_words=st.lists(ADDRESSES, max_size=32))
def test_prp_walk_is_bounded_and_exact(guest: Guest, prp1: int, prp2: int, length: int,
                                       list_words: list[int]) -> None:
    if prp2 >= RAM_BASE and prp2 + 8 * len(list_words) <= RAM_BASE + RAM_SIZE:
        guest.poke(prp2, struct.pack(f"<{len(list_words)}Q", *list_words))
    result = guest.ctrl.prp_segments(prp1, prp2, length)
    if prp1 & 0x3:  # a misaligned first pointer is refused before anything is read
        assert result == spec.INVALID_PRP_OFFSET
    if isinstance(result, int):
        assert result in (spec.INVALID_PRP_OFFSET, spec.DATA_TRANSFER_ERROR)
    else:
        assert sum(n for _, n in result) == length
        assert all(n > 0 for _, n in result)


@reuses_fixture
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("reg"), st.integers(0, 0x1000 - 4).map(lambda x: x & ~3), U32),
    st.tuples(st.just("bell"), st.integers(0x1000, 0x1000 + 8 * 70), U32),
    st.tuples(st.just("cmd"), st.integers(0, 4), st.one_of(st.binary(min_size=64, max_size=64),
                                                          COMMANDS.map(lambda c: c.pack()))),
    st.tuples(st.just("good"), st.integers(0, 1), st.integers(0, 0xFF)),
), max_size=40))
def test_hostile_guest_never_crashes_the_controller(tmp_path: Path,
                                                    ops: list[tuple[str, int, object]]) -> None:
    guest = Guest(tmp_path)
    try:
        _run_hostile(guest, ops)
    finally:
        guest.close()


def _run_hostile(guest: Guest, ops: list[tuple[str, int, object]]) -> None:
    guest.setup_io()
    ctrl = guest.ctrl
    rom_before = bytes(guest.memory.read(ROM_BASE, ROM_SIZE))
    for kind, a, b in ops:
        if kind == "reg":
            assert isinstance(b, int)
            guest.write32(a, b)
        elif kind == "bell":
            assert isinstance(b, int)
            ctrl.bar0_write(a & ~3, (b & 0xFFFF).to_bytes(4, "little"))
        elif kind == "cmd":
            sq = ctrl.sqs.get(a)
            assert isinstance(b, bytes)
            if sq is not None:
                guest.poke(sq.base + sq.tail * 64, b)
                ctrl.bar0_write(spec.DOORBELL_BASE + 8 * a,
                                ((sq.tail + 1) % sq.size).to_bytes(4, "little"))
        else:
            assert isinstance(b, int)
            cq = ctrl.cqs.get(a)
            if cq is not None:
                ctrl.bar0_write(spec.DOORBELL_BASE + 8 * a + 4, (b % cq.size).to_bytes(4, "little"))
        for q in ctrl.sqs.values():
            assert 0 <= q.head < q.size and 0 <= q.tail < q.size and q.cqid in ctrl.cqs
        for c in ctrl.cqs.values():
            assert 0 <= c.head < c.size and 0 <= c.tail < c.size and c.vector < ctrl.irq_vectors
        assert all(v < ctrl.irq_vectors for v in guest.irqs)
    assert guest.memory.read(ROM_BASE, ROM_SIZE) == rom_before


@reuses_fixture
@given(ops=st.lists(st.tuples(st.sampled_from(["sq", "cq", "bell", "cmd", "reap"]),
                              st.integers(0, 4), U32), max_size=30))
def test_garbage_shadow_doorbells_never_crash_the_controller(
        tmp_path: Path, ops: list[tuple[str, int, int]]) -> None:
    guest = Guest(tmp_path)
    try:
        guest.setup_io(depth=8)
        host = ShadowHost(guest)
        assert host.configure() == spec.SUCCESS
        ctrl = guest.ctrl
        for kind, qid, value in ops:
            if kind in ("sq", "cq"):  # anything at all in the host's shadow slots
                guest.poke(DBS + 8 * qid + (4 if kind == "cq" else 0), value.to_bytes(4, "little"))
            elif kind == "bell":
                ctrl.bar0_write(spec.DOORBELL_BASE + 8 * qid,
                                (value & 0xFFFF).to_bytes(4, "little"))
            elif kind == "cmd" and qid in guest.tails:
                host.submit(qid, make_command(IoOpcode.FLUSH, value & 0xFFFF, nsid=1))
            elif kind == "reap" and qid in guest.tails:
                host.reap(qid)
            for q in ctrl.sqs.values():
                assert 0 <= q.head < q.size and 0 <= q.tail < q.size
            for c in ctrl.cqs.values():
                assert 0 <= c.head < c.size and 0 <= c.tail < c.size
            assert all(v < ctrl.irq_vectors for v in guest.irqs)
        assert guest.reg32(spec.REG_CSTS) & spec.CSTS_CFS == 0  # garbage is ignored, not fatal
    finally:
        guest.close()


# -- the PCI function -----------------------------------------------------------------------------


def test_function_description_and_config(tmp_path: Path) -> None:
    fn = create(backing=tmp_path / "d.img", size=64 << 20, queues=2)
    try:
        cfg = fn.config
        assert cfg.u16(0) == 0x1234
        assert cfg.u32(0x08) >> 8 == CLASS_NVME
        assert cfg.bars[0].size == BAR0_SIZE
        msix = cfg.msix
        assert msix is not None and msix.vectors == 3 and msix.table_bar == 0
        assert cfg.capability_offset(CapabilityId.PCI_EXPRESS) is not None
        desc = fn.describe()
        assert desc.irq_count(IrqIndex.MSIX) == 3 and desc.irq_count(IrqIndex.INTX) == 0
        region = desc.region(RegionIndex.BAR0)
        assert region is not None and region.size == BAR0_SIZE and not region.mappable
        assert os.path.getsize(tmp_path / "d.img") == 64 << 20
        assert os.stat(tmp_path / "d.img").st_blocks == 0  # sparse
    finally:
        fn.backing.close()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"queues": "0"}, "nvme option queues '0' is out of range (1 to 64)"),
        ({"queues": "many"}, "nvme option queues 'many' is not a whole number"),
        ({"colour": "red"}, "unknown nvme option(s): colour"),
        ({"size": "12Q"}, "bad nvme option size '12Q'"),
        ({"size": "100"}, "nvme option size '100' is out of range (at least 1M)"),
        ({"size": "512K"}, "nvme option size '512K' is out of range (at least 1M)"),  # issue 8
        ({"multifunction": "maybe"}, "nvme option multifunction 'maybe' is not a boolean"),
        ({"backing": ""}, "nvme option backing needs a path"),
    ],
)
def test_bad_options_are_refused_before_anything_is_made(
    tmp_path: Path, options: dict[str, str], words: str
) -> None:
    with pytest.raises(UsageError) as e:
        create_device("nvme", {"backing": str(tmp_path / "x"), **options})
    assert words in str(e.value)
    assert not (tmp_path / "x").exists()


def test_smallest_namespace_is_one_mib(tmp_path: Path) -> None:
    fn = create_device("nvme", {"backing": str(tmp_path / "x"), "size": "1M"})
    assert (tmp_path / "x").stat().st_size == 1 << 20
    assert isinstance(fn, NvmeFunction)
    fn.backing.close()


def test_standalone_backing_defaults_to_a_sparse_file_in_the_data_dir(egpu_home: Path) -> None:
    fn = create_device("nvme", {"size": "2M"})
    assert isinstance(fn, NvmeFunction)
    try:
        path = egpu_home / "data" / "devices" / "nvme.img"
        assert fn.backing.path == path
        assert path.stat().st_size == 2 << 20 and path.stat().st_blocks == 0
    finally:
        fn.backing.close()


def test_existing_backing_file_is_never_shrunk(tmp_path: Path) -> None:
    path = tmp_path / "big.img"
    path.write_bytes(b"x" * 8192)
    b = NvmeBacking(path, 4096)
    assert b.blocks == 8 and path.stat().st_size == 8192
    b.close()
    b = NvmeBacking(path, None)
    assert b.blocks == 16
    b.close()


@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12), step=st.integers(1, 257))
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_scatter_writes_resume_after_short_writes(tmp_path: Path, sizes: list[int],
                                                  step: int) -> None:
    """A file system may write less than asked (a size limit, a full disk): the rest follows."""
    chunks = [os.urandom(n) for n in sizes]
    calls = []
    real = os.pwritev

    def short(fd: int, views: list[memoryview], offset: int) -> int:
        calls.append(offset)
        flat = b"".join(bytes(v) for v in views)[:step]
        return real(fd, [memoryview(flat)], offset)

    fd = os.open(tmp_path / "short.img", os.O_RDWR | os.O_CREAT | os.O_TRUNC)
    try:
        views = [memoryview(c) for c in chunks]
        before = list(views)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(os, "pwritev", short)
            pwritev_all(fd, views, 512)
        data = b"".join(chunks)
        assert os.pread(fd, len(data) + 1, 512) == data
        assert len(calls) == max(1, -(-len(data) // step))  # one call per step, none after
        assert views == before  # the caller's list (maybe a cached one) is left as it was
    finally:
        os.close(fd)
