"""The Docker VM, the pure core: how its guest serves the Docker API, and which container ports
to mirror, from the daemon's replies (guest-controlled, so untrusted: every size, count, string
and port bounded before use).

The host reaches the API through a unix socket QEMU's user network forwards to the guest's
``GUEST_API_PORT`` (``hostfwd=unix:...``); a systemd socket unit in the guest accepts only
connections from slirp's host address and proxies them to dockerd's own socket. Container ports
come from ``GET /containers/json`` (each ``Ports`` entry with a ``PublicPort``) and the
``GET /events`` stream (Docker Engine API, "Monitor events"; "List containers").
"""

from __future__ import annotations

import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from egpu.engine.argv import MAX_PORT
from egpu.vm.ports import MIN_PORT, Mirror, Reach

# The guest's side of the API: a TCP port on its user-network address only, where a systemd
# socket unit proxies to dockerd's /run/docker.sock (dockerd itself is left as packaged).
GUEST_API_PORT = 2375
# slirp's default network (QEMU net/slirp.c: 10.0.2.0/24, the host appears as .2): the only
# peer the guest-side socket accepts, so containers on docker0 cannot reach the API through it.
SLIRP_HOST_ADDRESS = "10.0.2.2"
GUEST_DOCKER_SOCKET = "/run/docker.sock"
API_SOCKET_UNIT = "egpu-docker-api.socket"
API_SERVICE_UNIT = "egpu-docker-api.service"
SYSTEMD_DIR = "/etc/systemd/system"
SOCKET_PROXY = "/usr/lib/systemd/systemd-socket-proxyd"  # systemd's own byte proxy
DOCKER_SERVICE = "docker.service"

PING_PATH = "/_ping"
PING_REPLY = b"OK"
CONTAINERS_PATH = "/containers/json"
EVENTS_PATH = "/events"
# the events that change which ports a container publishes: start adds, die and stop remove
START_EVENTS = frozenset({"start"})
END_EVENTS = frozenset({"die", "stop", "kill", "destroy"})
EVENT_FILTERS = {"type": ["container"], "event": ["start", "die", "stop"]}

# Bounds on what the daemon may send (a hostile guest can send anything).
MAX_LIST_BYTES = 4 << 20  # GET /containers/json
MAX_CONTAINERS = 1024
MAX_PORTS_PER_CONTAINER = 256
MAX_EVENT_BYTES = 64 << 10  # one line of the events stream
MAX_NAME_CHARS = 128
_ID = re.compile(r"[0-9a-f]{1,64}")
_NAME = re.compile(r"/?([A-Za-z0-9][A-Za-z0-9_.-]{0,127})")
LOOPBACK_IPS = frozenset({"127.0.0.1", "::1"})
TCP = "tcp"


class DockerReplyError(ValueError):
    """A reply of the daemon that egpu cannot use (malformed, too large)."""


@dataclass(frozen=True)
class Container:
    """A running container and the ports it publishes in the guest."""

    id: str
    name: str
    ports: tuple[Mirror, ...] = ()


@dataclass(frozen=True)
class Event:
    """One container event of the stream: what happened to which container."""

    action: str
    id: str


def events_query() -> str:
    """The query of ``GET /events``: container start, die and stop only."""
    return urllib.parse.urlencode({"filters": json.dumps(EVENT_FILTERS, separators=(",", ":"))})


def _port(value: object) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_PORT <= value <= MAX_PORT:
        return None
    return value


def _reach(ip: object) -> Reach:
    # "" / "0.0.0.0" / "::" (all addresses) reach the guest's network address; so does any
    # other non-loopback address, the one slirp delivers to among them
    if isinstance(ip, str) and (ip in LOOPBACK_IPS or ip.startswith("127.")):
        return "loopback"
    return "any"


def _name(entry: Mapping[str, Any], container_id: str) -> str:
    names = entry.get("Names")
    if isinstance(names, list):
        for name in names[:8]:
            if isinstance(name, str) and (match := _NAME.fullmatch(name)):
                return match.group(1)
    return container_id[:12]


def parse_container(entry: object) -> Container | None:
    """One entry of ``/containers/json``, or None when it is unusable (skipped, never fatal)."""
    if not isinstance(entry, dict):
        return None
    container_id = entry.get("Id")
    if not isinstance(container_id, str) or not _ID.fullmatch(container_id):
        return None
    name = _name(entry, container_id)
    raw = entry.get("Ports")
    mirrors: list[Mirror] = []
    if isinstance(raw, list):
        for port in raw[:MAX_PORTS_PER_CONTAINER]:
            if not isinstance(port, dict) or port.get("Type", TCP) != TCP:
                continue
            public = _port(port.get("PublicPort"))
            if public is None:  # not published, or a port no host has
                continue
            mirror = Mirror(public, _reach(port.get("IP")), name)
            if mirror not in mirrors:
                mirrors.append(mirror)
    return Container(container_id, name, tuple(mirrors))


def parse_containers(body: bytes) -> dict[str, Container]:
    """``GET /containers/json`` (running containers) by id; DockerReplyError for a bad reply.

    Entries that do not parse are skipped; more than MAX_CONTAINERS are refused.
    """
    if len(body) > MAX_LIST_BYTES:
        raise DockerReplyError(f"the container list is larger than {MAX_LIST_BYTES} bytes")
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise DockerReplyError("the container list is not JSON") from None
    if not isinstance(doc, list):
        raise DockerReplyError("the container list is not a JSON array")
    if len(doc) > MAX_CONTAINERS:
        raise DockerReplyError(f"more than {MAX_CONTAINERS} containers")
    containers: dict[str, Container] = {}
    for entry in doc:
        container = parse_container(entry)
        if container is not None:
            containers[container.id] = container
    return containers


def parse_event(line: bytes) -> Event | None:
    """One line of the events stream, or None for a line that is not a container event."""
    if len(line) > MAX_EVENT_BYTES or not line.strip():
        return None
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict) or doc.get("Type", "container") != "container":
        return None
    action = doc.get("Action", doc.get("status"))
    actor = doc.get("Actor")
    container_id = actor.get("ID") if isinstance(actor, dict) else doc.get("id")
    if not isinstance(container_id, str) or not _ID.fullmatch(container_id):
        container_id = doc.get("id")
    if (not isinstance(action, str) or not isinstance(container_id, str)
            or not _ID.fullmatch(container_id)):
        return None
    # "exec_start: sh" and the like carry their command after a colon
    return Event(action.split(":", 1)[0].strip()[:32], container_id)


def apply_event(containers: Mapping[str, Container],
                event: Event) -> tuple[dict[str, Container], bool]:
    """The containers after ``event``, and whether the list must be read again (a start:
    the event does not say which ports the new container publishes)."""
    current = dict(containers)
    if event.action in END_EVENTS:
        current.pop(event.id, None)
        return current, False
    return current, event.action in START_EVENTS


def mirrors(containers: Mapping[str, Container]) -> tuple[Mirror, ...]:
    """Every published port of the running containers, for ``ports.plan(docker=...)``."""
    return tuple(sorted({m for c in containers.values() for m in c.ports},
                        key=lambda m: (m.port, m.owner, m.reach)))


def guest_cloud_config() -> dict[str, Any]:
    """The cloud-config that makes a docker-profile image serve its API to egpu's socket."""
    socket_unit = "\n".join((
        "[Unit]",
        "Description=Docker API for egpu's host-side socket (slirp's host address only)",
        "[Socket]",
        f"ListenStream={GUEST_API_PORT}",
        # systemd's per-unit IP filter: only slirp's host end may connect, never a container
        "IPAddressDeny=any",
        f"IPAddressAllow={SLIRP_HOST_ADDRESS}",
        "[Install]",
        "WantedBy=sockets.target",
        "",
    ))
    service_unit = "\n".join((
        "[Unit]",
        "Description=Docker API proxy for egpu",
        f"Requires={API_SOCKET_UNIT} {DOCKER_SERVICE}",
        f"After={API_SOCKET_UNIT} {DOCKER_SERVICE}",
        "[Service]",
        f"ExecStart={SOCKET_PROXY} {GUEST_DOCKER_SOCKET}",
        "",
    ))
    return {
        "write_files": [
            {"path": f"{SYSTEMD_DIR}/{API_SOCKET_UNIT}", "permissions": "0644",
             "content": socket_unit},
            {"path": f"{SYSTEMD_DIR}/{API_SERVICE_UNIT}", "permissions": "0644",
             "content": service_unit},
        ],
        # one unit per command: a failing docker.service must not keep the socket from
        # listening (the journal then says why the daemon does not answer)
        "runcmd": [
            ["systemctl", "daemon-reload"],
            ["systemctl", "enable", "--now", API_SOCKET_UNIT],
            ["systemctl", "enable", "--now", DOCKER_SERVICE],
        ],
    }


def journal_argv(lines: int) -> list[str]:
    """The guest command that shows docker.service's last journal lines (for a failed up)."""
    return ["journalctl", "--no-pager", "-o", "cat", "-n", str(lines), "-u", DOCKER_SERVICE,
            "-u", API_SOCKET_UNIT, "-u", API_SERVICE_UNIT]
