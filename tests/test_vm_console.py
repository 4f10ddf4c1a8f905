"""The console session against a stand-in for QEMU's console socket and a real log file."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import termios
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import ConflictError
from egpu.vm import console, store

WAIT_S = 10.0


@dataclass
class FakeChardev:
    """QEMU's console socket as seen from a client: one client at a time, all bytes recorded."""

    listener: socket.socket
    connections: list[bytearray] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            received = bytearray()
            with self.lock:
                self.connections.append(received)
            with conn:
                # what the guest printed, which the session must read and drop (a session that
                # already left cannot take it)
                with contextlib.suppress(OSError):
                    conn.sendall(b"echoed by the guest\r\n")
                # a client that leaves with output unread resets the connection (as to QEMU)
                with contextlib.suppress(ConnectionResetError):
                    while chunk := conn.recv(4096):
                        with self.lock:
                            received += chunk

    def received(self) -> list[bytes]:
        with self.lock:
            return [bytes(c) for c in self.connections]

    def wait_received(self, total: int) -> list[bytes]:
        deadline = time.monotonic() + WAIT_S
        while sum(map(len, self.received())) < total:
            assert time.monotonic() < deadline, self.received()
            time.sleep(0.01)
        return self.received()


@pytest.fixture
def vm(egpu_home: Path) -> store.VmDir:
    vm = store.VmDir("con")
    vm.create()
    vm.serial_log.write_bytes(b"")
    return vm


@pytest.fixture
def chardev(vm: store.VmDir) -> Iterator[FakeChardev]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(vm.console_socket))
    listener.listen(1)
    fake = FakeChardev(listener)
    thread = threading.Thread(target=fake.serve, daemon=True)
    thread.start()
    yield fake
    listener.shutdown(socket.SHUT_RDWR)
    listener.close()
    thread.join(WAIT_S)


@pytest.fixture
def screen() -> Iterator[tuple[int, int]]:
    """A pipe standing for the terminal: (read end, write end)."""
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        os.close(fd)


def drain(fd: int) -> bytes:
    out = bytearray()
    try:
        while chunk := os.read(fd, 65536):
            out += chunk
    except BlockingIOError:
        pass
    return bytes(out)


@given(st.binary(), st.binary())
def test_split_at_detach_keeps_what_came_before_the_key(before: bytes, after: bytes) -> None:
    before = before.replace(console.DETACH_KEY, b"")
    assert console.split_at_detach(before) == (before, False)
    assert console.split_at_detach(before + console.DETACH_KEY + after) == (before, True)


def test_every_typed_byte_goes_over_one_connection_until_the_detach_key(
        vm: store.VmDir, chardev: FakeChardev, screen: tuple[int, int]) -> None:
    # Ctrl-C, escape sequences (a terminal's cursor-position reply) and a paste far beyond the
    # UART's 16-byte FIFO, typed in several reads: all of it, in order, on one connection
    typed = [b"echo the''re\r", b"\x03", b"\x1b[10;5R", b"x" * 100_000 + b"\r", b"ls\r"]
    keyboard_r, keyboard_w = os.pipe()

    def type_all() -> None:
        for keys in (*typed, b"tail" + console.DETACH_KEY + b"never sent"):
            os.write(keyboard_w, keys)

    feeder = threading.Thread(target=type_all)
    feeder.start()
    try:
        outcome = console.attach(vm, keyboard=keyboard_r, screen=screen[1], ended=lambda: False)
    finally:
        feeder.join(WAIT_S)
        os.close(keyboard_r)
        os.close(keyboard_w)
    assert outcome is console.Outcome.DETACHED
    expected = b"".join(typed) + b"tail"
    received = chardev.wait_received(len(expected))
    assert received == [expected]


def test_output_comes_from_the_log_once_from_the_given_offset(
        vm: store.VmDir, screen: tuple[int, int]) -> None:
    vm.serial_log.write_bytes(b"before the session\r\n")
    offset = console.log_end(vm)
    calls = 0

    def ended() -> bool:
        # the guest prints more, then its VM ends: the session shows all of it and returns
        nonlocal calls
        calls += 1
        with vm.serial_log.open("ab") as log:
            log.write(b"line %d\r\n" % calls)
        return calls == 3

    outcome = console.attach(vm, keyboard=None, screen=screen[1], ended=ended, log_offset=offset)
    assert outcome is console.Outcome.ENDED
    assert drain(screen[0]) == b"line 1\r\nline 2\r\nline 3\r\n"


def test_a_second_typing_session_is_refused(vm: store.VmDir, chardev: FakeChardev,
                                            screen: tuple[int, int]) -> None:
    keyboard_r, keyboard_w = os.pipe()
    try:
        with console.console_lock(vm), pytest.raises(ConflictError, match="already has a console"):
            console.attach(vm, keyboard=keyboard_r, screen=screen[1], ended=lambda: False)
    finally:
        os.close(keyboard_r)
        os.close(keyboard_w)
    assert chardev.received() == []  # it never connected


def test_end_of_input_and_a_vanished_screen_end_the_session(
        vm: store.VmDir, chardev: FakeChardev, screen: tuple[int, int]) -> None:
    keyboard_r, keyboard_w = os.pipe()
    os.write(keyboard_w, b"uptime\r")
    os.close(keyboard_w)
    try:
        outcome = console.attach(vm, keyboard=keyboard_r, screen=screen[1], ended=lambda: False)
    finally:
        os.close(keyboard_r)
    assert outcome is console.Outcome.INPUT_CLOSED
    assert chardev.wait_received(len(b"uptime\r")) == [b"uptime\r"]  # typed before the end

    vm.serial_log.write_bytes(b"output nobody reads\r\n")
    reader_gone_r, reader_gone_w = os.pipe()
    os.close(reader_gone_r)
    try:
        outcome = console.attach(vm, keyboard=None, screen=reader_gone_w, ended=lambda: False)
    finally:
        os.close(reader_gone_w)
    assert outcome is console.Outcome.HUNG_UP


@pytest.fixture
def terminal() -> Iterator[int]:
    """The terminal end of a pseudo-terminal pair."""
    controller, terminal = os.openpty()
    yield terminal
    os.close(terminal)
    os.close(controller)


def test_raw_mode_for_the_session_and_the_terminal_restored_on_every_way_out(
        terminal: int) -> None:
    before = termios.tcgetattr(terminal)
    with console.raw_terminal(terminal):
        lflag = termios.tcgetattr(terminal)[3]
        # no local echo, no line buffering, Ctrl-C and Ctrl-Z are bytes for the guest
        assert lflag & (termios.ECHO | termios.ICANON | termios.ISIG) == 0
    assert termios.tcgetattr(terminal) == before

    with pytest.raises(RuntimeError), console.raw_terminal(terminal):
        raise RuntimeError("a failure inside the session")
    assert termios.tcgetattr(terminal) == before

    previous = signal.getsignal(signal.SIGHUP)
    with pytest.raises(console.Signalled) as caught, console.signals_raise(signal.SIGHUP), \
            console.raw_terminal(terminal):
        signal.raise_signal(signal.SIGHUP)
    assert caught.value.signum == signal.SIGHUP
    assert termios.tcgetattr(terminal) == before
    assert signal.getsignal(signal.SIGHUP) == previous
