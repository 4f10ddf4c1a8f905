"""The vfio-user server over socket.socketpair() with real fds: every command, every refusal."""

from __future__ import annotations

import errno
import json
import mmap
import os
import socket
import stat
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from egpu.devices.base import IrqIndex, RegionIndex
from egpu.devices.sample import (
    BAR2_SIZE,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    MSIX_VECTORS,
    REG_DMA_ADDR,
    REG_DMA_CMD,
    REG_DMA_LEN,
    REG_DMA_STATUS,
    REG_DOORBELL,
    SAMPLE_DEVICE_ID,
    SAMPLE_VENDOR_ID,
    SampleFunction,
)
from egpu.errors import ConflictError, DeviceServerError
from egpu.vfio_user import protocol as p
from egpu.vfio_user.client import VfioUserClient
from egpu.vfio_user.server import VfioUserServer

CONFIG = RegionIndex.CONFIG
RW = p.DMA_FLAG_READ | p.DMA_FLAG_WRITE


class Harness:
    """A server thread serving one socketpair end; ``connect()`` opens a new client."""

    def __init__(self) -> None:
        self.device = SampleFunction()
        self.server = VfioUserServer(self.device)
        self.thread: threading.Thread | None = None
        self.client_sock: socket.socket | None = None

    def connect(self, negotiate: bool = True) -> VfioUserClient:
        self.disconnect()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        self.thread.start()
        self.client_sock = ours
        ours.settimeout(10)
        client = VfioUserClient(ours)
        if negotiate:
            client.negotiate()
        return client

    @staticmethod
    def _serve_sock(server: VfioUserServer, sock: socket.socket) -> None:
        try:
            server.serve_connection(sock)
        finally:
            sock.close()

    def _serve(self, sock: socket.socket) -> None:
        self._serve_sock(self.server, sock)

    def disconnect(self) -> None:
        if self.client_sock is not None:
            self.client_sock.close()
            self.client_sock = None
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive()
            self.thread = None


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.disconnect()


@pytest.fixture
def client(h: Harness) -> VfioUserClient:
    return h.connect()


@pytest.fixture
def ram() -> Iterator[int]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 1 << 20)
    yield fd
    os.close(fd)


def expect_errno(client: VfioUserClient, command: int, payload: bytes, err: int,
                 fds: list[int] | tuple[int, ...] = ()) -> None:
    reply = client.request(command, payload, fds, check=False)
    assert reply.header.flags & p.FLAG_ERROR, f"expected errno {err}, got success"
    assert reply.header.error == err, os.strerror(reply.header.error)
    assert reply.header.size == p.HEADER_SIZE  # an error reply is only a header


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the happy paths ---------------------------------------------------------------------------


def test_version_negotiation(h: Harness) -> None:
    client = h.connect(negotiate=False)
    caps = client.negotiate()
    assert caps.max_msg_fds == 16 and caps.max_data_xfer_size == 1 << 20
    assert caps.pgsizes == 4096 and caps.max_dma_maps >= 1 and caps.write_multiple
    client2 = h.connect(negotiate=False)
    caps2 = client2.negotiate({"max_msg_fds": 4})
    assert not caps2.write_multiple  # not proposed, so not granted


def test_device_info_and_config_space(client: VfioUserClient) -> None:
    reply = client.request(p.Command.DEVICE_GET_INFO, p.DEVICE_INFO.pack(16, 0, 0, 0))
    _argsz, flags, regions, irqs = p.DEVICE_INFO.unpack(reply.payload)
    assert flags == p.DEVICE_FLAGS_PCI | p.DEVICE_FLAGS_RESET and regions == 9 and irqs == 5
    ids = client.region_read(CONFIG, 0, 4)
    assert struct.unpack("<HH", ids) == (SAMPLE_VENDOR_ID, SAMPLE_DEVICE_ID)
    assert len(client.region_read(CONFIG, 0, 4096)) == 4096
    client.region_write(CONFIG, 0x10, b"\xff\xff\xff\xff")
    assert client.region_read(CONFIG, 0x10, 4) == struct.pack("<I", 0xFFFFF000)


def test_region_info_with_sparse_mmap_and_fd(client: VfioUserClient) -> None:
    small = client.request(p.Command.DEVICE_GET_REGION_INFO,
                           p.REGION_INFO.pack(32, 0, 2, 0, 0, 0))
    argsz, flags, index, cap_off, size, _off = p.REGION_INFO.unpack_from(small.payload)
    assert not flags & p.REGION_FLAG_CAPS and argsz > 32 and cap_off == 0 and not small.fds
    full = client.request(p.Command.DEVICE_GET_REGION_INFO,
                          p.REGION_INFO.pack(argsz, 0, 2, 0, 0, 0))
    argsz2, flags, index, cap_off, size, _mmap_off = p.REGION_INFO.unpack_from(full.payload)
    assert (index, size, argsz2) == (2, BAR2_SIZE, argsz)
    assert flags & (p.REGION_FLAG_MMAP | p.REGION_FLAG_READ | p.REGION_FLAG_WRITE) == 7
    cap_id, version, _next = p.CAP_HEADER.unpack_from(full.payload, cap_off)
    assert (cap_id, version) == (p.REGION_CAP_SPARSE_MMAP, 1)
    nr, _ = p.SPARSE_MMAP.unpack_from(full.payload, cap_off + p.CAP_HEADER.size)
    area = p.SPARSE_AREA.unpack_from(full.payload, cap_off + p.CAP_HEADER.size + 8)
    assert nr == 1 and area == (BAR2_SIZE // 2, BAR2_SIZE // 2)
    assert len(full.fds) == 1
    m = mmap.mmap(full.fds[0], BAR2_SIZE)
    m[BAR2_SIZE - 4 :] = b"PIXL"  # client writes through the shared mapping...
    assert client.region_read(2, BAR2_SIZE - 4, 4) == b"PIXL"  # ...the device sees it
    m.close()
    os.close(full.fds[0])
    cfg = client.request(p.Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 7, 0, 0, 0))
    assert p.REGION_INFO.unpack(cfg.payload)[4] == 4096 and not cfg.fds
    absent = client.request(p.Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 8, 0, 0, 0))
    assert p.REGION_INFO.unpack(absent.payload)[4] == 0


def test_region_io_fds_and_irq_info(client: VfioUserClient) -> None:
    reply = client.request(p.Command.DEVICE_GET_REGION_IO_FDS, p.REGION_IO_FDS.pack(16, 0, 0, 0))
    assert p.REGION_IO_FDS.unpack(reply.payload) == (16, 0, 0, 0)
    counts = {}
    for index in range(5):
        r = client.request(p.Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, index, 0))
        _a, flags, i, count = p.IRQ_INFO.unpack(r.payload)
        assert i == index and flags & p.IRQ_INFO_EVENTFD
        counts[index] = count
    assert counts == {0: 1, 1: 1, 2: MSIX_VECTORS, 3: 1, 4: 1}


def test_msix_eventfds_in_batches_trigger_mask_unmask(client: VfioUserClient) -> None:
    efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(MSIX_VECTORS)]
    try:
        flags = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        client.set_irqs(IrqIndex.MSIX, 0, 2, flags, efds[:2])  # two batches, as QEMU sends
        client.set_irqs(IrqIndex.MSIX, 2, 2, flags, efds[2:])
        client.region_write(0, REG_DOORBELL, struct.pack("<Q", 3))
        assert os.eventfd_read(efds[3]) == 1
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[0])
        # client-side trigger with DATA_BOOL selects vectors
        client.set_irqs(IrqIndex.MSIX, 0, 2, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_TRIGGER,
                        data=b"\x00\x01")
        assert os.eventfd_read(efds[1]) == 1
        # masked vectors stay pending until unmasked
        client.set_irqs(IrqIndex.MSIX, 3, 1, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK)
        client.region_write(0, REG_DOORBELL, struct.pack("<Q", 3))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[3])
        client.set_irqs(IrqIndex.MSIX, 3, 1, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK)
        assert os.eventfd_read(efds[3]) == 1
        # de-assign with no fds, then disable the whole index
        client.set_irqs(IrqIndex.MSIX, 0, 2, flags)
        client.set_irqs(IrqIndex.MSIX, 0, 0, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_TRIGGER)
        client.region_write(0, REG_DOORBELL, struct.pack("<Q", 3))
        with pytest.raises(BlockingIOError):
            os.eventfd_read(efds[3])
    finally:
        for fd in efds:
            os.close(fd)


def test_intx_is_automasked_until_unmask(client: VfioUserClient) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        client.set_irqs(IrqIndex.INTX, 0, 1, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                        [efd])
        client.region_write(0, REG_DOORBELL, struct.pack("<Q", 0))
        client.region_write(0, REG_DOORBELL, struct.pack("<Q", 0))
        assert os.eventfd_read(efd) == 1  # the second one waited: line masked after firing
        client.set_irqs(IrqIndex.INTX, 0, 1, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_UNMASK)
        assert os.eventfd_read(efd) == 1
    finally:
        os.close(efd)


def test_dma_map_with_fd_then_device_dma_and_unmap(client: VfioUserClient, h: Harness,
                                                   ram: int) -> None:
    client.dma_map(0x4000_0000, 1 << 20, ram, 0)
    os.pwrite(ram, b"guest data!", 0x100)
    for reg, value in ((REG_DMA_ADDR, 0x4000_0100), (REG_DMA_LEN, 11),
                       (REG_DMA_CMD, DMA_TO_DEVICE)):
        client.region_write(0, reg, struct.pack("<Q", value))
    assert client.region_read(2, 0, 11) == b"guest data!"
    client.region_write(2, 0, b"from device")
    client.region_write(0, REG_DMA_ADDR, struct.pack("<Q", 0x4000_0200))
    client.region_write(0, REG_DMA_CMD, struct.pack("<Q", DMA_FROM_DEVICE))
    assert os.pread(ram, 11, 0x200) == b"from device"
    reply = client.request(p.Command.DMA_UNMAP,
                           p.DMA_UNMAP.pack(24, 0, 0x4000_0000, 1 << 20))
    assert p.DMA_UNMAP.unpack(reply.payload)[2:] == (0x4000_0000, 1 << 20)
    assert h.server.memory.ranges() == ()
    # after unmap the same DMA fails inside the device, the server keeps going
    client.region_write(0, REG_DMA_CMD, struct.pack("<Q", DMA_TO_DEVICE))
    assert client.region_read(0, REG_DMA_STATUS, 8) == struct.pack("<Q", 1)


def test_dma_without_fd_uses_dma_read_and_write(h: Harness) -> None:
    client = h.connect()
    guest = bytearray(b"remote-guest-ram" + bytes(4080))
    client.remote_memory[0x9000_0000] = guest
    client.dma_map(0x9000_0000, len(guest))
    client.region_write(0, REG_DMA_ADDR, struct.pack("<Q", 0x9000_0000))
    client.region_write(0, REG_DMA_LEN, struct.pack("<Q", 16))
    client.region_write(0, REG_DMA_CMD, struct.pack("<Q", DMA_TO_DEVICE))
    assert client.region_read(2, 0, 16) == b"remote-guest-ram"
    client.region_write(2, 0, b"written-by-dev!!")
    client.region_write(0, REG_DMA_CMD, struct.pack("<Q", DMA_FROM_DEVICE))
    assert bytes(guest[:16]) == b"written-by-dev!!"


def test_write_multi_reset_and_feature(client: VfioUserClient, h: Harness) -> None:
    entries = [(0x100, 0, 4, b"abcd\0\0\0\0"), (0x108, 0, 8, b"12345678")]
    body = p.WRITE_MULTI_COUNT.pack(2) + b"".join(p.WRITE_MULTI_ENTRY.pack(*e) for e in entries)
    reply = client.request(p.Command.REGION_WRITE_MULTI, body)
    assert p.WRITE_MULTI_COUNT.unpack(reply.payload) == (2,)
    assert client.region_read(0, 0x100, 16) == b"abcd\0\0\0\x0012345678"
    client.region_write(CONFIG, 4, b"\x06\x00")
    client.request(p.Command.DEVICE_RESET)
    assert h.device.resets == 1
    assert client.region_read(0, 0x100, 4) == b"\0\0\0\0"
    assert client.region_read(CONFIG, 4, 2) == b"\0\0"
    # migration is refused the way the kernel refuses an unknown feature
    expect_errno(client, p.Command.DEVICE_FEATURE, p.DEVICE_FEATURE.pack(8, p.FEATURE_GET | 1),
                 errno.ENOTTY)
    expect_errno(client, p.Command.DEVICE_FEATURE, p.DEVICE_FEATURE.pack(8, p.FEATURE_PROBE | 2),
                 errno.ENOTTY)
    expect_errno(client, p.Command.MIG_DATA_READ, struct.pack("<II", 8, 16), errno.ENOTTY)


def test_no_reply_flag_suppresses_the_reply(client: VfioUserClient) -> None:
    header = p.HEADER.pack(77, p.Command.REGION_WRITE, 16 + 17, p.FLAG_NO_REPLY, 0)
    client.send_raw(header + p.REGION_ACCESS.pack(0x100, 0, 1) + b"Z")
    assert client.region_read(0, 0x100, 1) == b"Z"  # the next reply is for this read


def test_disconnect_drops_maps_and_irq_fds_and_keeps_state(h: Harness, ram: int) -> None:
    client = h.connect()
    client.dma_map(0, 1 << 20, ram)
    efd = os.eventfd(0)
    client.set_irqs(IrqIndex.MSIX, 0, 1, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER, [efd])
    client.region_write(0, 0x200, b"state")
    before = fd_count()
    h.disconnect()
    assert h.server.memory.ranges() == ()
    assert not h.server.interrupts.enabled(IrqIndex.MSIX, 0)
    assert fd_count() < before  # the server's copy of the eventfd is closed
    os.close(efd)
    client = h.connect()
    assert client.region_read(0, 0x200, 5) == b"state"
    client.dma_map(0, 1 << 20, ram)  # the same range maps again: nothing was left behind


# -- hostile input: one test per validation rule, exact errno ----------------------------------


def test_rule_message_shorter_than_struct(client: VfioUserClient) -> None:
    for command, size in [(p.Command.REGION_READ, 16), (p.Command.REGION_WRITE, 16),
                          (p.Command.DMA_MAP, 32), (p.Command.DMA_UNMAP, 24),
                          (p.Command.DEVICE_GET_INFO, 16),
                          (p.Command.DEVICE_GET_REGION_INFO, 32),
                          (p.Command.DEVICE_GET_REGION_IO_FDS, 16),
                          (p.Command.DEVICE_GET_IRQ_INFO, 16), (p.Command.DEVICE_SET_IRQS, 20),
                          (p.Command.REGION_WRITE_MULTI, 8), (p.Command.DEVICE_FEATURE, 8)]:
        expect_errno(client, command, bytes(size - 1), errno.EINVAL)


def test_rule_count_above_negotiated_max(client: VfioUserClient) -> None:
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, (1 << 20) + 1),
                 errno.E2BIG)
    expect_errno(client, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(0, 7, 0xFFFFFFFF),
                 errno.E2BIG)
    expect_errno(client, p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(1 << 40),
                 errno.E2BIG)


def test_rule_payload_length_differs_from_count(client: VfioUserClient) -> None:
    expect_errno(client, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(0, 7, 4) + b"xx",
                 errno.EINVAL)
    expect_errno(client, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(0, 7, 1) + b"xx",
                 errno.EINVAL)
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4) + b"extra",
                 errno.EINVAL)
    expect_errno(client, p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(2) + bytes(24),
                 errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(22, p.IRQ_SET_DATA_BOOL | p.IRQ_SET_ACTION_TRIGGER, 2, 0, 3)
                 + b"\x01\x01", errno.EINVAL)


def test_rule_index_must_be_strictly_below_number(client: VfioUserClient) -> None:
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 9, 4), errno.EINVAL)
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 0xFFFFFFFF, 4),
                 errno.EINVAL)
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 8, 4), errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_GET_REGION_INFO, p.REGION_INFO.pack(32, 0, 9, 0, 0, 0),
                 errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_GET_REGION_IO_FDS, p.REGION_IO_FDS.pack(16, 0, 9, 0),
                 errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_GET_IRQ_INFO, p.IRQ_INFO.pack(16, 0, 5, 0),
                 errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(20, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 5, 0, 1),
                 errno.EINVAL)


def test_rule_offset_plus_count_within_size(client: VfioUserClient) -> None:
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(4093, 7, 4), errno.ERANGE)
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(1 << 63, 7, 4),
                 errno.ERANGE)
    expect_errno(client, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(4096, 0, 1) + b"x",
                 errno.ERANGE)
    entry = p.WRITE_MULTI_ENTRY.pack(4095, 0, 2, bytes(8))
    expect_errno(client, p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(1) + entry,
                 errno.ERANGE)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(20, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 2, 3, 2),
                 errno.ERANGE)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(20, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 2,
                                0xFFFFFFFF, 2), errno.ERANGE)


def test_rule_unknown_flag_bits(client: VfioUserClient, ram: int) -> None:
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, 0x4 | RW, 0, 0, 4096),
                 errno.EINVAL, [ram])
    expect_errno(client, p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 1, 0, 4096), errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(20, 1 << 6 | p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK,
                                2, 0, 1), errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_SET_IRQS,
                 p.IRQ_SET.pack(20, p.IRQ_SET_DATA_NONE | p.IRQ_SET_DATA_BOOL
                                | p.IRQ_SET_ACTION_MASK, 2, 0, 1), errno.EINVAL)
    expect_errno(client, p.Command.DEVICE_FEATURE, p.DEVICE_FEATURE.pack(8, 1 << 20),
                 errno.EINVAL)
    reply = client.request(p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4),
                           flags=1 << 7, check=False)
    assert reply.header.error == errno.EINVAL


def test_rule_unknown_command_gets_enosys(client: VfioUserClient) -> None:
    for command in (0, 14, 19, 0xFFFF):
        expect_errno(client, command, b"whatever", errno.ENOSYS)
    assert client.region_read(CONFIG, 0, 2) == struct.pack("<H", SAMPLE_VENDOR_ID)


def test_rule_region_permission(h: Harness) -> None:
    # the sample's regions are all read/write; a read-only region is refused on write
    from egpu.devices.base import DeviceDescription, Region

    desc = h.device.describe()
    ro = tuple(Region(r.index, r.size, writable=False) if r.index == 0 else r
               for r in desc.regions)
    h.device.describe = lambda: DeviceDescription(ro, desc.irqs)  # type: ignore[method-assign]
    h.server = VfioUserServer(h.device)
    client = h.connect()
    expect_errno(client, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(0, 0, 1) + b"x",
                 errno.EACCES)


def test_dma_unmap_all(client: VfioUserClient, h: Harness, ram: int) -> None:
    client.dma_map(0x0, 0x10000, ram)
    client.dma_map(0x20000, 0x10000, ram)
    expect_errno(client, p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, p.DMA_UNMAP_FLAG_ALL, 0,
                                                               0x10000), errno.EINVAL)
    client.request(p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, p.DMA_UNMAP_FLAG_ALL, 0, 0))
    assert h.server.memory.ranges() == ()


def test_dma_map_refusals(client: VfioUserClient, ram: int) -> None:
    client.dma_map(0x10000, 0x10000, ram)
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0x18000, 0x10000),
                 errno.EEXIST, [ram])
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0, 0), errno.EINVAL,
                 [ram])
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 1 << 63, 1 << 63),
                 errno.EINVAL, [ram])
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0, 4 << 20),
                 errno.EINVAL, [ram])  # larger than the file behind it
    expect_errno(client, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0, 4096),
                 errno.EINVAL, [ram, ram])
    expect_errno(client, p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x10000, 0x1000),
                 errno.ENOENT)
    expect_errno(client, p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(24, 0, 0x10001, 0x10000),
                 errno.ENOENT)


def test_set_irqs_refusals(client: VfioUserClient) -> None:
    r, w = os.pipe()
    efd = os.eventfd(0)
    try:
        trig = p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER
        expect_errno(client, p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, trig, 2, 0, 1),
                     errno.EINVAL, [r])  # a pipe could block the server: only eventfds
        expect_errno(client, p.Command.DEVICE_SET_IRQS, p.IRQ_SET.pack(20, trig, 2, 0, 2),
                     errno.EINVAL, [efd])  # fds != count
        expect_errno(client, p.Command.DEVICE_SET_IRQS,
                     p.IRQ_SET.pack(20, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_UNMASK, 0, 0, 1),
                     errno.EINVAL, [efd])
        expect_errno(client, p.Command.DEVICE_SET_IRQS,
                     p.IRQ_SET.pack(20, p.IRQ_SET_DATA_NONE | p.IRQ_SET_ACTION_MASK, 2, 1, 0),
                     errno.EINVAL)  # count 0 only disables a whole index
    finally:
        for fd in (r, w, efd):
            os.close(fd)


def test_too_many_fds_are_refused_and_closed(client: VfioUserClient) -> None:
    efds = [os.eventfd(0) for _ in range(20)]  # max_msg_fds is 16
    try:
        before = fd_count()
        expect_errno(client, p.Command.DEVICE_SET_IRQS,
                     p.IRQ_SET.pack(20, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                                    2, 0, 4), errno.E2BIG, efds)
        assert fd_count() == before
    finally:
        for fd in efds:
            os.close(fd)


def test_fds_on_commands_that_take_none_are_closed(client: VfioUserClient) -> None:
    efd = os.eventfd(0)
    before = fd_count()
    client.request(p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4), [efd, efd, efd])
    assert fd_count() == before
    os.close(efd)


def test_commands_before_version_and_second_version(h: Harness) -> None:
    client = h.connect(negotiate=False)
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4), errno.EINVAL)
    expect_errno(client, p.Command.VERSION, p.VERSION.pack(1, 0), errno.ENOTSUP)
    expect_errno(client, p.Command.VERSION, p.VERSION.pack(0, 0) + b"{not json\0", errno.EINVAL)
    bad = json.dumps({"capabilities": {"max_msg_fds": -1}}).encode() + b"\0"
    expect_errno(client, p.Command.VERSION, p.VERSION.pack(0, 0) + bad, errno.EINVAL)
    client.negotiate()
    expect_errno(client, p.Command.VERSION, p.VERSION.pack(0, 0), errno.EINVAL)


def test_write_multi_needs_negotiation(h: Harness) -> None:
    client = h.connect(negotiate=False)
    client.negotiate({"max_msg_fds": 16})
    expect_errno(client, p.Command.REGION_WRITE_MULTI, p.WRITE_MULTI_COUNT.pack(0),
                 errno.ENOSYS)


def test_oversized_message_closes_the_connection(h: Harness) -> None:
    client = h.connect()
    client.send_raw(p.HEADER.pack(1, p.Command.REGION_WRITE, 0xFFFFFFFF, 0, 0))
    with pytest.raises((EOFError, ConnectionError)):
        client.request(p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4))
    client = h.connect()  # the server takes the next client
    assert client.region_read(CONFIG, 0, 2) == struct.pack("<H", SAMPLE_VENDOR_ID)


def test_undersized_header_size_closes_the_connection(h: Harness) -> None:
    client = h.connect()
    client.send_raw(p.HEADER.pack(1, p.Command.REGION_READ, 8, 0, 0))
    with pytest.raises((EOFError, ConnectionError)):
        client.request(p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 4))


def test_device_exception_becomes_eio(client: VfioUserClient, h: Harness) -> None:
    def boom(index: int, offset: int, count: int) -> bytes:
        raise RuntimeError("model bug")

    h.device.bar_read = boom  # type: ignore[method-assign]
    expect_errno(client, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 0, 4), errno.EIO)
    assert client.region_read(CONFIG, 0, 2) == struct.pack("<H", SAMPLE_VENDOR_ID)


# -- the listening server ----------------------------------------------------------------------


def test_socket_is_private_and_server_stops(tmp_path: Path) -> None:
    sock_path = tmp_path / "srv" / "fn0.sock"
    server = VfioUserServer(SampleFunction(), sock_path)
    thread = server.start_thread()
    assert stat.S_IMODE(sock_path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
    with pytest.raises(ConflictError):
        VfioUserServer(SampleFunction(), sock_path).listen()
    for _ in range(2):  # one client after the other
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect(str(sock_path))
        client = VfioUserClient(s)
        client.negotiate()
        client.region_write(0, 0x300, b"kept")
        assert client.region_read(0, 0x300, 4) == b"kept"
        s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(sock_path))
    VfioUserClient(s).negotiate()
    server.stop()  # cuts the connected client off
    thread.join(10)
    assert not thread.is_alive() and not sock_path.exists()
    s.close()
    assert server.clients_served == 4  # the ConflictError probe connected too


def test_socket_path_appears_only_once_listening(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # The supervisor starts QEMU as soon as the path exists: a path bound but not yet
    # listening would refuse QEMU's connect.
    sock_path = tmp_path / "srv" / "fn0.sock"
    seen_at_listen: list[bool] = []

    class Recording(socket.socket):
        def listen(self, backlog: int = 1) -> None:
            seen_at_listen.append(sock_path.exists())
            super().listen(backlog)

    monkeypatch.setattr(socket, "socket", Recording)
    server = VfioUserServer(SampleFunction(), sock_path)
    server.listen()
    try:
        assert seen_at_listen == [False]
        assert sorted(p.name for p in sock_path.parent.iterdir()) == ["fn0.sock"]
        assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
        monkeypatch.undo()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(sock_path))  # listening: the backlog takes it without a server loop
    finally:
        server.close()


def test_public_directory_is_refused(tmp_path: Path) -> None:
    public = tmp_path / "pub"
    public.mkdir(mode=0o777)
    public.chmod(0o777)
    with pytest.raises(DeviceServerError):
        VfioUserServer(SampleFunction(), public / "x.sock").listen()


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    d = tmp_path / "s"
    d.mkdir(mode=0o700)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(d / "fn.sock"))
    stale.close()  # file remains, nobody listens
    server = VfioUserServer(SampleFunction(), d / "fn.sock")
    server.listen()
    server.close()
    assert not (d / "fn.sock").exists()
