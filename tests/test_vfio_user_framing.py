"""Framing edge cases of the buffered reader, fd attribution, limits, remote DMA from threads."""

from __future__ import annotations

import array
import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest

from egpu.devices.sample import BAR2_SIZE, SAMPLE_VENDOR_ID, SampleFunction
from egpu.vfio_user import protocol as p
from egpu.vfio_user.client import ClientReply, VfioUserClient
from egpu.vfio_user.dispatcher import SERVER_CAPABILITIES
from egpu.vfio_user.server import VfioUserServer

RW = p.DMA_FLAG_READ | p.DMA_FLAG_WRITE


def start(server: VfioUserServer) -> tuple[VfioUserClient, threading.Thread, socket.socket]:
    ours, theirs = socket.socketpair()
    ours.settimeout(10)

    def serve() -> None:
        try:
            server.serve_connection(theirs)
        finally:
            theirs.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    client = VfioUserClient(ours)
    client.negotiate()
    return client, t, ours


@pytest.fixture
def conn() -> Iterator[tuple[VfioUserClient, VfioUserServer]]:
    server = VfioUserServer(SampleFunction())
    client, thread, sock = start(server)
    yield client, server
    sock.close()
    thread.join(10)
    assert not thread.is_alive()


def read_replies(client: VfioUserClient, n: int) -> list[tuple[p.Header, bytes]]:
    out = []
    for _ in range(n):
        r = client._read()
        out.append((r.header, r.payload))
    return out


def msg(msg_id: int, command: int, payload: bytes) -> bytes:
    return p.HEADER.pack(msg_id, command, p.HEADER_SIZE + len(payload), 0, 0) + payload


def test_pipelined_messages_in_one_send(conn: tuple[VfioUserClient, VfioUserServer]) -> None:
    client, _ = conn
    batch = b"".join(msg(100 + i, p.Command.REGION_READ, p.REGION_ACCESS.pack(2 * i, 7, 2))
                     for i in range(3))
    client.send_raw(batch)
    replies = read_replies(client, 3)
    assert [h.msg_id for h, _ in replies] == [100, 101, 102]
    assert replies[0][1][16:] == struct.pack("<H", SAMPLE_VENDOR_ID)


def test_message_dribbled_byte_by_byte(conn: tuple[VfioUserClient, VfioUserServer]) -> None:
    client, _ = conn
    for b in msg(7, p.Command.REGION_WRITE, p.REGION_ACCESS.pack(0x180, 0, 3) + b"abc"):
        client.sock.send(bytes([b]))
    (h, _), = read_replies(client, 1)
    assert h.msg_id == 7 and not h.flags & p.FLAG_ERROR
    assert client.region_read(0, 0x180, 3) == b"abc"


def test_message_larger_than_the_receive_buffer(
    conn: tuple[VfioUserClient, VfioUserServer]
) -> None:
    client, _ = conn
    data = os.urandom(BAR2_SIZE)
    client.region_write(2, 0, data)  # 64 KiB + headers: more than one buffer's worth
    assert client.region_read(2, 0, BAR2_SIZE) == data
    client.region_write(2, 0, b"small")  # and the next small message after it
    assert client.region_read(2, 0, 5) == b"small"


def test_fds_go_to_the_message_they_came_with(
    conn: tuple[VfioUserClient, VfioUserServer]
) -> None:
    client, server = conn
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 1 << 20)
    try:
        # three messages back to back, the fd on the middle one, nothing waited for in between
        client.send_raw(msg(1, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 2)))
        client.send_raw(msg(2, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0x1000_0000,
                                                                 1 << 20)), [ram])
        client.send_raw(msg(3, p.Command.REGION_READ, p.REGION_ACCESS.pack(0, 7, 2)))
        replies = read_replies(client, 3)
        assert [h.msg_id for h, _ in replies] == [1, 2, 3]
        assert not any(h.flags & p.FLAG_ERROR for h, _ in replies)
        assert [r.iova for r in server.memory.ranges()] == [0x1000_0000]
        os.pwrite(ram, b"xyz", 5)
        assert server.memory.read(0x1000_0005, 3) == b"xyz"
    finally:
        os.close(ram)


def test_header_and_fd_then_payload_later(conn: tuple[VfioUserClient, VfioUserServer]) -> None:
    client, server = conn
    ram = os.memfd_create("ram")
    os.ftruncate(ram, 1 << 16)
    try:
        whole = msg(9, p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0x2000_0000, 1 << 16))
        client.sock.sendmsg([whole[:20]],
                            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [ram]))])
        client.sock.send(whole[20:])
        (h, _), = read_replies(client, 1)
        assert h.msg_id == 9 and not h.flags & p.FLAG_ERROR
        assert server.memory.ranges()[0].has_fd
    finally:
        os.close(ram)


def test_max_dma_maps_is_enforced() -> None:
    caps = p.Capabilities(**{**SERVER_CAPABILITIES.__dict__, "max_dma_maps": 2})
    server = VfioUserServer(SampleFunction(), capabilities=caps)
    client, thread, sock = start(server)
    try:
        assert client.server_caps is not None and client.server_caps.max_dma_maps == 2
        client.dma_map(0x0, 4096)
        client.dma_map(0x1000, 4096)
        r = client.request(p.Command.DMA_MAP, p.DMA_MAP.pack(32, RW, 0, 0x2000, 4096),
                           check=False)
        assert r.header.error == errno.ENOSPC
    finally:
        sock.close()
        thread.join(10)


def test_remote_dma_from_a_device_thread(conn: tuple[VfioUserClient, VfioUserServer]) -> None:
    client, server = conn
    guest = bytearray(b"from-the-client!" + bytes(4080))
    client.remote_memory[0x5000_0000] = guest
    client.dma_map(0x5000_0000, len(guest))
    got: list[bytes] = []

    def device_worker() -> None:  # a device's own thread, not the server loop
        got.append(server.memory.read(0x5000_0000, 16))
        server.memory.write(0x5000_0010, b"written-by-thrd")

    worker = threading.Thread(target=device_worker)
    worker.start()
    # the client must keep reading to answer DMA_READ/WRITE: a region read does that
    while worker.is_alive():
        client.region_read(7, 0, 2)
        worker.join(0.05)
    assert got == [b"from-the-client!"]
    assert bytes(guest[16:31]) == b"written-by-thrd"


def test_fds_piling_up_on_an_unfinished_message_close_the_connection() -> None:
    server = VfioUserServer(SampleFunction())
    _client, thread, sock = start(server)
    efd = os.eventfd(0)
    try:
        before = len(os.listdir("/proc/self/fd"))
        sock.send(p.HEADER.pack(1, p.Command.REGION_WRITE, 1000, 0, 0))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # 16 fds per fragment, never completing the message
            try:
                sock.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [efd] * 16))])
            except OSError:
                break  # the server hung up
            time.sleep(0.001)
        thread.join(10)
        assert not thread.is_alive()
        assert len(os.listdir("/proc/self/fd")) <= before
    finally:
        os.close(efd)
        sock.close()


def test_remote_dma_is_chunked_by_the_client_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    server = VfioUserServer(SampleFunction())
    ours, theirs = socket.socketpair()
    ours.settimeout(10)
    t = threading.Thread(target=server.serve_connection, args=(theirs,), daemon=True)
    t.start()
    try:
        client = VfioUserClient(ours)
        client.negotiate({"max_data_xfer_size": 1000})
        guest = bytearray(os.urandom(4096))
        client.remote_memory[0x7000_0000] = guest
        client.dma_map(0x7000_0000, len(guest))
        seen: list[int] = []
        serve_dma = client._serve_dma

        def spy(m: ClientReply) -> None:
            seen.append(p.DMA_ACCESS.unpack_from(m.payload)[1])
            serve_dma(m)

        monkeypatch.setattr(client, "_serve_dma", spy)
        from egpu.devices.sample import (
            DMA_TO_DEVICE,
            REG_DMA_ADDR,
            REG_DMA_CMD,
            REG_DMA_LEN,
        )
        client.region_write(0, REG_DMA_ADDR, struct.pack("<Q", 0x7000_0000))
        client.region_write(0, REG_DMA_LEN, struct.pack("<Q", 4096))
        client.region_write(0, REG_DMA_CMD, struct.pack("<Q", DMA_TO_DEVICE))
        assert client.region_read(2, 0, 4096) == bytes(guest)
        assert seen and max(seen) <= 1000 and sum(seen) == 4096
    finally:
        ours.close()
        t.join(10)
        theirs.close()
