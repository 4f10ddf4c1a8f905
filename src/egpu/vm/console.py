"""A VM's serial console for a person: keystrokes in over one connection held for the session,
the guest's output shown from its console log."""

# Why this shape (measured against QEMU 11): QEMU's socket chardev serves one client at a time
# and, when a client hangs up, drops the bytes the UART has not taken yet (a 16-byte FIFO), so
# a connection per line lost all but 16 bytes. QEMU's logfile= gets every byte whether or not
# anyone is connected, so output read from the log appears once and nothing printed while
# detached is missed. The connection's own copy of the output is read and dropped: left unread
# it would fill the socket and stall the guest's UART.

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import termios
import time
import tty
from collections.abc import Callable, Iterator
from types import FrameType
from typing import BinaryIO

from egpu.errors import ConflictError, VMError
from egpu.vm import store

DETACH_KEY = b"\x1d"  # Ctrl-], as in telnet and virsh
DETACH_KEY_NAME = "Ctrl-]"
LOCK_FILE = "console.lock"  # held by the session that types into the console
POLL_S = 0.05  # how often the log is read when the guest is quiet
ENDED_CHECK_S = 0.5  # how often the VM is asked whether it ended (a status costs a QMP call)
READ_SIZE = 65536
FLUSH_TIMEOUT_S = 2.0  # for keystrokes typed just before the detach key
# the screen or keyboard went away: a closed terminal (EIO) or a closed pipe (EPIPE)
GONE_ERRNOS = (errno.EIO, errno.EPIPE, errno.ENXIO)
_C_INT = struct.Struct("i")  # the ioctl's argument


class Outcome(enum.Enum):
    """How a console session ended."""

    DETACHED = "detached"  # the detach key was typed
    ENDED = "ended"  # the VM's QEMU ended
    INPUT_CLOSED = "input closed"  # the keyboard reached end of file (a pipe)
    HUNG_UP = "hung up"  # the terminal (or the reader of the output) went away


class Signalled(BaseException):
    """A signal that ends a console session arrived; raised from its handler, like Ctrl-C."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def split_at_detach(typed: bytes) -> tuple[bytes, bool]:
    """The bytes typed before the detach key, and whether it was typed (what follows is dropped)."""
    head, key, _ = typed.partition(DETACH_KEY)
    return head, bool(key)


@contextlib.contextmanager
def signals_raise(*signums: int) -> Iterator[None]:
    """Turn these signals into :class:`Signalled` in the main thread while the block runs."""
    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Signalled(signum)

    previous = {s: signal.signal(s, handler) for s in signums}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Put a terminal in raw mode for the block and restore it on every way out."""
    # raw: no local echo (the guest echoes), no line buffering, Ctrl-C a byte for the guest
    saved = termios.tcgetattr(fd)
    tty.setraw(fd, termios.TCSANOW)
    try:
        yield
    finally:
        # a hung-up terminal refuses (EIO); there is nothing left to restore then
        with contextlib.suppress(termios.error, OSError):
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def console_lock(vm: store.VmDir) -> Iterator[None]:
    """Hold the VM's console for one typing session (a second would wait unseen in QEMU)."""
    fd = os.open(vm.file(LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConflictError(f"VM {vm.name!r} already has a console attached",
                                hint=f"detach that one with {DETACH_KEY_NAME}") from None
        yield
    finally:
        os.close(fd)


def _connect(vm: store.VmDir) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(vm.console_socket))
    except OSError as e:
        sock.close()
        raise VMError(f"cannot connect to VM {vm.name!r}'s console: {e.strerror or e}") from e
    sock.setblocking(False)
    return sock


def _unread(sock: socket.socket) -> int:
    """Bytes sent on a UNIX socket that its peer has not read yet."""
    (count,) = _C_INT.unpack(fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, _C_INT.pack(0)))
    return int(count)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class _Session:
    """One attached session's state: the log position, the connection, keystrokes not yet sent."""

    def __init__(self, vm: store.VmDir, keyboard: int | None, screen: int,
                 ended: Callable[[], bool]) -> None:
        self.vm, self.keyboard, self.screen, self.ended = vm, keyboard, screen, ended
        self.sock: socket.socket | None = None
        self.pending = bytearray()  # typed, not yet taken by QEMU
        # poll, not epoll: a keyboard redirected from a regular file must work too
        self.selector = selectors.PollSelector()

    def run(self, log_offset: int) -> Outcome:
        with open(self.vm.serial_log, "rb") as log:
            log.seek(log_offset)
            if self.keyboard is not None:
                self.sock = _connect(self.vm)
                self.selector.register(self.keyboard, selectors.EVENT_READ)
            try:
                return self._loop(log)
            finally:
                self.selector.close()
                if self.sock is not None:
                    self.sock.close()

    def _loop(self, log: BinaryIO) -> Outcome:
        next_check = 0.0
        while True:
            self._watch_socket()
            for key, events in self.selector.select(POLL_S):
                outcome = self._on_ready(key.fd, events)
                if outcome is not None:
                    return outcome
            if not self._show(log):
                return Outcome.HUNG_UP
            now = time.monotonic()
            if now >= next_check:
                next_check = now + ENDED_CHECK_S
                if self.ended():
                    return Outcome.ENDED if self._show(log) else Outcome.HUNG_UP

    def _watch_socket(self) -> None:
        if self.sock is None:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if self.pending else 0)
        try:
            self.selector.modify(self.sock, events)
        except KeyError:
            self.selector.register(self.sock, events)

    def _on_ready(self, fd: int, events: int) -> Outcome | None:
        if fd == self.keyboard:
            return self._on_keys()
        assert self.sock is not None
        try:
            if events & selectors.EVENT_READ and not self.sock.recv(READ_SIZE):
                self._drop_socket()  # QEMU closed it: the VM is ending
                return None
            if events & selectors.EVENT_WRITE:
                del self.pending[:self.sock.send(self.pending)]
        except BlockingIOError:
            pass
        except OSError:
            self._drop_socket()
        return None

    def _on_keys(self) -> Outcome | None:
        assert self.keyboard is not None
        try:
            typed = os.read(self.keyboard, READ_SIZE)
        except OSError as e:
            if e.errno in GONE_ERRNOS:
                return Outcome.HUNG_UP
            raise
        if not typed:
            self._flush()
            return Outcome.INPUT_CLOSED
        keys, detach = split_at_detach(typed)
        if self.sock is not None:
            self.pending += keys
        if not detach:
            return None
        self._flush()
        return Outcome.DETACHED

    def _flush(self) -> None:
        """Hand QEMU what was typed before the session ends (waiting at most a little)."""
        if self.sock is None or not self.pending:
            return
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        self.sock.settimeout(FLUSH_TIMEOUT_S)
        with contextlib.suppress(OSError):
            self.sock.sendall(self.pending)
            # QEMU drops what it has not read when the client hangs up: close only once the
            # socket holds nothing unread (SIOCOUTQ: bytes queued to the peer, not yet taken)
            while _unread(self.sock) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        self.pending.clear()

    def _drop_socket(self) -> None:
        assert self.sock is not None
        self.selector.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.pending.clear()

    def _show(self, log: BinaryIO) -> bool:
        """Copy what the log gained to the screen; False when the screen is gone."""
        while chunk := log.read(READ_SIZE):
            try:
                _write_all(self.screen, chunk)
            except OSError as e:
                if e.errno in GONE_ERRNOS:
                    return False
                raise
        return True


def log_end(vm: store.VmDir) -> int:
    """Where the console log ends now (a session started there shows only what comes next)."""
    try:
        return vm.serial_log.stat().st_size
    except FileNotFoundError:
        return 0


def attach(vm: store.VmDir, *, keyboard: int | None, screen: int, ended: Callable[[], bool],
           log_offset: int = 0) -> Outcome:
    """Show the console log from ``log_offset`` on ``screen``; send every byte ``keyboard`` gives
    to the guest; until detach, the VM's end, or either side going away."""
    # signals that end the session are the caller's: they arrive as exceptions (Ctrl-C,
    # Signalled) and leave through here with the connection closed
    if keyboard is None:
        return _Session(vm, None, screen, ended).run(log_offset)
    with console_lock(vm):
        return _Session(vm, keyboard, screen, ended).run(log_offset)
