"""Port forwarding end to end: the built-in guest under real QEMU (TCG), its services reached
from the host on 127.0.0.1, the forwards listed by ``egpu ports``."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Cli
from egpu.vm.forwarder import host_port_busy

pytestmark = pytest.mark.qemu

BOOT_TIMEOUT_S = 120
FORWARD_WAIT_S = 10.0  # the promise: a guest service shows on the host within 10 s
GREETING = "egpu-ports-greeting"
AGENT_WAIT_S = 120.0  # qemu-ga starts after the ready marker, under TCG on shared cores
SERVICE_PORT = 8123  # the example; another free port if the host holds this one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def boot(cli: Cli, name: str, *extra: str) -> Path:
    proc = cli("run", "--name", name, "--accel", "tcg", "--detach", "--gpu", "none", *extra)
    assert proc.returncode == 0, proc.stderr
    cli.wait_for(name, lambda s: s["guest_ready"], timeout=BOOT_TIMEOUT_S)
    return cli.home / "data" / "vms" / name


def http_get(port: int, timeout: float = 3.0) -> str | None:
    """The response to GET / on 127.0.0.1:port, or None when nothing answers there."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"GET / HTTP/1.0\r\nHost: localhost\r\n\r\n")
            chunks = []
            while chunk := s.recv(4096):
                chunks.append(chunk)
    except OSError:
        return None
    return b"".join(chunks).decode(errors="replace") or None


def wait_until(pred: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g}s"
        time.sleep(0.1)


def forwards(cli: Cli, name: str) -> dict[tuple[str, int | None], dict[str, Any]]:
    doc = cli.json("ports", name)
    return {(f["kind"], f["host_port"]): f for f in doc["forwards"]}


def test_static_forwards_answer_and_a_busy_host_port_is_a_conflict(cli: Cli) -> None:
    static, busy, ssh = free_port(), free_port(), free_port()
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        boot(cli, "web", "--port", f"{static}:8080", "--port", f"{busy}:8080",
                  "--ssh-port", str(ssh), "--no-port-forwarding")
        in_guest(cli, "web", f"mkdir -p /tmp/w && echo {GREETING} > /tmp/w/index.html && "
                             "httpd -p 8080 -h /tmp/w")
        body = wait_until(lambda: http_get(static), FORWARD_WAIT_S, "the static forward")
        assert GREETING in body
        rows = wait_until(lambda: (r := forwards(cli, "web")).get(("static", busy)) and r,
                          FORWARD_WAIT_S, "the port table")
        assert rows[("static", static)]["state"] == "active"
        assert rows[("ssh", ssh)] == {"host_port": ssh, "guest_port": 22, "kind": "ssh",
                                      "state": "active", "reason": None}
        conflict = rows[("static", busy)]
        assert conflict["state"] == "conflict"
        assert f"host port {busy} is in use" in conflict["reason"]
        assert cli.status("web")["state"] == "running"  # a busy port is reported, not fatal
        doc = cli.json("ports", "web")
        assert doc["automatic"] is False and doc["state"] == "running"
        # the guest listens on 8080, but nothing forwards it automatically
        assert [f["kind"] for f in doc["forwards"]] == ["ssh", "static", "static"]
        text = cli("ports", "web", check=True)
        assert "conflict" in text.stdout and "automatic forwarding is off" in text.stderr
    # the host port is free again: the next round takes it
    wait_until(lambda: forwards(cli, "web")[("static", busy)]["state"] == "active",
               FORWARD_WAIT_S, "the freed host port")
    assert GREETING in (http_get(busy) or "")
    cli("stop", "web", "--force", check=True)
    stopped = cli.json("ports", "web")
    assert stopped["state"] == "stopped" and stopped["forwards"] == []
    assert http_get(static, timeout=1.0) is None


def in_guest(cli: Cli, name: str, script: str) -> None:
    """Run a shell script in the guest with ``egpu exec`` (waiting for qemu-ga to come up)."""
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        proc = cli("exec", name, "--", "/bin/sh", "-c", script)
        if proc.returncode == 0:
            return
        # before qemu-ga answers, exec says so; anything else is the script's own failure
        assert "agent" in proc.stderr and time.monotonic() < deadline, proc.stderr
        time.sleep(0.5)


def auto_rows(cli: Cli, name: str) -> dict[int, dict[str, Any]]:
    """Automatic rows of ``egpu ports`` by guest port."""
    return {f["guest_port"]: f for f in cli.json("ports", name)["forwards"] if f["kind"] == "auto"}


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def test_a_guest_service_appears_on_the_host_and_goes_when_it_stops(cli: Cli) -> None:
    port = SERVICE_PORT if host_port_busy(SERVICE_PORT) is None else free_port()
    busy, loop_only = free_port(), free_port()
    boot(cli, "auto")
    in_guest(cli, "auto", f"mkdir -p /tmp/w && echo {GREETING} > /tmp/w/index.html")
    in_guest(cli, "auto", f"httpd -p {port} -h /tmp/w")
    body = wait_until(lambda: http_get(port), FORWARD_WAIT_S, "the automatic forward")
    assert GREETING in body
    assert auto_rows(cli, "auto")[port] == {"host_port": port, "guest_port": port,
                                            "kind": "auto", "state": "active", "reason": None}

    # the service stops: the forward goes, and the host port with it
    in_guest(cli, "auto", "killall httpd")  # the only one running in the guest
    wait_until(lambda: port not in auto_rows(cli, "auto"), FORWARD_WAIT_S, "the forward gone")
    assert refused(port) and host_port_busy(port) is None

    # a host port in use is a conflict, the VM keeps running; freed, it is forwarded
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", busy))
        holder.listen()
        in_guest(cli, "auto", f"httpd -p {busy} -h /tmp/w; "
                              f"httpd -p 127.0.0.1:{loop_only} -h /tmp/w; httpd -p 80 -h /tmp/w")
        # the three start one after another: a poll between them sees only the first ones
        rows = wait_until(lambda: (r := auto_rows(cli, "auto")).keys() >= {busy, loop_only, 80}
                          and r, FORWARD_WAIT_S, "the conflict and the two unforwardable")
        assert rows[busy]["state"] == "conflict" and "in use" in rows[busy]["reason"]
        assert rows[loop_only]["state"] == "guest-loopback" and rows[loop_only]["host_port"] is None
        assert rows[80]["state"] == "ignored" and rows[80]["host_port"] is None
        assert cli.status("auto")["state"] == "running"
    wait_until(lambda: auto_rows(cli, "auto")[busy]["state"] == "active", FORWARD_WAIT_S,
               "the freed host port")
    assert GREETING in (http_get(busy) or "")
    cli("stop", "auto", "--force", check=True)
