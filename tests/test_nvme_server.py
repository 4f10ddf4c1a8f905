"""The NVMe function behind the real vfio-user server, driven over a socketpair by the test client
with real fds: guest RAM arrives by DMA_MAP (memfd), interrupts leave through eventfds, and the
pinned views the hot path holds never block a DMA_UNMAP or a disconnect."""

from __future__ import annotations

import mmap
import os
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from egpu.devices.base import IrqIndex, RegionIndex
from egpu.devices.nvme import spec
from egpu.devices.nvme.function import NvmeFunction, create
from egpu.devices.nvme.spec import AdminOpcode, IoOpcode, make_command
from egpu.vfio_user import protocol as p
from egpu.vfio_user.client import VfioUserClient
from egpu.vfio_user.server import VfioUserServer

RAM_IOVA = 0x100000
RAM_SIZE = 1 << 20
ASQ, ACQ, IOSQ, IOCQ, DATA = (RAM_IOVA + i * 0x1000 for i in range(5))
DEPTH = 8
BAR0 = RegionIndex.BAR0
PCI_COMMAND_MEMORY_AND_MASTER = 0x6


class Rig:
    """A server thread on one end of a socketpair; the test is QEMU plus the guest driver."""

    def __init__(self, tmp_path: Path) -> None:
        self.device: NvmeFunction = create(backing=tmp_path / "nvme.img", size=4 << 20,
                                           queues=1)
        self.server = VfioUserServer(self.device)
        self.ram_fd = os.memfd_create("guest-ram")
        os.ftruncate(self.ram_fd, RAM_SIZE)
        self.ram = mmap.mmap(self.ram_fd, RAM_SIZE)
        self.efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        self.thread: threading.Thread | None = None
        self.sock: socket.socket | None = None
        self.tails = {0: 0, 1: 0}
        self.heads = {0: 0, 1: 0}

    def connect(self) -> VfioUserClient:
        self.disconnect()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.thread = threading.Thread(target=self._serve, args=(theirs,), daemon=True)
        self.thread.start()
        ours.settimeout(10)  # a server stuck on a pinned view fails the test, never hangs it
        self.sock = ours
        client = VfioUserClient(ours)
        client.negotiate()
        client.dma_map(RAM_IOVA, RAM_SIZE, self.ram_fd)
        client.set_irqs(IrqIndex.MSIX, 0, 2, p.IRQ_SET_DATA_EVENTFD | p.IRQ_SET_ACTION_TRIGGER,
                        self.efds)
        client.region_write(RegionIndex.CONFIG, 4, struct.pack("<H",
                                                                PCI_COMMAND_MEMORY_AND_MASTER))
        return client

    def _serve(self, sock: socket.socket) -> None:
        try:
            self.server.serve_connection(sock)
        finally:
            sock.close()

    def disconnect(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.thread is not None:
            self.thread.join(10)
            assert not self.thread.is_alive(), "server did not finish the disconnect"
            self.thread = None

    def close(self) -> None:
        self.disconnect()
        self.ram.close()
        os.close(self.ram_fd)
        for fd in self.efds:
            os.close(fd)
        self.device.backing.close()

    # -- guest-driver side ----------------------------------------------------------------------

    def poke(self, iova: int, data: bytes) -> None:
        self.ram[iova - RAM_IOVA:iova - RAM_IOVA + len(data)] = data

    def peek(self, iova: int, n: int) -> bytes:
        return bytes(self.ram[iova - RAM_IOVA:iova - RAM_IOVA + n])

    def enable(self, client: VfioUserClient) -> None:
        self.poke(ASQ, bytes(5 * 0x1000))
        self.tails, self.heads = {0: 0, 1: 0}, {0: 0, 1: 0}
        client.region_write(BAR0, spec.REG_CC, struct.pack("<I", 0))
        client.region_write(BAR0, spec.REG_AQA, struct.pack("<I", (DEPTH - 1) * 0x10001))
        client.region_write(BAR0, spec.REG_ASQ, struct.pack("<Q", ASQ))
        client.region_write(BAR0, spec.REG_ACQ, struct.pack("<Q", ACQ))
        client.region_write(BAR0, spec.REG_CC, struct.pack("<I", spec.CC_EN | 0x460000))

    def csts(self, client: VfioUserClient) -> int:
        value: int = struct.unpack("<I", client.region_read(BAR0, spec.REG_CSTS, 4))[0]
        return value

    @staticmethod
    def ring(client: VfioUserClient, offset: int, value: int) -> None:
        """A doorbell as QEMU sends it for a BAR without mmap: a posted write (no reply); the
        next read is the barrier (the server handles messages in order)."""
        body = p.REGION_ACCESS.pack(offset, BAR0, 4) + struct.pack("<I", value)
        client.send_raw(p.HEADER.pack(0xFFFF, p.Command.REGION_WRITE, p.HEADER_SIZE + len(body),
                                      p.TYPE_COMMAND | p.FLAG_NO_REPLY, 0) + body)
        client.region_read(BAR0, spec.REG_CSTS, 4)

    def command(self, client: VfioUserClient, qid: int, cmd: spec.Command) -> tuple[int, int]:
        """Submit, ring (as a posted write, like QEMU), read the completion and interrupt."""
        sq_base, cq_base = (ASQ, ACQ) if qid == 0 else (IOSQ, IOCQ)
        self.poke(sq_base + self.tails[qid] * 64, cmd.pack())
        self.tails[qid] = (self.tails[qid] + 1) % DEPTH
        self.ring(client, spec.DOORBELL_BASE + 8 * qid, self.tails[qid])
        dw0, _, _, _, cid, sf = spec.CQE.unpack(self.peek(cq_base + self.heads[qid] * 16, 16))
        assert cid == cmd.cid and sf & 1 == 1
        self.heads[qid] += 1
        self.ring(client, spec.DOORBELL_BASE + 8 * qid + 4, self.heads[qid])
        assert os.eventfd_read(self.efds[qid]) == 1
        return sf >> 1, dw0


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.close()


def setup_io(rig: Rig, client: VfioUserClient) -> None:
    rig.enable(client)
    assert rig.csts(client) == spec.CSTS_RDY
    assert rig.command(client, 0, make_command(AdminOpcode.CREATE_IO_CQ, 1, prp1=IOCQ,
                                               cdw10=(DEPTH - 1) << 16 | 1,
                                               cdw11=1 << 16 | 3)) == (0, 0)
    assert rig.command(client, 0, make_command(AdminOpcode.CREATE_IO_SQ, 2, prp1=IOSQ,
                                               cdw10=(DEPTH - 1) << 16 | 1,
                                               cdw11=1 << 16 | 1)) == (0, 0)


def test_identify_and_io_through_the_server(rig: Rig) -> None:
    client = rig.connect()
    setup_io(rig, client)
    assert rig.command(client, 0, make_command(AdminOpcode.IDENTIFY, 3, prp1=DATA,
                                               cdw10=1)) == (0, 0)
    assert rig.peek(DATA + 24, 8) == b"egpu vir"
    payload = os.urandom(4096)
    rig.poke(DATA, payload)
    write = make_command(IoOpcode.WRITE, 4, nsid=1, prp1=DATA, cdw10=16, cdw12=7)
    assert rig.command(client, 1, write) == (0, 0)
    rig.poke(DATA, bytes(4096))
    read = make_command(IoOpcode.READ, 5, nsid=1, prp1=DATA, cdw10=16, cdw12=7)
    assert rig.command(client, 1, read) == (0, 0)
    assert rig.peek(DATA, 4096) == payload
    with open(rig.device.backing.path, "rb") as f:
        f.seek(16 * 512)
        assert f.read(4096) == payload


def test_unmap_and_disconnect_are_not_held_up_by_pins(rig: Rig) -> None:
    client = rig.connect()
    setup_io(rig, client)
    assert rig.device.controller.pinned.window(DATA, 4096, True) is not None
    client.dma_unmap(RAM_IOVA, RAM_SIZE)  # replies only once every reference is gone
    assert rig.device.controller.pinned.window(DATA, 4096, True) is None
    # The queues now point at nothing: the next doorbell makes the controller fatal.
    client.region_write(BAR0, spec.DOORBELL_BASE + 8, struct.pack("<I", 1))
    assert rig.csts(client) & spec.CSTS_CFS
    client.dma_map(RAM_IOVA, RAM_SIZE, rig.ram_fd)
    rig.enable(client)  # a reset clears the fatal status
    assert rig.csts(client) == spec.CSTS_RDY
    # A disconnect drops maps (and pins) too; the device keeps its state for the next client.
    rig.disconnect()
    client = rig.connect()
    assert rig.csts(client) == spec.CSTS_RDY
    setup_io(rig, client)
    assert rig.command(client, 1, make_command(IoOpcode.FLUSH, 9, nsid=1)) == (0, 0)


def test_device_reset_returns_to_power_on(rig: Rig) -> None:
    client = rig.connect()
    setup_io(rig, client)
    client.request(p.Command.DEVICE_RESET)
    assert rig.csts(client) == 0
    assert struct.unpack("<I", client.region_read(BAR0, spec.REG_CC, 4))[0] == 0
    assert rig.device.controller.sqs == {}
