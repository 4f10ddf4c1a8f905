"""A small synchronous vfio-user client, for tests, smoke checks and the benchmark.

It answers the server's DMA_READ / DMA_WRITE from an optional local buffer (guest memory that
was mapped without an fd) while waiting for a reply.
"""

from __future__ import annotations

import array
import json
import socket
from dataclasses import dataclass

from egpu.vfio_user import protocol as p

_FD_SIZE = array.array("i").itemsize


class ClientError(Exception):
    """The server answered with an error; ``errno`` holds its errno."""

    def __init__(self, command: int, errno_value: int) -> None:
        super().__init__(f"command {command} failed with errno {errno_value}")
        self.errno = errno_value


@dataclass(frozen=True)
class ClientReply:
    """A reply: header, payload and the fds that came with it (caller closes them)."""

    header: p.Header
    payload: bytes
    fds: list[int]


class VfioUserClient:
    """Speaks vfio-user over a connected stream socket."""

    def __init__(self, sock: socket.socket, *, remote_memory: dict[int, bytearray] | None = None
                 ) -> None:
        self.sock = sock
        self.remote_memory = remote_memory or {}
        self._next_id = 0
        self.server_caps: p.Capabilities | None = None

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise EOFError("server closed the connection")
            buf += chunk
        return bytes(buf)

    def _read(self) -> ClientReply:
        data, anc, _flags, _ = self.sock.recvmsg(p.HEADER_SIZE, socket.CMSG_SPACE(64 * _FD_SIZE))
        if not data:
            raise EOFError("server closed the connection")
        fds: list[int] = []
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fa = array.array("i")
                fa.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(fa)
        if len(data) < p.HEADER_SIZE:
            data += self._recv_exact(p.HEADER_SIZE - len(data))
        header = p.Header.unpack(data)
        return ClientReply(header, self._recv_exact(header.size - p.HEADER_SIZE), fds)

    def send_raw(self, message: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Send bytes as they are (hostile-input tests build their own messages)."""
        if fds:
            self.sock.sendmsg([message],
                              [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        else:
            self.sock.sendall(message)

    def request(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
                *, flags: int = p.TYPE_COMMAND, check: bool = True) -> ClientReply:
        """Send a command and wait for its reply, serving DMA requests meanwhile."""
        self._next_id = (self._next_id + 1) & 0xFFFF
        msg_id = self._next_id
        header = p.HEADER.pack(msg_id, command, p.HEADER_SIZE + len(payload), flags, 0)
        self.send_raw(header + payload, fds)
        while True:
            reply = self._read()
            if not reply.header.is_reply:
                self._serve_dma(reply)
                continue
            if reply.header.msg_id != msg_id:
                continue
            if check and reply.header.flags & p.FLAG_ERROR:
                raise ClientError(command, reply.header.error)
            return reply

    def _serve_dma(self, msg: ClientReply) -> None:
        h = msg.header
        address, count = p.DMA_ACCESS.unpack_from(msg.payload)
        base, buf = self._remote_buffer(address, count)
        if buf is None:
            self.send_raw(p.error_header(h.msg_id, h.command, 14))  # EFAULT
            return
        off = address - base
        if h.command == p.Command.DMA_READ:
            body = p.DMA_ACCESS.pack(address, count) + bytes(buf[off : off + count])
        else:
            buf[off : off + count] = msg.payload[p.DMA_ACCESS.size :]
            body = p.DMA_ACCESS.pack(address, count)
        self.send_raw(p.reply_header(h.msg_id, h.command, len(body)) + body)

    def _remote_buffer(self, address: int, count: int) -> tuple[int, bytearray | None]:
        for base, buf in self.remote_memory.items():
            if base <= address and address + count <= base + len(buf):
                return base, buf
        return 0, None

    # -- conveniences ---------------------------------------------------------------------------

    def negotiate(self, caps: dict[str, object] | None = None) -> p.Capabilities:
        """VERSION with QEMU-like capabilities; returns the server's."""
        proposal = caps if caps is not None else {
            "max_msg_fds": 16, "max_data_xfer_size": 1 << 20, "max_dma_maps": 65535,
            "pgsizes": 4096, "write_multiple": True,
        }
        body = p.VERSION.pack(0, 0) + json.dumps({"capabilities": proposal}).encode() + b"\0"
        reply = self.request(p.Command.VERSION, body)
        self.server_caps = p.parse_capabilities(reply.payload[p.VERSION.size :])
        return self.server_caps

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """REGION_READ; returns the data."""
        reply = self.request(p.Command.REGION_READ, p.REGION_ACCESS.pack(offset, index, count))
        return reply.payload[p.REGION_ACCESS.size :]

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """REGION_WRITE."""
        self.request(p.Command.REGION_WRITE, p.REGION_ACCESS.pack(offset, index, len(data)) + data)

    def dma_map(self, address: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = p.DMA_FLAG_READ | p.DMA_FLAG_WRITE) -> None:
        """DMA_MAP, with an fd to mmap or without (remote DMA)."""
        body = p.DMA_MAP.pack(p.DMA_MAP.size, flags, offset, address, size)
        self.request(p.Command.DMA_MAP, body, [fd] if fd is not None else [])

    def dma_unmap(self, address: int, size: int) -> None:
        """DMA_UNMAP of exactly a mapped range."""
        self.request(p.Command.DMA_UNMAP, p.DMA_UNMAP.pack(p.DMA_UNMAP.size, 0, address, size))

    def set_irqs(self, index: int, start: int, count: int, flags: int,
                 fds: list[int] | tuple[int, ...] = (), data: bytes = b"") -> None:
        """DEVICE_SET_IRQS."""
        body = p.IRQ_SET.pack(p.IRQ_SET.size + len(data), flags, index, start, count) + data
        self.request(p.Command.DEVICE_SET_IRQS, body, fds)
