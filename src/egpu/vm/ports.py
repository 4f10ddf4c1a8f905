"""Port forwarding, the pure core: the guest's listening sockets in, forwards and their states out.

The guest's ``/proc/net/tcp`` and ``/proc/net/tcp6`` are the source of truth (Lima's guest agent
reads the same tables); they are untrusted text, parsed with every count, length and field
bounded. ``plan`` decides which host ports should forward where, ``reconcile`` what to add and
remove, and ``PortTable`` is the record ``egpu ports`` reads.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from egpu.engine.argv import GUEST_SSH_PORT, MAX_PORT

MIN_PORT = 1
FIRST_UNPRIVILEGED_PORT = 1024  # guest services below this are system ones (sshd, dns, ...)

# Linux include/net/tcp_states.h: TCP_LISTEN = 10, printed "%02X" in /proc/net/tcp.
TCP_LISTEN = "0A"
# A table of a guest with many sockets is read up to this many entries; the rest is dropped.
MAX_TABLE_LINES = 4096
# net/ipv4/tcp_ipv4.c pads each tcp line to 150 bytes (tcp6 lines are about 180).
MAX_LINE_CHARS = 256
# A guest listening on thousands of ports gets this many automatic forwards (each is a host
# socket), the rest are listed as ignored.
MAX_AUTO_FORWARDS = 128
# What the host reads of each file: lines x their length, so a hostile guest cannot make the
# supervisor buffer more.
MAX_TABLE_BYTES = MAX_TABLE_LINES * MAX_LINE_CHARS
# "  sl  local_address rem_address   st ..." then entries "N: ADDR:PORT ADDR:PORT ST ...".
# Addresses are the raw in-kernel words printed "%08X" in the guest's byte order; the port is
# in host order ("%04X"). Both guest arches (aarch64, x86_64) are little-endian.
_ENTRY = re.compile(r"\s*\d{1,6}:\s+([0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):([0-9A-Fa-f]{4})\s+"
                    r"[0-9A-Fa-f]{8,32}:[0-9A-Fa-f]{4}\s+([0-9A-Fa-f]{2})(?:\s|$)")
_IPV4_LOOPBACK_BYTE = 0x7F  # 127.0.0.0/8
_IPV6_LOOPBACK = "00000000000000000000000001000000"  # ::1, as four little-endian words
_IPV4_MAPPED_PREFIX = "0000000000000000FFFF0000"  # ::ffff:a.b.c.d

Reach = Literal["any", "loopback"]  # reachable from the guest's network, or its loopback only
# docker: a published port of a running container in a Docker VM (vm/docker_api.py)
Kind = Literal["ssh", "static", "docker", "auto"]
State = Literal["active", "conflict", "failed", "ignored", "guest-loopback"]
KINDS: tuple[Kind, ...] = ("ssh", "static", "docker", "auto")
STATES: tuple[State, ...] = ("active", "conflict", "failed", "ignored", "guest-loopback")


def _ipv4_loopback(word: str) -> bool:
    """A little-endian IPv4 word: its last printed byte is the address's first."""
    return int(word[6:8], 16) == _IPV4_LOOPBACK_BYTE


def address_reach(address: str) -> Reach:
    """Whether a listener on this ``/proc/net/tcp{,6}`` address is reachable from outside."""
    address = address.upper()
    if len(address) == 8:
        return "loopback" if _ipv4_loopback(address) else "any"
    if address == _IPV6_LOOPBACK:
        return "loopback"
    if address.startswith(_IPV4_MAPPED_PREFIX) and _ipv4_loopback(address[24:]):
        return "loopback"
    return "any"


def parse_tcp_table(text: str) -> dict[int, Reach]:
    """Listening ports in one ``/proc/net/tcp`` or ``tcp6`` text, and how far each reaches.

    Never raises: the header, malformed lines, overlong lines, lines past the cap and
    ports outside 1..65535 are skipped. A port with any reachable listener reads ``any``.
    """
    ports: dict[int, Reach] = {}
    for line in text.splitlines()[:MAX_TABLE_LINES + 1]:  # + the header
        if len(line) > MAX_LINE_CHARS:
            continue
        match = _ENTRY.match(line)
        if match is None or match.group(3).upper() != TCP_LISTEN:
            continue
        port = int(match.group(2), 16)
        if not MIN_PORT <= port <= MAX_PORT:
            continue
        reach = address_reach(match.group(1))
        if ports.get(port) != "any":
            ports[port] = reach
    return ports


def listening_ports(*tables: str) -> dict[int, Reach]:
    """Listening ports over several tables (tcp and tcp6), the widest reach of each."""
    merged: dict[int, Reach] = {}
    for table in tables:
        for port, reach in parse_tcp_table(table).items():
            if merged.get(port) != "any":
                merged[port] = reach
    return merged


def check_port(port: int, what: str) -> int:
    """A TCP port number in 1..65535, or ValueError naming ``what``."""
    if isinstance(port, bool) or not isinstance(port, int) or not MIN_PORT <= port <= MAX_PORT:
        raise ValueError(f"{what} {port!r} is not a TCP port (1-{MAX_PORT})")
    return port


def parse_port_option(text: str) -> tuple[int, int]:
    """``HOST:GUEST`` (or a bare ``PORT`` for both) from ``run --port``; ValueError says why."""
    host_text, sep, guest_text = text.partition(":")
    if not sep:
        guest_text = host_text
    pair = []
    for part, what in ((host_text, "host port"), (guest_text, "guest port")):
        if not part.isascii() or not part.isdigit() or len(part) > len(str(MAX_PORT)):
            raise ValueError(f"--port {text!r}: {what} must be a number 1-{MAX_PORT} "
                             "(give HOST:GUEST, e.g. 8080:80)")
        pair.append(check_port(int(part), f"--port {text!r}: {what}"))
    return pair[0], pair[1]


@dataclass(frozen=True)
class Want:
    """One forward that should exist: 127.0.0.1:host on the host to the guest's port."""

    host_port: int
    guest_port: int
    kind: Kind


@dataclass(frozen=True)
class Mirror:
    """A port a Docker container publishes in the guest, to appear at the same host port."""

    port: int
    reach: Reach  # a container published on the guest's loopback only cannot be forwarded
    owner: str  # the container's name, for the reason of a conflict


@dataclass(frozen=True)
class Forward:
    """One row of ``egpu ports``: a forward (or a guest listener that gets none) and its state."""

    host_port: int | None  # None for a listener that gets no forward
    guest_port: int
    kind: Kind
    state: State
    reason: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"host_port": self.host_port, "guest_port": self.guest_port, "kind": self.kind,
                "state": self.state, "reason": self.reason}

    @classmethod
    def from_json(cls, data: object) -> Forward:
        if not isinstance(data, dict):
            raise ValueError("a forward is not an object")
        host, guest = data.get("host_port"), data.get("guest_port")
        kind, state, reason = data.get("kind"), data.get("state"), data.get("reason")
        if host is not None:
            check_port(host, "host_port")
        check_port(guest, "guest_port")  # type: ignore[arg-type]
        if kind not in KINDS or state not in STATES:
            raise ValueError(f"unknown kind {kind!r} or state {state!r}")
        if reason is not None and not isinstance(reason, str):
            raise ValueError("reason: expected a string")
        return cls(host_port=host, guest_port=guest, kind=kind, state=state,  # type: ignore[arg-type]
                   reason=reason)


def plan(
    listeners: Mapping[int, Reach], *, static: Sequence[tuple[int, int]] = (),
    ssh_port: int | None = None, automatic: bool = True, docker: Sequence[Mirror] = (),
    private: Collection[int] = (),
) -> tuple[list[Want], list[Forward]]:
    """The forwards wanted, and the guest listeners that get none (with the reason why).

    ssh and ``--port`` forwards always stand; a Docker VM's published container ports
    (``docker``) come next, each at its own port, so its docker-proxy listener gets no second
    forward; a guest listener is forwarded to the same host port unless automatic forwarding
    is off, it is a ``private`` port (the Docker VM's API, reached only through its socket),
    port 22 or below 1024 (``--port`` forwards those), it listens on the guest's loopback only
    (slirp delivers to the guest's network address, which such a socket never answers), or
    that host port is already taken.
    """
    wanted: list[Want] = []
    if ssh_port is not None:
        wanted.append(Want(ssh_port, GUEST_SSH_PORT, "ssh"))
    wanted += [Want(host, guest, "static") for host, guest in static]
    taken = {w.host_port: w for w in wanted}
    covered = {w.guest_port for w in wanted}
    skipped: list[Forward] = []
    by_port: dict[int, Mirror] = {}
    for mirror in sorted(docker, key=lambda m: (m.port, m.reach != "any", m.owner)):
        by_port.setdefault(mirror.port, mirror)  # IPv4 and IPv6 of one port: the widest reach
    mirrors = 0
    for mirror in by_port.values():
        if mirror.port in covered:
            continue
        covered.add(mirror.port)
        if mirror.reach == "loopback":
            skipped.append(Forward(None, mirror.port, "docker", "guest-loopback",
                                   f"container {mirror.owner} publishes it on the guest's "
                                   "loopback only, which forwarded connections never reach"))
        elif mirror.port in taken:
            skipped.append(Forward(mirror.port, mirror.port, "docker", "conflict",
                                   f"host port {mirror.port} is the {taken[mirror.port].kind} "
                                   f"forward to guest port {taken[mirror.port].guest_port}"))
        elif mirrors >= MAX_AUTO_FORWARDS:
            skipped.append(Forward(None, mirror.port, "docker", "ignored",
                                   f"more than {MAX_AUTO_FORWARDS} container ports"))
        else:
            mirrors += 1
            want = Want(mirror.port, mirror.port, "docker")
            wanted.append(want)
            taken[mirror.port] = want
    if not automatic:
        return wanted, skipped
    autos = 0
    for port in sorted(listeners):
        if port in covered:
            continue
        if port in private:
            skipped.append(Forward(None, port, "auto", "ignored",
                                   "the Docker API: reached only through the VM's docker.sock"))
        elif port == GUEST_SSH_PORT or port < FIRST_UNPRIVILEGED_PORT:
            skipped.append(Forward(None, port, "auto", "ignored",
                                   f"port {port} is below {FIRST_UNPRIVILEGED_PORT} or ssh; "
                                   f"forward it with run --port HOST:{port}"))
        elif listeners[port] == "loopback":
            skipped.append(Forward(None, port, "auto", "guest-loopback",
                                   "the guest listens on its loopback only, which forwarded "
                                   "connections never reach"))
        elif port in taken:
            skipped.append(Forward(port, port, "auto", "conflict",
                                   f"host port {port} is the {taken[port].kind} forward to "
                                   f"guest port {taken[port].guest_port}"))
        elif autos >= MAX_AUTO_FORWARDS:
            skipped.append(Forward(None, port, "auto", "ignored",
                                   f"more than {MAX_AUTO_FORWARDS} automatic forwards"))
        else:
            autos += 1
            wanted.append(Want(port, port, "auto"))
    return wanted, skipped


@dataclass(frozen=True)
class Actions:
    """What to change on QEMU's user network: host ports to drop, forwards to add."""

    remove: tuple[int, ...] = ()
    add: tuple[Want, ...] = ()


def reconcile(wanted: Iterable[Want], installed: Mapping[int, int],
              fixed: Iterable[int] = ()) -> Actions:
    """Actions that turn ``installed`` (host port -> guest port) into ``wanted``.

    ``fixed`` host ports (the ssh forward on QEMU's command line) are never removed.
    A host port forwarding to another guest port than wanted is removed, then added again.
    """
    want = {w.host_port: w for w in wanted}
    keep = set(fixed)
    remove = tuple(sorted(host for host, guest in installed.items()
                          if host not in keep and (host not in want
                                                   or want[host].guest_port != guest)))
    add = tuple(w for host, w in sorted(want.items())
                if host not in keep and installed.get(host) != w.guest_port)
    return Actions(remove=remove, add=add)


@dataclass(frozen=True)
class Problem:
    """Why adding one forward did not work, as the edge found it."""

    state: Literal["conflict", "failed"]
    reason: str


def forward_table(wanted: Iterable[Want], skipped: Iterable[Forward],
                  installed: Mapping[int, int], problems: Mapping[int, Problem]) -> list[Forward]:
    """The rows of ``egpu ports``: each wanted forward active or with its problem, then the rest."""
    rows = []
    for w in wanted:
        if installed.get(w.host_port) == w.guest_port:
            rows.append(Forward(w.host_port, w.guest_port, w.kind, "active"))
        else:
            problem = problems.get(w.host_port, Problem("failed", "not added yet"))
            rows.append(Forward(w.host_port, w.guest_port, w.kind, problem.state, problem.reason))
    rows += skipped
    return sorted(rows, key=lambda f: (KINDS.index(f.kind), f.host_port or 0, f.guest_port))


MAX_TABLE_ROWS = 2 * MAX_TABLE_LINES  # wanted + skipped, both bounded by the guest's listeners


@dataclass(frozen=True)
class PortTable:
    """What ``ports.json`` holds: every forward with its state, and how automatic ones go."""

    automatic: bool  # --no-port-forwarding turns it off
    forwards: tuple[Forward, ...] = ()
    # why the guest's listeners are unknown right now (no agent yet, a bad reply), or None
    guest_error: str | None = None
    updated: float = 0.0  # time.time() when the table last changed

    def to_json(self) -> dict[str, Any]:
        return {"automatic": self.automatic, "guest_error": self.guest_error,
                "updated": self.updated, "forwards": [f.to_json() for f in self.forwards]}

    @classmethod
    def from_json(cls, data: object) -> PortTable:
        """The table read back; ValueError for anything malformed."""
        if not isinstance(data, dict):
            raise ValueError("the port table is not an object")
        automatic, error = data.get("automatic"), data.get("guest_error")
        updated, rows = data.get("updated"), data.get("forwards")
        if not isinstance(automatic, bool):
            raise ValueError("automatic: expected a boolean")
        if error is not None and not isinstance(error, str):
            raise ValueError("guest_error: expected a string")
        if isinstance(updated, bool) or not isinstance(updated, (int, float)):
            raise ValueError("updated: expected a number")
        if not isinstance(rows, list) or len(rows) > MAX_TABLE_ROWS:
            raise ValueError("forwards: expected a list")
        return cls(automatic=automatic, guest_error=error, updated=float(updated),
                   forwards=tuple(Forward.from_json(r) for r in rows))
