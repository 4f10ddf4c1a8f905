"""The forwarder against a real QEMU's user network: the guest's tables go in as text, the
forwards are read back from QEMU itself (``info usernet``) and from the host's sockets."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from egpu.engine.qemu import find_engine
from egpu.errors import VMError
from egpu.vm import forwarder, qmp, store

pytestmark = pytest.mark.qemu

QMP_WAIT_S = 30.0
TCP_HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
ANY4, LOOP4 = "00000000", "0100007F"


def tcp_table(*listeners: tuple[str, int]) -> str:
    lines = [f"{i:4d}: {addr}:{port:04X} 00000000:0000 0A 00000000:00000000 00:00000000 "
             "00000000     0        0 1 1" for i, (addr, port) in enumerate(listeners)]
    return "\n".join([TCP_HEADER, *lines])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def vm() -> Iterator[store.VmDir]:
    """A VM directory whose QMP socket is a real QEMU with a user network (no guest machine)."""
    root = Path(tempfile.mkdtemp(prefix="egpu-f", dir="/tmp"))  # short: a socket lives there
    vmdir = store.VmDir("fwd", root=root)
    vmdir.create()
    engine = find_engine()
    argv = [*engine.qemu("x86_64"), "-M", "none", "-nodefaults", "-display", "none",
            "-netdev", "user,id=net0",
            "-chardev", f"socket,id=qmp,path={vmdir.qmp_socket},server=on,wait=off",
            "-qmp", "chardev:qmp"]
    proc = subprocess.Popen(argv, env={**os.environ, **engine.env()}, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + QMP_WAIT_S
        while qmp.query_status(vmdir.qmp_socket, 2.0) is None:
            assert proc.poll() is None and time.monotonic() < deadline, "QEMU did not come up"
            time.sleep(0.05)
        yield vmdir
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def config(ports: list[tuple[int, int]], automatic: bool = True) -> store.VmConfig:
    return store.VmConfig(name="fwd", arch="x86_64", cpus=1, memory_mib=64, accel="tcg",
                          gpu_path="none", qemu="q", qemu_version="11", argv=["q"],
                          ports=ports, port_forwarding=automatic)


def usernet(vm: store.VmDir) -> dict[int, int]:
    """Host port -> guest port of every forward QEMU holds, as ``info usernet`` shows them."""
    text = qmp.execute(vm.qmp_socket, "human-monitor-command",
                       {"command-line": "info usernet"})
    found = {}
    for line in str(text).splitlines():
        fields = line.split()
        if fields and fields[0] == "TCP[HOST_FORWARD]":
            found[int(fields[3])] = int(fields[5])
    return found


class Guest:
    """What the guest's tables say, changed by the test between rounds."""

    def __init__(self) -> None:
        self.tcp = tcp_table()
        self.error: Exception | None = None

    def __call__(self) -> tuple[str, str]:
        if self.error is not None:
            raise self.error
        return self.tcp, ""


def test_forwards_follow_the_guests_listeners_and_conflicts_are_reported(
        vm: store.VmDir) -> None:
    auto, busy, loop_only, static_host = free_port(), free_port(), free_port(), free_port()
    guest = Guest()
    log: list[str] = []
    fwd = forwarder.Forwarder(vm, config([(static_host, 8080)]), guest, log.append)
    guest.tcp = tcp_table((ANY4, auto), (LOOP4, loop_only), (ANY4, 80), (ANY4, busy))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        table = fwd.step()
        rows = {f.guest_port: f for f in table.forwards}
        assert usernet(vm) == {auto: auto, static_host: 8080}
        assert rows[auto].state == "active" and rows[8080].state == "active"
        assert rows[busy].state == "conflict" and "in use" in (rows[busy].reason or "")
        assert rows[loop_only].state == "guest-loopback" and rows[80].state == "ignored"
        assert forwarder.host_port_busy(auto) is not None  # QEMU holds it on loopback
        assert vm.read_ports() == table
    # the host port is free again: the next round forwards it
    table = fwd.step()
    assert usernet(vm) == {auto: auto, static_host: 8080, busy: busy}
    assert {f.guest_port: f.state for f in table.forwards}[busy] == "active"

    # the guest stops listening: the forward goes, the static one stays
    guest.tcp = tcp_table((ANY4, busy))
    fwd.step()
    assert usernet(vm) == {static_host: 8080, busy: busy}
    assert forwarder.host_port_busy(auto) is None

    # a guest that cannot be asked keeps what it had, and says why
    guest.error = VMError("guest agent did not answer")
    table = fwd.step()
    assert table.guest_error == "guest agent did not answer"
    assert usernet(vm) == {static_host: 8080, busy: busy}
    assert any("conflict" in line for line in log) and any("unknown" in line for line in log)


def test_automatic_forwarding_off_adds_only_static_forwards(vm: store.VmDir) -> None:
    static_host, listener = free_port(), free_port()
    guest = Guest()
    guest.tcp = tcp_table((ANY4, listener))
    table = forwarder.Forwarder(vm, config([(static_host, 22)], automatic=False), guest,
                                lambda _: None).step()
    assert usernet(vm) == {static_host: 22}
    assert [(f.kind, f.host_port, f.state) for f in table.forwards] == [
        ("static", static_host, "active")]
    assert table.automatic is False and table.guest_error is None


def test_a_failing_round_never_ends_the_loop(vm: store.VmDir) -> None:
    listener = free_port()
    calls = 0
    stop = threading.Event()

    def hostile() -> tuple[str, str]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a bug in a reader")  # not an expected error: the round fails
        if calls == 2:
            return "\x00" * 1000 + "garbage\n" * 50, "\xff"  # nonsense parses to nothing
        return tcp_table((ANY4, listener)), ""

    log: list[str] = []
    fwd = forwarder.Forwarder(vm, config([]), hostile, log.append)
    thread = threading.Thread(target=fwd.run, args=(stop,), daemon=True)
    thread.start()
    try:
        wait(lambda: usernet(vm) == {listener: listener})
    finally:
        stop.set()
        thread.join(10)
    assert not thread.is_alive()
    assert any("round failed" in line and "a bug in a reader" in line for line in log)


def wait(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)
