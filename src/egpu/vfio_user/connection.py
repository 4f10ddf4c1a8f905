"""One vfio-user client connection: framing with fds, the request loop, sending replies.

Framing faults (a size smaller than the header or larger than the largest legal message) close
the connection; everything inside a well-framed message is the dispatcher's to check.
"""

from __future__ import annotations

import array
import collections
import contextlib
import errno
import logging
import os
import socket
import threading
from typing import Protocol

from egpu.vfio_user import protocol as p
from egpu.vfio_user.dispatcher import NO_FDS, Dispatcher, Payload, Reply

log = logging.getLogger("egpu.vfio_user")

_FD_SIZE = array.array("i").itemsize
_HEADER_UNPACK_FROM = p.HEADER.unpack_from
_HEADER_SIZE = p.HEADER_SIZE
_FLAG_TYPE_MASK = p.FLAG_TYPE_MASK
_FLAG_NO_REPLY = p.FLAG_NO_REPLY
# Plain ints: socket's IntFlag members cost an enum call per use on the hot path.
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
_MSG_CMSG_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)

# One framed message: msg_id, command, flags, errno, payload (may alias the receive buffer),
# fds, fds-truncated. A plain tuple: this is built once per request on the hot path.
Message = tuple[int, int, int, int, Payload, list[int], bool]


class ReplySink(Protocol):
    """Where replies from the client go (server-to-client DMA waits on them)."""

    def route_reply(self, header: p.Header, payload: bytes) -> None:
        """Hand a reply from the client to whoever sent the command."""

    def connection_closed(self) -> None:
        """Wake every waiter: no more replies will come."""


class Connection:
    """One client socket: reads framed messages, runs the dispatcher, sends replies.

    Reads are buffered: one recvmsg takes whatever the client has sent, so a request usually
    costs one receive and one send. Linux ends a stream read right after the segment that
    carried SCM_RIGHTS fds, so the fds of a read belong to the message holding its last byte
    (clients attach fds to the sendmsg that starts a message, as QEMU does).
    """

    BUFFER_SIZE = 64 * 1024

    def __init__(self, sock: socket.socket, dispatcher: Dispatcher, replies: ReplySink) -> None:
        self.sock = sock
        self.dispatcher = dispatcher
        self.replies = replies
        self._send_lock = threading.Lock()
        self._cmsg_space = socket.CMSG_SPACE(dispatcher.caps.max_msg_fds * _FD_SIZE)
        self.loop_thread = threading.get_ident()
        self._buf = bytearray(self.BUFFER_SIZE)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        # (buffer position of the last byte of a read, its fds, truncated) in arrival order
        self._fd_marks: collections.deque[tuple[int, list[int], bool]] = collections.deque()
        self._deferred: collections.deque[Message] = collections.deque()
        self._max_message = dispatcher.max_message
        self.closed = False

    # -- framing --------------------------------------------------------------------------------

    def _make_room(self, need: int) -> None:
        """Ensure ``need`` bytes fit from the current message start; keeps buffered bytes."""
        avail = self._end - self._start
        if self._start + need <= len(self._buf):
            return
        if need > len(self._buf):
            # A new buffer: payload views handed out earlier keep the old one alive.
            new = bytearray(max(need, self.BUFFER_SIZE))
            new[:avail] = self._view[self._start : self._end]
            self._buf, self._view = new, memoryview(new)
        else:
            self._buf[:avail] = self._buf[self._start : self._end]
        shift = self._start
        self._fd_marks = collections.deque((pos - shift, f, t) for pos, f, t in self._fd_marks)
        self._start, self._end = 0, avail

    def _fill(self) -> None:
        if self._start == self._end and not self._fd_marks:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._make_room(self._end - self._start + 1)
        n, ancdata, msg_flags, _ = self.sock.recvmsg_into(
            [self._view[self._end :]], self._cmsg_space, _MSG_CMSG_CLOEXEC
        )
        fds: list[int] = []
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fa = array.array("i")
                fa.frombytes(cdata[: len(cdata) - len(cdata) % _FD_SIZE])
                fds.extend(fa)
        if n == 0:
            close_all(fds)
            raise EOFError
        self._end += n
        truncated = bool(msg_flags & _MSG_CTRUNC)
        if fds or truncated:
            self._fd_marks.append((self._end - 1, fds, truncated))
            # Fds wait here until their message is complete; a client that keeps sending fds
            # with fragments of one endless message would otherwise exhaust our fd table.
            if sum(len(m[1]) for m in self._fd_marks) > 2 * self.dispatcher.caps.max_msg_fds:
                raise p.ConnectionFault("too many fds pending for incomplete messages")

    def next_message(self) -> Message:
        """The next whole message from the socket (raises EOFError, ConnectionFault, OSError)."""
        while True:
            first = self._start
            avail = self._end - first
            if avail >= _HEADER_SIZE:
                msg_id, command, size, flags, error = _HEADER_UNPACK_FROM(self._buf, first)
                if not _HEADER_SIZE <= size <= self._max_message:
                    raise p.ConnectionFault(f"message size {size} out of bounds")
                if avail >= size:
                    self._start = end = first + size
                    payload = self._view[first + _HEADER_SIZE : end]
                    marks = self._fd_marks
                    if not marks or marks[0][0] >= end:
                        return msg_id, command, flags, error, payload, NO_FDS, False
                    fds: list[int] = []
                    truncated = False
                    while marks and marks[0][0] < end:
                        _pos, mark_fds, mark_trunc = marks.popleft()
                        fds.extend(mark_fds)
                        truncated |= mark_trunc
                    return msg_id, command, flags, error, payload, fds, truncated
                self._make_room(size)
            self._fill()

    def send(self, message: bytes, fds: list[int]) -> None:
        """Send one whole message (fds borrowed) under the send lock."""
        with self._send_lock:
            if fds:
                self.sock.sendmsg(
                    [message], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self.sock.sendall(message)

    # -- loop -----------------------------------------------------------------------------------

    def run(self) -> None:
        """Serve until the client disconnects or the stream breaks."""
        self.loop_thread = threading.get_ident()
        handle = self.dispatcher.handle
        send_lock, sendall = self._send_lock, self.sock.sendall
        try:
            while True:
                msg = self._deferred.popleft() if self._deferred else self.next_message()
                msg_id, command, flags, _error, payload, fds, truncated = msg
                if flags & _FLAG_TYPE_MASK or fds or truncated:
                    self._process_unusual(msg)
                    continue
                # Hot path: a plain command without fds.
                reply, out_fds = handle(msg_id, command, flags, payload, fds)
                if flags & _FLAG_NO_REPLY:
                    continue
                if out_fds:
                    self.send(reply, out_fds)
                else:
                    with send_lock:
                        sendall(reply)
        except (EOFError, ConnectionError):
            log.info("client disconnected")
        except p.ConnectionFault as e:
            log.warning("closing connection: %s", e)
        except OSError as e:
            log.info("connection ended: %s", e)
        finally:
            self.closed = True
            self.replies.connection_closed()
            for msg in self._deferred:
                close_all(msg[5])
            self._deferred.clear()
            for _pos, fds, _trunc in self._fd_marks:
                close_all(fds)
            self._fd_marks.clear()

    def _process_unusual(self, msg: Message) -> None:
        """Replies, unknown message types, and commands that came with fds."""
        msg_id, command, flags, error, payload, fds, truncated = msg
        kind = flags & p.FLAG_TYPE_MASK
        if kind == p.TYPE_REPLY:
            close_all(fds)
            self.replies.route_reply(p.Header(msg_id, command, 0, flags, error), bytes(payload))
            return
        if kind != p.TYPE_COMMAND:
            close_all(fds)
            reply: Reply = (p.error_header(msg_id, command, errno.EINVAL), [])
        elif truncated:
            # More fds than max_msg_fds: the kernel dropped the excess, so refuse the request.
            close_all(fds)
            reply = (p.error_header(msg_id, command, errno.E2BIG), [])
        else:
            try:
                reply = self.dispatcher.handle(msg_id, command, flags, payload, fds)
            finally:
                close_all(fds)
        if not flags & p.FLAG_NO_REPLY:
            self.send(*reply)

    def defer(self, msg: Message) -> None:
        """Keep a command that arrived while a device callback waited for a reply (copied)."""
        self._deferred.append(msg)


def close_all(fds: list[int]) -> None:
    """Close the fds still owned (handlers that keep one leave -1) and empty the list."""
    for fd in fds:
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)
    fds[:] = []
