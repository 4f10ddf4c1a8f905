"""Port forwarding, the I/O edge: the supervisor's loop that keeps QEMU's forwards in step.

Each round reads the guest's TCP tables (through the guest agent), plans and reconciles with
the pure core (``vm/ports.py``), checks a host port is free before adding it, and changes
QEMU's user network over QMP (HMP ``hostfwd_add`` / ``hostfwd_remove``). The table goes to
``ports.json`` whenever it changes. A failing round is logged and the next one tries again:
nothing the guest says can end the supervisor.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

from egpu.engine.argv import (
    FORWARD_HOST_ADDRESS,
    GUEST_SSH_PORT,
    NETDEV_ID,
    hostfwd_host,
    hostfwd_rule,
)
from egpu.errors import AgentError, EgpuError
from egpu.vm import agent, docker_api, ports, qmp, store

POLL_S = 1.0  # how often the guest's listeners are read; a new service appears within this
HMP_TIMEOUT_S = 2.0
MIN_GAP_FRACTION = 0.25  # of POLL_S, left between two rounds however long the first took
MAX_REPLY_CHARS = 200  # of QEMU's reply text kept in a reason
# HMP answers hostfwd_add with an empty string on success and error text otherwise; slirp's
# own bind failure reads like this (net/slirp.c, slirp_hostfwd).
SLIRP_BIND_FAILED = "could not set up host forwarding rule"
REMOVED_REPLIES = ("removed", "not found")  # hostfwd_remove: either way, it is gone

# A Docker VM's published container ports as the docker watcher last saw them (vm/docker_mirror.py)
DockerMirrors = Callable[[], tuple[ports.Mirror, ...]]
# The guest's /proc/net/tcp and /proc/net/tcp6 texts (at most ports.MAX_TABLE_BYTES each);
# raises EgpuError or OSError when the guest cannot be asked.
GuestTables = Callable[[], tuple[str, str]]
Log = Callable[[str], None]
NO_AGENT = "no guest agent to read the guest's listening sockets from"
AGENT_TIMEOUT_S = 2.0  # a round waits no longer for the guest (a guest without qemu-ga: each round)
PROC_NET_TCP = "/proc/net/tcp"
PROC_NET_TCP6 = "/proc/net/tcp6"  # absent in a guest without IPv6


class CappedSink(io.BytesIO):
    """Collects a guest file; more than ``limit`` bytes is an AgentError, not memory."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: bytes) -> int:  # type: ignore[override]
        if self.tell() + len(data) > self.limit:
            raise AgentError(f"the guest sent more than {self.limit} bytes of a TCP table")
        return super().write(data)


def _read_table(client: agent.AgentClient, path: str) -> str:
    sink = CappedSink(ports.MAX_TABLE_BYTES)
    client.read_file(path, sink)
    return sink.getvalue().decode("ascii", errors="replace")


def agent_tables(agent_socket: Path) -> GuestTables:
    """Read the guest's TCP tables through its agent (guest-file-open / guest-file-read)."""
    def read() -> tuple[str, str]:
        with agent.connect(agent_socket, timeout=AGENT_TIMEOUT_S) as client:
            tcp = _read_table(client, PROC_NET_TCP)
            try:
                tcp6 = _read_table(client, PROC_NET_TCP6)
            except AgentError:
                tcp6 = ""
        return tcp, tcp6
    return read


def host_port_busy(port: int) -> str | None:
    """Why 127.0.0.1:port cannot be forwarded from (something holds it), or None when free.

    SO_REUSEADDR as slirp sets it, so a port in TIME_WAIT is free, a listener's is not.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((FORWARD_HOST_ADDRESS, port))
        except OSError as e:
            return f"host port {port} is in use ({e.strerror or e})"
    return None


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return "".join(c if c.isprintable() else "?" for c in line[:MAX_REPLY_CHARS])


class Forwarder:
    """One VM's forwards: what is installed in QEMU and why the rest are not."""

    def __init__(self, vm: store.VmDir, config: store.VmConfig,
                 guest_tables: GuestTables | None, log: Log,
                 docker: DockerMirrors | None = None) -> None:
        self.vm = vm
        self.docker = docker
        # the Docker VM's guest-side API port is never forwarded to a host TCP port
        self.private = frozenset({docker_api.GUEST_API_PORT}) if config.docker else frozenset()
        self.wake = threading.Event()  # set when the docker watcher sees a change
        self.static = list(config.ports)
        self.ssh_port = config.ssh_port
        self.automatic = config.port_forwarding
        self.guest_tables = guest_tables
        self.log = log
        # host port -> guest port as QEMU has them; the ssh forward is on its command line
        self.installed: dict[int, int] = {}
        if self.ssh_port is not None:
            self.installed[self.ssh_port] = GUEST_SSH_PORT
        self.problems: dict[int, ports.Problem] = {}
        self.listeners: dict[int, ports.Reach] = {}
        self.guest_error: str | None = None
        self.last: ports.PortTable | None = None

    def _hmp(self, command: str) -> str:
        reply = qmp.execute(self.vm.qmp_socket, "human-monitor-command",
                            {"command-line": command}, timeout=HMP_TIMEOUT_S)
        return reply if isinstance(reply, str) else ""

    def _read_guest(self) -> None:
        if not self.automatic:
            return
        if self.guest_tables is None:
            self.guest_error = NO_AGENT
            return
        try:
            tables = self.guest_tables()
        except (EgpuError, OSError, ValueError) as e:
            # keep the last listeners: a guest that is slow to answer keeps its forwards
            self.guest_error = _short(str(e)) or type(e).__name__
            return
        self.listeners = ports.listening_ports(*tables)
        self.guest_error = None

    def _add(self, want: ports.Want) -> None:
        busy = host_port_busy(want.host_port)
        if busy is not None:
            self.problems[want.host_port] = ports.Problem("conflict", busy)
            return
        rule = hostfwd_rule(want.host_port, want.guest_port)
        reply = self._hmp(f"hostfwd_add {NETDEV_ID} {rule}")
        if not reply.strip():
            self.installed[want.host_port] = want.guest_port
            self.problems.pop(want.host_port, None)
        elif SLIRP_BIND_FAILED in reply.lower():
            self.problems[want.host_port] = ports.Problem(
                "conflict", f"host port {want.host_port} is in use (QEMU: {_short(reply)})")
        else:
            self.problems[want.host_port] = ports.Problem("failed", f"QEMU: {_short(reply)}")

    def _remove(self, host_port: int) -> None:
        reply = self._hmp(f"hostfwd_remove {NETDEV_ID} {hostfwd_host(host_port)}")
        if any(word in reply for word in REMOVED_REPLIES):
            del self.installed[host_port]
        else:
            self.log(f"ports: removing host port {host_port}: QEMU: {_short(reply)}")

    def step(self) -> ports.PortTable:
        """One round: read the guest, change QEMU's forwards, record the table."""
        self._read_guest()
        mirrors = self.docker() if self.docker is not None else ()
        wanted, skipped = ports.plan(self.listeners, static=self.static, ssh_port=self.ssh_port,
                                     automatic=self.automatic, docker=mirrors,
                                     private=self.private)
        actions = ports.reconcile(wanted, self.installed,
                                  fixed=[self.ssh_port] if self.ssh_port is not None else [])
        for host_port in actions.remove:
            self._remove(host_port)
        for want in actions.add:
            if want.host_port not in self.installed:
                self._add(want)
        hosts = {w.host_port for w in wanted}
        self.problems = {h: p for h, p in self.problems.items() if h in hosts}
        rows = tuple(ports.forward_table(wanted, skipped, self.installed, self.problems))
        table = ports.PortTable(automatic=self.automatic, forwards=rows,
                                guest_error=self.guest_error, updated=time.time())
        if self.last is None or (self.last.forwards, self.last.guest_error) != (
                table.forwards, table.guest_error):
            self.vm.write_ports(table)
            self._log_changes(table)
            self.last = table
        return table

    def _log_changes(self, table: ports.PortTable) -> None:
        before = set(self.last.forwards) if self.last else set()
        for row in table.forwards:
            if row not in before and row.host_port is not None:
                self.log(f"ports: {row.kind} 127.0.0.1:{row.host_port} -> guest :{row.guest_port}"
                         f" {row.state}" + (f": {row.reason}" if row.reason else ""))
        if table.guest_error and (self.last is None or self.last.guest_error != table.guest_error):
            self.log(f"ports: guest listeners unknown: {table.guest_error}")

    def run(self, stop: threading.Event) -> None:
        """Rounds every POLL_S until ``stop`` is set; a failed round is logged, never raised."""
        failure = None
        next_round = time.monotonic()
        while not stop.is_set():
            # rounds start every POLL_S whatever a round costs (guest-agent round trips under
            # TCG take a good part of one), so a new service waits at most one interval
            next_round += POLL_S
            if self.vm.qmp_socket.exists():
                try:
                    self.step()
                    failure = None
                except Exception as e:  # the supervisor must outlive any round
                    why = f"{type(e).__name__}: {_short(str(e))}"
                    if why != failure:  # once per kind of failure, not once a second
                        self.log(f"ports: round failed, retrying every {POLL_S:g}s: {why}")
                    failure = why
            now = time.monotonic()
            # after a round longer than POLL_S (a guest agent timing out), a short breath
            next_round = max(next_round, now + POLL_S * MIN_GAP_FRACTION)
            # a container port changing starts the next round at once (stop sets wake too)
            if self.wake.wait(next_round - now):
                self.wake.clear()
                next_round = time.monotonic()
