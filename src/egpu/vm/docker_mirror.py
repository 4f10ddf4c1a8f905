"""The Docker VM, the I/O edge: the Docker API over the VM's ``docker.sock`` (httpx with a unix
socket transport), the ping ``egpu docker up`` waits for, and the supervisor's watcher thread
that follows the events stream and tells the port forwarder which container ports to mirror.

Every reply is read with a cap and parsed by the pure core (``vm/docker_api.py``); a failing
stream is retried with a full list each time it connects again, never fatal.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from egpu.errors import VMError
from egpu.vm import docker_api
from egpu.vm.ports import Mirror

if TYPE_CHECKING:
    import httpx

# The host name in the URL is never resolved: the transport connects to the socket.
BASE_URL = "http://docker"
PING_TIMEOUT_S = 5.0
LIST_TIMEOUT_S = 10.0
# A silent events stream is reconnected after this long, with a full list: a missed event (a
# reply lost in a guest hiccup) is corrected within it, and a stop request is seen.
EVENTS_IDLE_S = 15.0
RETRY_S = 1.0  # between attempts while the daemon is not up
MAX_ERROR_CHARS = 200
Log = Callable[[str], None]


def _client(socket: Path, timeout: float) -> httpx.Client:
    import httpx  # only a Docker VM's supervisor and `egpu docker` need it

    return httpx.Client(transport=httpx.HTTPTransport(uds=str(socket)), base_url=BASE_URL,
                        timeout=timeout)


def ping(socket: Path, timeout: float = PING_TIMEOUT_S) -> str | None:
    """None when the daemon answers ``GET /_ping`` with OK on ``socket``, else why not."""
    import httpx

    if not socket.exists():
        return f"{socket} does not exist yet"
    try:
        with _client(socket, timeout) as client, client.stream("GET", docker_api.PING_PATH) as r:
            body = _read_capped(r.iter_bytes(), len(docker_api.PING_REPLY) + 64)
            if r.status_code == 200 and body.strip() == docker_api.PING_REPLY:
                return None
            return f"GET {docker_api.PING_PATH}: HTTP {r.status_code}"
    except (httpx.HTTPError, OSError, docker_api.DockerReplyError) as e:
        return _short(e)


def _short(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return "".join(c if c.isprintable() else "?" for c in text[:MAX_ERROR_CHARS])


def _read_capped(chunks: Iterator[bytes], limit: int) -> bytes:
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > limit:
            raise docker_api.DockerReplyError(f"a reply of more than {limit} bytes")
    return bytes(body)


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """The events stream's lines; an overlong line is skipped whole, never buffered."""
    pending = bytearray()
    skipping = False
    for chunk in chunks:
        pending += chunk
        while (end := pending.find(b"\n")) >= 0:
            line = bytes(pending[:end])
            del pending[:end + 1]
            if not skipping:
                yield line
            skipping = False
        if len(pending) > docker_api.MAX_EVENT_BYTES:
            pending.clear()
            skipping = True


class DockerWatcher:
    """Which container ports to mirror, kept in step with the daemon (a supervisor thread)."""

    def __init__(self, socket: Path, log: Log, on_change: Callable[[], None]) -> None:
        self.socket = socket
        self.log = log
        self.on_change = on_change
        self._lock = threading.Lock()
        self._mirrors: tuple[Mirror, ...] = ()
        self.error: str | None = None

    def mirrors(self) -> tuple[Mirror, ...]:
        """The container ports to mirror now (the forwarder asks once per round)."""
        with self._lock:
            return self._mirrors

    def _set(self, containers: dict[str, docker_api.Container]) -> None:
        mirrors = docker_api.mirrors(containers)
        with self._lock:
            changed = mirrors != self._mirrors
            self._mirrors = mirrors
        if changed:
            self.on_change()

    def _list(self, client: httpx.Client) -> dict[str, docker_api.Container]:
        with client.stream("GET", docker_api.CONTAINERS_PATH, timeout=LIST_TIMEOUT_S) as r:
            body = _read_capped(r.iter_bytes(), docker_api.MAX_LIST_BYTES)
            if r.status_code != 200:
                raise docker_api.DockerReplyError(
                    f"GET {docker_api.CONTAINERS_PATH}: HTTP {r.status_code}")
        return docker_api.parse_containers(body)

    def session(self, stop: threading.Event) -> None:
        """One connection: open the events stream, list (so no event falls between), follow."""
        import httpx

        timeout = httpx.Timeout(LIST_TIMEOUT_S, read=EVENTS_IDLE_S)
        with _client(self.socket, LIST_TIMEOUT_S) as client, client.stream(
                "GET", f"{docker_api.EVENTS_PATH}?{docker_api.events_query()}",
                timeout=timeout) as events:
            if events.status_code != 200:
                raise docker_api.DockerReplyError(
                    f"GET {docker_api.EVENTS_PATH}: HTTP {events.status_code}")
            containers = self._list(client)
            self._set(containers)
            if self.error is not None:
                self.log("docker: following the daemon's events again")
                self.error = None
            for line in _lines(events.iter_raw()):
                if stop.is_set():
                    return
                event = docker_api.parse_event(line)
                if event is None:
                    continue
                containers, relist = docker_api.apply_event(containers, event)
                if relist:
                    containers = self._list(client)
                self._set(containers)

    def run(self, stop: threading.Event) -> None:
        """Sessions until ``stop``; each failure is logged once and retried, never raised."""
        import httpx

        while not stop.is_set():
            try:
                self.session(stop)
            except httpx.ReadTimeout:
                continue  # a quiet daemon: connect again, with a full list
            except Exception as e:  # the supervisor must outlive any reply of the guest
                why = _short(e)
                if self.error is None:  # once per outage: its errors alternate while it lasts
                    self.log(f"docker: no events from the daemon, retrying every "
                             f"{RETRY_S:g}s: {why}")
                self.error = why
            stop.wait(RETRY_S)


def wait_ready(socket: Path, deadline: float, *, alive: Callable[[], str | None],
               tick: Callable[[str], None] | None = None) -> None:
    """Poll ``/_ping`` until the daemon answers; VMError when ``alive()`` says why the VM
    cannot answer any more, or once ``deadline`` (time.monotonic()) passes."""
    last = ""
    while True:
        why = ping(socket)
        if why is None:
            return
        if why != last and tick is not None:
            tick(why)
        last = why
        dead = alive()
        if dead is not None:
            raise VMError(dead)
        if time.monotonic() > deadline:
            raise VMError(f"the Docker daemon did not answer {docker_api.PING_PATH} ({last})")
        time.sleep(RETRY_S)
