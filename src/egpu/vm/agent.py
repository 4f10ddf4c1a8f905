"""A synchronous client for the QEMU guest agent (qemu-ga) on a VM's virtio-serial socket.

The wire format is QMP's JSON (QEMU ``docs/interop/qemu-ga.rst``, ``qga/qapi-schema.json``):
one JSON command from the host, one JSON reply per line from the guest, and no greeting.
The channel outlives clients, so a reply meant for an earlier client may still be in it:
every session starts with ``guest-sync-delimited`` and a random id, and everything before the
0xFF sentinel that precedes the matching reply is discarded.

The guest is untrusted: every reply is capped in size (:data:`MAX_REPLY`) and every field is
type-checked and bounded before use (:class:`AgentError` otherwise); every wait has a deadline.
"""

from __future__ import annotations

import base64
import contextlib
import json
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from egpu.errors import AgentError

# qemu-ga sends it before a guest-sync-delimited reply; sent to it, it resets its parser
SENTINEL = b"\xff"
LINE_END = b"\n"
DEFAULT_TIMEOUT_S = 10.0
TRANSFER_TIMEOUT_S = 60.0  # per chunk: a 1 MiB write took 1 to 3 s under TCG on a loaded host
CONNECT_TIMEOUT_S = 2.0
CHUNK = 1 << 20  # bytes per guest-file-read / guest-file-write
# qemu-ga keeps at most 16 MiB of a command's output per stream (qga/commands.c,
# GUEST_EXEC_MAX_OUTPUT); more than that from a guest is refused, not buffered
MAX_EXEC_OUTPUT = 16 << 20
MAX_REPLY_SLACK = 64 << 10  # JSON around the base64 fields
SYNC_ID_MAX = (1 << 31) - 1  # qemu-ga reads the id as an int
MAX_PID = (1 << 31) - 1
MAX_EXIT_CODE = 255
MAX_SIGNAL = 128
MAX_HANDLE = (1 << 63) - 1
MAX_TEXT = 4096  # any string field: names, versions, addresses, error descriptions
MAX_LIST = 4096  # interfaces, addresses, supported commands
EXEC_POLL_FIRST_S = 0.01
EXEC_POLL_MAX_S = 0.2
KILL_TIMEOUT_S = 2.0
ADDRESS_TYPES = ("ipv4", "ipv6")


def b64_len(size: int) -> int:
    """The length of the base64 text for ``size`` bytes."""
    return (size + 2) // 3 * 4


# the largest reply: guest-exec-status carrying both streams at qemu-ga's limit
MAX_REPLY = 2 * b64_len(MAX_EXEC_OUTPUT) + MAX_REPLY_SLACK


@dataclass(frozen=True)
class AgentInfo:
    """guest-info: the agent's version and the commands it has enabled."""

    version: str
    commands: tuple[str, ...]


@dataclass(frozen=True)
class OsInfo:
    """guest-get-osinfo: what the guest says it runs (fields it leaves out are None)."""

    name: str | None
    pretty_name: str | None
    version: str | None
    kernel_release: str | None
    kernel_version: str | None
    machine: str | None


@dataclass(frozen=True)
class IpAddress:
    family: str  # "ipv4" | "ipv6"
    address: str
    prefix: int


@dataclass(frozen=True)
class Interface:
    """One guest network interface (guest-network-get-interfaces)."""

    name: str
    hardware_address: str | None
    addresses: tuple[IpAddress, ...]


@dataclass(frozen=True)
class ExecResult:
    """A finished guest-exec: exit code (None when a signal ended it) and captured output."""

    exit_code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    truncated: bool = False


@dataclass(frozen=True)
class ReadChunk:
    data: bytes
    eof: bool


# ---- checking untrusted replies (pure) ----

def _obj(value: object, what: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise AgentError(f"guest agent sent a malformed {what} (not an object)")
    return value


def _int(doc: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    value = doc.get(key)
    # bool is an int in Python; JSON true is not a count
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise AgentError(f"guest agent sent a bad {what} {key!r}: {_show(value)}")
    return value


def _opt_int(doc: Mapping[str, Any], key: str, lo: int, hi: int, what: str) -> int | None:
    return None if doc.get(key) is None else _int(doc, key, lo, hi, what)


def _bool(doc: Mapping[str, Any], key: str, what: str, default: bool | None = None) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise AgentError(f"guest agent sent a bad {what} {key!r}: {_show(value)}")
    return value


def _text(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> str | None:
    value = doc.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise AgentError(f"guest agent sent a bad {what} {key!r}: {_show(value)}")
    # what the guest says may reach a terminal: no control characters
    return "".join(ch if ch.isprintable() else "?" for ch in value)


def _list(doc: Mapping[str, Any], key: str, what: str, *, optional: bool = False) -> list[Any]:
    value = doc.get(key)
    if value is None and optional:
        return []
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise AgentError(f"guest agent sent a bad {what} {key!r} (not a list of at most "
                         f"{MAX_LIST})")
    return value


def _b64(doc: Mapping[str, Any], key: str, limit: int, what: str) -> bytes:
    value = doc.get(key, "")
    if not isinstance(value, str):
        raise AgentError(f"guest agent sent a bad {what} {key!r} (not a string)")
    # the size is checked on the text, before anything is decoded
    if len(value) > b64_len(limit):
        raise AgentError(f"guest agent sent more than {limit} bytes in {what} {key!r}")
    try:
        return base64.b64decode(value, validate=True)
    except ValueError:
        raise AgentError(f"guest agent sent invalid base64 in {what} {key!r}") from None


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_info(value: object) -> AgentInfo:
    doc = _obj(value, "guest-info reply")
    commands = []
    for item in _list(doc, "supported_commands", "guest-info reply"):
        entry = _obj(item, "guest-info command")
        name = _text(entry, "name", "guest-info command")
        if name is not None and _bool(entry, "enabled", "guest-info command", True):
            commands.append(name)
    return AgentInfo(_text(doc, "version", "guest-info reply") or "", tuple(commands))


def parse_osinfo(value: object) -> OsInfo:
    doc = _obj(value, "guest-get-osinfo reply")
    what = "guest-get-osinfo reply"
    return OsInfo(
        name=_text(doc, "name", what, optional=True),
        pretty_name=_text(doc, "pretty-name", what, optional=True),
        version=_text(doc, "version", what, optional=True),
        kernel_release=_text(doc, "kernel-release", what, optional=True),
        kernel_version=_text(doc, "kernel-version", what, optional=True),
        machine=_text(doc, "machine", what, optional=True),
    )


def parse_interfaces(value: object) -> tuple[Interface, ...]:
    if not isinstance(value, list) or len(value) > MAX_LIST:
        raise AgentError("guest agent sent a malformed interface list")
    out = []
    what = "network interface"
    for item in value:
        doc = _obj(item, what)
        addresses = []
        for raw in _list(doc, "ip-addresses", what, optional=True):
            addr = _obj(raw, "IP address")
            family = _text(addr, "ip-address-type", "IP address")
            if family not in ADDRESS_TYPES:
                raise AgentError(f"guest agent sent an unknown address type {_show(family)}")
            prefix = _int(addr, "prefix", 0, 32 if family == "ipv4" else 128, "IP address")
            addresses.append(IpAddress(family, _text(addr, "ip-address", "IP address") or "",
                                       prefix))
        out.append(Interface(_text(doc, "name", what) or "",
                             _text(doc, "hardware-address", what, optional=True),
                             tuple(addresses)))
    return tuple(out)


def parse_exec_status(value: object) -> ExecResult | None:
    """A guest-exec-status reply: None while the command runs, its result once it exited."""
    doc = _obj(value, "guest-exec-status reply")
    what = "guest-exec-status reply"
    if not _bool(doc, "exited", what):
        return None
    return ExecResult(
        exit_code=_opt_int(doc, "exitcode", 0, MAX_EXIT_CODE, what),
        signal=_opt_int(doc, "signal", 0, MAX_SIGNAL, what),
        stdout=_b64(doc, "out-data", MAX_EXEC_OUTPUT, what),
        stderr=_b64(doc, "err-data", MAX_EXEC_OUTPUT, what),
        truncated=_bool(doc, "out-truncated", what, False)
        or _bool(doc, "err-truncated", what, False),
    )


def parse_read(value: object, asked: int) -> ReadChunk:
    """A guest-file-read reply for ``asked`` bytes; more than asked is refused."""
    doc = _obj(value, "guest-file-read reply")
    what = "guest-file-read reply"
    count = _int(doc, "count", 0, asked, what)
    data = _b64(doc, "buf-b64", asked, what)
    if len(data) != count:
        raise AgentError(f"guest agent's {what} says {count} bytes but carries {len(data)}")
    return ReadChunk(data, _bool(doc, "eof", what))


def parse_reply(line: bytes) -> Any:
    """One reply line: its ``return`` value; AgentError for an error reply or anything else."""
    try:
        doc = json.loads(line)
    except (ValueError, RecursionError):
        raise AgentError("guest agent sent something that is not JSON") from None
    doc = _obj(doc, "reply")
    if "error" in doc:
        err = _obj(doc["error"], "error reply")
        desc = _text(err, "desc", "error reply", optional=True) or "no description"
        raise AgentError(f"guest agent refused: {desc}")
    if "return" not in doc:
        raise AgentError("guest agent sent a reply without 'return'")
    return doc["return"]


def encode_command(command: str, arguments: Mapping[str, Any] | None = None) -> bytes:
    """One command as the agent reads it."""
    doc: dict[str, Any] = {"execute": command}
    if arguments is not None:
        doc["arguments"] = dict(arguments)
    return json.dumps(doc, separators=(",", ":")).encode() + LINE_END


# ---- the I/O edge ----

class AgentClient:
    """One session with a guest agent; use :func:`connect`."""

    def __init__(self, sock: socket.socket, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.sock = sock
        self.timeout = timeout
        self._buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    # framing

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("guest agent did not answer in time")
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(min(CHUNK, MAX_REPLY + 1 - len(self._buf)) or 1)
        except TimeoutError:
            raise AgentError("guest agent did not answer in time") from None
        except OSError as e:
            raise AgentError(f"guest agent connection failed: {e}") from e
        if not data:
            raise AgentError("guest agent closed the connection")
        self._buf += data

    def _line(self, deadline: float) -> bytes:
        start = 0
        while True:
            end = self._buf.find(LINE_END, start)
            if end >= 0:
                line = bytes(self._buf[:end])
                del self._buf[:end + 1]
                if line.strip():
                    return line
                start = 0
                continue
            if len(self._buf) > MAX_REPLY:
                raise AgentError(f"guest agent sent a reply larger than {MAX_REPLY} bytes")
            start = len(self._buf)
            self._fill(deadline)

    def _send(self, data: bytes, deadline: float) -> None:
        self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise AgentError("guest agent is not reading its channel") from None
        except OSError as e:
            raise AgentError(f"guest agent connection failed: {e}") from e

    def sync(self, timeout: float | None = None) -> None:
        """guest-sync-delimited with a random id; discard whatever came before our reply."""
        deadline = time.monotonic() + (timeout or self.timeout)
        sync_id = secrets.randbelow(SYNC_ID_MAX) + 1
        # a leading 0xFF makes the agent drop any half-command an earlier client left
        self._send(SENTINEL + encode_command("guest-sync-delimited", {"id": sync_id}), deadline)
        while True:
            while (at := self._buf.find(SENTINEL)) < 0:
                self._buf.clear()  # nothing before a sentinel is ours
                self._fill(deadline)
            del self._buf[:at + 1]
            try:
                value = parse_reply(self._line(deadline))
            except AgentError:
                continue  # an earlier client's leftovers: wait for our sentinel
            if value == sync_id and not isinstance(value, bool):
                return

    def call(self, command: str, arguments: Mapping[str, Any] | None = None,
             timeout: float | None = None) -> Any:
        """Run one command and return its ``return`` value."""
        deadline = time.monotonic() + (timeout or self.timeout)
        self._send(encode_command(command, arguments), deadline)
        return parse_reply(self._line(deadline))

    # commands

    def ping(self) -> None:
        self.call("guest-ping")

    def info(self) -> AgentInfo:
        return parse_info(self.call("guest-info"))

    def osinfo(self) -> OsInfo:
        return parse_osinfo(self.call("guest-get-osinfo"))

    def interfaces(self) -> tuple[Interface, ...]:
        return parse_interfaces(self.call("guest-network-get-interfaces"))

    def shutdown(self, mode: str = "powerdown") -> None:
        """Ask the guest to power off; the agent sends no reply to this one."""
        deadline = time.monotonic() + self.timeout
        self._send(encode_command("guest-shutdown", {"mode": mode}), deadline)

    def spawn(self, argv: Sequence[str], stdin: bytes | None = None) -> int:
        """guest-exec with output captured; the guest pid."""
        if not argv:
            raise AgentError("no command to run")
        args: dict[str, Any] = {"path": argv[0], "arg": list(argv[1:]), "capture-output": True}
        if stdin is not None:
            args["input-data"] = base64.b64encode(stdin).decode()
        doc = _obj(self.call("guest-exec", args), "guest-exec reply")
        return _int(doc, "pid", 1, MAX_PID, "guest-exec reply")

    def exec_status(self, pid: int) -> ExecResult | None:
        return parse_exec_status(self.call("guest-exec-status", {"pid": pid}))

    def run(self, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None) -> ExecResult:
        """Run a command in the guest and wait for it; AgentTimeout once ``timeout`` passes."""
        return _wait_exec(argv, self.spawn(argv, stdin), timeout, self.exec_status, self._kill)

    def _kill(self, pid: int) -> None:
        # best effort: the agent has no kill command, the guest's own kill does it
        with contextlib.suppress(AgentError):
            self.spawn(["kill", "-KILL", str(pid)])

    def read_file(self, path: str, sink: IO[bytes],
                  advance: Callable[[int], None] | None = None) -> int:
        """Copy a guest file into ``sink`` in chunks of :data:`CHUNK`; the bytes copied."""
        handle = self._open(path, "r")
        total = 0
        try:
            while True:
                chunk = parse_read(self.call("guest-file-read", {"handle": handle,
                                                                 "count": CHUNK}), CHUNK)
                sink.write(chunk.data)
                total += len(chunk.data)
                if advance is not None:
                    advance(len(chunk.data))
                if chunk.eof or not chunk.data:
                    return total
        finally:
            self._close(handle)

    def write_file(self, path: str, source: IO[bytes],
                   advance: Callable[[int], None] | None = None) -> int:
        """Copy ``source`` into a guest file in chunks of :data:`CHUNK`; the bytes copied."""
        handle = self._open(path, "w")
        total = 0
        try:
            while data := source.read(CHUNK):
                while data:
                    doc = _obj(self.call("guest-file-write", {
                        "handle": handle, "buf-b64": base64.b64encode(data).decode()}),
                        "guest-file-write reply")
                    written = _int(doc, "count", 0, len(data), "guest-file-write reply")
                    if written == 0:
                        raise AgentError(f"guest agent wrote nothing to {path}")
                    data = data[written:]
                    total += written
                    if advance is not None:
                        advance(written)
            self.call("guest-file-flush", {"handle": handle})
        finally:
            self._close(handle)
        return total

    def _open(self, path: str, mode: str) -> int:
        value = self.call("guest-file-open", {"path": path, "mode": mode})
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_HANDLE:
            raise AgentError(f"guest agent sent a bad file handle: {_show(value)}")
        return value

    def _close(self, handle: int) -> None:
        with contextlib.suppress(AgentError):
            self.call("guest-file-close", {"handle": handle})


def _wait_exec(argv: Sequence[str], pid: int, timeout: float,
               status: Callable[[int], ExecResult | None],
               kill: Callable[[int], None]) -> ExecResult:
    deadline = time.monotonic() + timeout
    pause = EXEC_POLL_FIRST_S
    while (result := status(pid)) is None:
        if time.monotonic() >= deadline:
            kill(pid)
            raise AgentTimeout(f"{argv[0]} still running in the guest after {timeout:g} s",
                               hint="it was sent SIGKILL; pass a longer --timeout")
        # guest-exec-status is poll-only: back off so a long command costs few round trips
        time.sleep(min(pause, max(deadline - time.monotonic(), 0)))
        pause = min(pause * 2, EXEC_POLL_MAX_S)
    return result


def run_command(path: Path, argv: Sequence[str], *, timeout: float, stdin: bytes | None = None,
                session_timeout: float = DEFAULT_TIMEOUT_S) -> ExecResult:
    """:meth:`AgentClient.run` with one short session per step instead of one held throughout:
    the channel takes one client at a time, so other clients (the port-forward watcher)
    get their turns while a long command runs."""
    def status(pid: int) -> ExecResult | None:
        with connect(path, session_timeout) as client:
            return client.exec_status(pid)

    def kill(pid: int) -> None:
        with contextlib.suppress(AgentError), connect(path, session_timeout) as client:
            client._kill(pid)

    with connect(path, session_timeout) as client:
        pid = client.spawn(argv, stdin)
    return _wait_exec(argv, pid, timeout, status, kill)


class AgentTimeout(AgentError):
    """A guest command outlived its timeout."""

    exit_code = 124  # what timeout(1) exits with


@contextlib.contextmanager
def connect(path: Path, timeout: float = DEFAULT_TIMEOUT_S) -> Iterator[AgentClient]:
    """A synced session with the agent behind ``path`` (the VM's agent socket)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(min(timeout, CONNECT_TIMEOUT_S))
        try:
            sock.connect(str(path))
        except (OSError, TimeoutError) as e:
            raise AgentError(f"cannot reach the guest agent socket {path}: "
                             f"{e.strerror or e}") from e
        client = AgentClient(sock, timeout)
        client.sync()
        yield client
    finally:
        sock.close()


FACTS_TIMEOUT_S = 1.5  # status must never wait long for a guest that does not answer
NOT_ANSWERING: Mapping[str, Any] = {"answering": False, "ip": [], "os": None, "kernel": None}


def facts(path: Path, timeout: float = FACTS_TIMEOUT_S) -> dict[str, Any]:
    """What ``status --json`` shows of the agent: answering or not, the guest's addresses
    (loopback left out), OS and kernel; within ``timeout`` in all, never raises."""
    out: dict[str, Any] = dict(NOT_ANSWERING)
    deadline = time.monotonic() + timeout

    def left() -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AgentError("guest agent did not answer in time")
        return remaining
    try:
        with connect(path, timeout) as client:
            out["answering"] = True
            with contextlib.suppress(AgentError):
                info = parse_osinfo(client.call("guest-get-osinfo", timeout=left()))
                out["os"] = info.pretty_name or info.name
                out["kernel"] = info.kernel_release
            with contextlib.suppress(AgentError):
                interfaces = parse_interfaces(client.call("guest-network-get-interfaces",
                                                          timeout=left()))
                out["ip"] = [a.address for i in interfaces if i.name != "lo"
                             for a in i.addresses]
    except AgentError:
        pass
    return out
