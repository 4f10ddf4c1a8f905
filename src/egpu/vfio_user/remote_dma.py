"""Server-to-client DMA: DMA_READ / DMA_WRITE for guest memory that came without an fd."""

from __future__ import annotations

import logging
import os
import threading

from egpu.dma import DmaAccessError
from egpu.vfio_user import protocol as p
from egpu.vfio_user.connection import Connection, close_all
from egpu.vfio_user.dispatcher import Dispatcher

log = logging.getLogger("egpu.vfio_user")

REMOTE_DMA_TIMEOUT_S = 10.0
MSG_ID_MASK = 0xFFFF  # the header's msg_id is 16 bits

_Box = list[tuple[p.Header, bytes]]


class RemoteDma:
    """DMA_READ / DMA_WRITE over the current connection, chunked by the client's limit.

    Also the connection's reply sink: replies from the client wake the request that waits.
    """

    def __init__(self) -> None:
        self.connection: Connection | None = None
        self.dispatcher: Dispatcher | None = None
        self._id_lock = threading.Lock()
        self._next_id = 0
        self._waiters: dict[int, tuple[threading.Event, _Box]] = {}

    @property
    def max_xfer(self) -> int:
        """The client's max_data_xfer_size: our DMA_READ/WRITE must not exceed it."""
        # QEMU docs/interop/vfio-user.rst, "Message sizes"
        if self.dispatcher is None:
            return p.DEFAULT_MAX_DATA_XFER_SIZE
        return self.dispatcher.session.client.max_data_xfer_size

    # -- reply sink -------------------------------------------------------------------------------

    def route_reply(self, header: p.Header, payload: bytes) -> None:
        """Hand a reply to the request waiting for its msg_id; others are dropped."""
        waiter = self._waiters.get(header.msg_id)
        if waiter is None:
            log.debug("unexpected reply %d ignored", header.msg_id)
            return
        waiter[1].append((header, payload))
        waiter[0].set()

    def connection_closed(self) -> None:
        """Wake every waiting request: its reply will never come."""
        for event, _box in self._waiters.values():
            event.set()

    # -- requests ---------------------------------------------------------------------------------

    def request(self, command: int, body: bytes) -> bytes:
        """Send a command to the client and return its reply payload (raises DmaAccessError)."""
        conn = self.connection
        if conn is None:
            raise DmaAccessError("no client connected")
        if conn.closed:
            raise DmaAccessError("client is gone")
        with self._id_lock:
            self._next_id = (self._next_id + 1) & MSG_ID_MASK
            msg_id = self._next_id
        event = threading.Event()
        box: _Box = []
        self._waiters[msg_id] = (event, box)
        try:
            conn.send(p.command_header(msg_id, command, len(body)) + body, [])
            if threading.get_ident() == conn.loop_thread:
                # Called from a device callback on the loop thread: read until our reply comes,
                # keeping commands that arrive meanwhile (copied out of the buffer) for later.
                while not box:
                    msg_id_, cmd, flags, error, payload, fds, trunc = conn.next_message()
                    if flags & p.FLAG_TYPE_MASK == p.TYPE_REPLY:
                        close_all(fds)
                        self.route_reply(p.Header(msg_id_, cmd, 0, flags, error), bytes(payload))
                    else:
                        conn.defer((msg_id_, cmd, flags, error, bytes(payload), fds, trunc))
            elif not event.wait(REMOTE_DMA_TIMEOUT_S) or not box:
                raise DmaAccessError("client did not answer a DMA request")
        except (OSError, EOFError, p.ConnectionFault) as e:
            raise DmaAccessError(f"DMA request failed: {e}") from e
        finally:
            self._waiters.pop(msg_id, None)
        reply_hdr, reply_payload = box[0]
        if reply_hdr.flags & p.FLAG_ERROR:
            raise DmaAccessError(f"client refused DMA: {os.strerror(reply_hdr.error)}")
        return reply_payload

    def dma_read(self, address: int, count: int) -> bytes:
        """Read guest memory through the client, in chunks it accepts."""
        out = bytearray()
        while len(out) < count:
            n = min(count - len(out), self.max_xfer)
            reply = self.request(p.Command.DMA_READ, p.DMA_ACCESS.pack(address + len(out), n))
            if len(reply) != p.DMA_ACCESS.size + n:
                raise DmaAccessError("malformed DMA_READ reply")
            out.extend(reply[p.DMA_ACCESS.size :])
        return bytes(out)

    def dma_write(self, address: int, data: bytes) -> None:
        """Write guest memory through the client, in chunks it accepts."""
        for pos in range(0, len(data), self.max_xfer):
            chunk = data[pos : pos + self.max_xfer]
            self.request(p.Command.DMA_WRITE, p.DMA_ACCESS.pack(address + pos, len(chunk)) + chunk)
