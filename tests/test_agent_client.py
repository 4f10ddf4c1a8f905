"""The guest-agent client against a fake agent on a real socketpair: the session protocol,
chunked copies, and hostile replies (each an AgentError, never a crash or unbounded memory)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.cli.agent_commands import Location, parse_location
from egpu.errors import AgentError, UsageError
from egpu.vm import agent


class Close(bytes):
    """An answer after which the fake agent hangs up."""


# a fake agent: gets each command the client sent, returns the bytes to answer with
# (b"" answers nothing; None or a Close closes the connection)
Responder = Callable[[dict[str, Any]], bytes | None]
SHORT_S = 0.5  # what a test that expects a missing answer waits for


def reply(value: object) -> bytes:
    return json.dumps({"return": value}).encode() + b"\n"


def synced(rest: Responder) -> Responder:
    """Answer guest-sync-delimited properly, hand everything else to ``rest``."""
    def respond(cmd: dict[str, Any]) -> bytes | None:
        if cmd["execute"] == "guest-sync-delimited":
            return agent.SENTINEL + reply(cmd["arguments"]["id"])
        return rest(cmd)
    return respond


def _serve(sock: socket.socket, respond: Responder, seen: list[dict[str, Any]]) -> None:
    buf = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(1 << 20):
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                cmd = json.loads(line.lstrip(agent.SENTINEL))
                seen.append(cmd)
                answer = respond(cmd)
                if answer is not None:
                    sock.sendall(answer)
                if answer is None or isinstance(answer, Close):
                    sock.close()
                    return


@contextlib.contextmanager
def fake_agent(respond: Responder, timeout: float = 5.0,
               sync: bool = True) -> Iterator[tuple[agent.AgentClient, list[dict[str, Any]]]]:
    ours, theirs = socket.socketpair()
    seen: list[dict[str, Any]] = []
    thread = threading.Thread(target=_serve, args=(theirs, respond, seen), daemon=True)
    thread.start()
    client = agent.AgentClient(ours, timeout)
    try:
        if sync:
            client.sync()
        yield client, seen
    finally:
        client.close()
        theirs.close()
        thread.join(5)


def test_sync_discards_leftovers_and_stale_sync_replies() -> None:
    stale = b'{"return": {}}\n{"retu' + agent.SENTINEL + reply(12345)

    def respond(cmd: dict[str, Any]) -> bytes | None:
        if cmd["execute"] == "guest-sync-delimited":
            # an earlier client's reply and sync answer come first
            return stale + agent.SENTINEL + reply(cmd["arguments"]["id"])
        return reply({"ours": True})
    with fake_agent(respond) as (client, seen):
        # a client that took the stale sync reply for its own would read its real one here
        assert client.call("guest-ping") == {"ours": True}
    sync = seen[0]
    assert sync["execute"] == "guest-sync-delimited"
    assert 1 <= sync["arguments"]["id"] <= agent.SYNC_ID_MAX
    assert [c["execute"] for c in seen] == ["guest-sync-delimited", "guest-ping"]


def test_sync_ids_are_random() -> None:
    ids = set()
    for _ in range(4):
        with fake_agent(synced(lambda c: reply({}))) as (_, seen):
            ids.add(seen[0]["arguments"]["id"])
    assert len(ids) == 4


@pytest.mark.parametrize("answer", [
    agent.SENTINEL + reply(7),  # the wrong id
    reply(0),  # no sentinel at all
    agent.SENTINEL + b"not json\n",
    b"",  # silence
])
def test_sync_without_our_reply_is_an_error(answer: bytes) -> None:
    with pytest.raises(AgentError, match="in time"), \
            fake_agent(lambda c: answer, timeout=SHORT_S, sync=False) as (client, _):
        client.sync()


def test_early_eof_is_an_error() -> None:
    with pytest.raises(AgentError, match="closed the connection"), \
            fake_agent(lambda c: None, sync=False) as (client, _):
        client.sync()
    with pytest.raises(AgentError, match="closed the connection"), \
            fake_agent(synced(lambda c: Close(b'{"return": '))) as (client, _):
        client.ping()


@pytest.mark.parametrize(("answer", "message"), [
    (b"not json\n", "not JSON"),
    (b"[1, 2]\n", "not an object"),
    (b'{"retrun": 1}\n', "without 'return'"),
    (b'{"error": {"class": "GenericError", "desc": "no\\u001b[31m way"}}\n',
     "refused: no\\?\\[31m way"),
    (b'{"error": "flat"}\n', "malformed error reply"),
    (b"[" * 100000 + b"\n", "not JSON"),  # nesting deeper than the parser's recursion limit
])
def test_malformed_replies_are_errors(answer: bytes, message: str) -> None:
    with pytest.raises(AgentError, match=message), \
            fake_agent(synced(lambda c: answer)) as (client, _):
        client.ping()


def test_a_reply_larger_than_the_cap_is_refused_without_holding_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    cap = 64 << 10
    monkeypatch.setattr(agent, "MAX_REPLY", cap)
    with fake_agent(synced(lambda c: b"x" * (8 * cap))) as (client, _):
        with pytest.raises(AgentError, match="larger than"):
            client.ping()
        # what was read stayed within one receive of the cap
        assert len(client._buf) <= cap + agent.CHUNK


@pytest.mark.parametrize(("value", "message"), [
    ({"pid": -1}, "bad guest-exec reply 'pid'"),
    ({"pid": 0}, "bad guest-exec reply 'pid'"),
    ({"pid": 1 << 40}, "bad guest-exec reply 'pid'"),
    ({"pid": True}, "bad guest-exec reply 'pid'"),
    ({"pid": "12"}, "bad guest-exec reply 'pid'"),
    ({}, "bad guest-exec reply 'pid'"),
    ([], "malformed guest-exec reply"),
])
def test_bad_exec_pids_are_refused(value: object, message: str) -> None:
    with pytest.raises(AgentError, match=message), \
            fake_agent(synced(lambda c: reply(value))) as (client, _):
        client.spawn(["true"])


@pytest.mark.parametrize(("status", "message"), [
    ({"exited": True, "exitcode": -1}, "'exitcode'"),
    ({"exited": True, "exitcode": 256}, "'exitcode'"),
    ({"exited": True, "exitcode": 1.5}, "'exitcode'"),
    ({"exited": True, "signal": 1 << 33}, "'signal'"),
    ({"exited": "yes"}, "'exited'"),
    ({"exited": True, "out-data": "!!!!"}, "invalid base64"),
    ({"exited": True, "out-data": 7}, "not a string"),
    ({"exited": True, "err-data": "A" * (agent.b64_len(agent.MAX_EXEC_OUTPUT) + 4)},
     "more than"),
])
def test_bad_exec_status_replies_are_refused(status: dict[str, Any], message: str) -> None:
    with pytest.raises(AgentError, match=message):
        agent.parse_exec_status(status)


def test_run_polls_until_exit_and_decodes_output() -> None:
    polls = iter([{"exited": False}, {"exited": False},
                  {"exited": True, "exitcode": 7, "out-data": base64.b64encode(b"out\n").decode(),
                   "err-data": base64.b64encode(b"err\n").decode()}])

    def respond(cmd: dict[str, Any]) -> bytes | None:
        if cmd["execute"] == "guest-exec":
            assert cmd["arguments"] == {"path": "sh", "arg": ["-c", "x"], "capture-output": True}
            return reply({"pid": 42})
        assert cmd == {"execute": "guest-exec-status", "arguments": {"pid": 42}}
        return reply(next(polls))
    with fake_agent(synced(respond)) as (client, _):
        result = client.run(["sh", "-c", "x"], timeout=30)
    assert result == agent.ExecResult(7, None, b"out\n", b"err\n")


def test_run_timeout_kills_the_command_and_says_so() -> None:
    def respond(cmd: dict[str, Any]) -> bytes | None:
        if cmd["execute"] == "guest-exec":
            return reply({"pid": 42 if cmd["arguments"]["path"] == "sleep" else 43})
        return reply({"exited": False})
    with fake_agent(synced(respond)) as (client, seen), \
            pytest.raises(agent.AgentTimeout, match="still running") as info:
        client.run(["sleep", "100"], timeout=0.2)
    assert info.value.exit_code == 124
    kills = [c for c in seen if c["execute"] == "guest-exec"
             and c["arguments"]["path"] == "kill"]
    assert kills and kills[0]["arguments"]["arg"] == ["-KILL", "42"]


@pytest.mark.parametrize(("value", "message"), [
    ({"count": -1, "buf-b64": "", "eof": True}, "'count'"),
    ({"count": agent.CHUNK + 1, "buf-b64": "", "eof": True}, "'count'"),
    ({"count": 3, "buf-b64": base64.b64encode(b"ab").decode(), "eof": True}, "says 3 bytes"),
    ({"count": 0, "buf-b64": "A" * (agent.b64_len(agent.CHUNK) + 4), "eof": True}, "more than"),
    ({"count": 0, "buf-b64": "", "eof": None}, "'eof'"),
])
def test_bad_file_reads_are_refused(value: dict[str, Any], message: str) -> None:
    with pytest.raises(AgentError, match=message):
        agent.parse_read(value, agent.CHUNK)


class FileAgent:
    """guest-file-* over an in-memory file; writes take at most ``write_limit`` bytes."""

    def __init__(self, content: bytes = b"", write_limit: int | None = None) -> None:
        self.content = content
        self.written = bytearray()
        self.pos = 0
        self.write_limit = write_limit
        self.counts: list[int] = []
        self.closed = False

    def __call__(self, cmd: dict[str, Any]) -> bytes | None:
        name, args = cmd["execute"], cmd.get("arguments", {})
        if name == "guest-file-open":
            return reply(5)
        if name == "guest-file-read":
            self.counts.append(args["count"])
            data = self.content[self.pos:self.pos + args["count"]]
            self.pos += len(data)
            return reply({"count": len(data), "buf-b64": base64.b64encode(data).decode(),
                          "eof": self.pos >= len(self.content)})
        if name == "guest-file-write":
            data = base64.b64decode(args["buf-b64"])[:self.write_limit]
            self.written += data
            return reply({"count": len(data), "eof": False})
        if name == "guest-file-close":
            self.closed = True
        return reply({})


def test_file_read_streams_in_chunks() -> None:
    content = bytes(range(256)) * (10 << 10)  # 2.5 MiB
    fake = FileAgent(content)
    sink = io.BytesIO()
    advanced: list[int] = []
    with fake_agent(synced(fake)) as (client, _):
        assert client.read_file("/f", sink, advanced.append) == len(content)
    assert sink.getvalue() == content
    assert set(fake.counts) == {agent.CHUNK} and len(fake.counts) == 3
    assert sum(advanced) == len(content) and fake.closed


def test_file_write_resends_what_a_short_write_left() -> None:
    content = b"x" * (agent.CHUNK + 100)
    fake = FileAgent(write_limit=300 << 10)
    with fake_agent(synced(fake)) as (client, _):
        assert client.write_file("/f", io.BytesIO(content)) == len(content)
    assert bytes(fake.written) == content and fake.closed


def test_file_write_that_writes_nothing_is_an_error() -> None:
    fake = FileAgent(write_limit=0)
    with fake_agent(synced(fake)) as (client, _), pytest.raises(AgentError, match="nothing"):
        client.write_file("/f", io.BytesIO(b"data"))
    assert fake.closed


@pytest.mark.parametrize("handle", [-1, True, "5", 1 << 64, None])
def test_bad_file_handles_are_refused(handle: object) -> None:
    with fake_agent(synced(lambda c: reply(handle))) as (client, _), \
            pytest.raises(AgentError, match="file handle"):
        client.read_file("/f", io.BytesIO())


def test_interfaces_and_osinfo_are_checked() -> None:
    good = [{"name": "eth0", "hardware-address": "52:54:00:12:34:56", "ip-addresses": [
        {"ip-address-type": "ipv4", "ip-address": "10.0.2.15", "prefix": 24}]}]
    assert agent.parse_interfaces(good) == (agent.Interface(
        "eth0", "52:54:00:12:34:56", (agent.IpAddress("ipv4", "10.0.2.15", 24),)),)
    bads: list[list[dict[str, Any]]] = [
                [{"name": "eth0", "ip-addresses": [
                    {"ip-address-type": "ipv4", "ip-address": "x", "prefix": 33}]}],
                [{"name": "eth0", "ip-addresses": [
                    {"ip-address-type": "ipx", "ip-address": "x", "prefix": 1}]}],
                [{"name": "x" * (agent.MAX_TEXT + 1)}],
                [{}] * (agent.MAX_LIST + 1)]
    for bad in bads:
        with pytest.raises(AgentError):
            agent.parse_interfaces(bad)
    info = agent.parse_osinfo({"kernel-release": "6.12", "pretty-name": "Debian\x07"})
    assert (info.kernel_release, info.pretty_name, info.name) == ("6.12", "Debian?", None)
    with pytest.raises(AgentError):
        agent.parse_osinfo({"kernel-release": 6})


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
FIELDS = st.sampled_from(["exited", "exitcode", "signal", "out-data", "err-data", "count",
                          "buf-b64", "eof", "name", "ip-addresses", "prefix", "kernel-release"])
DOCS = st.dictionaries(FIELDS, JSON, max_size=6)


@given(st.one_of(JSON, DOCS))
def test_reply_checkers_raise_only_agent_errors(value: object) -> None:
    for check in (agent.parse_exec_status, agent.parse_osinfo, agent.parse_interfaces,
                  agent.parse_info, lambda v: agent.parse_read(v, agent.CHUNK)):
        with contextlib.suppress(AgentError):
            check(value)


@given(st.binary(max_size=256))
def test_any_reply_line_gives_a_value_or_an_agent_error(line: bytes) -> None:
    with contextlib.suppress(AgentError):
        agent.parse_reply(line)


@pytest.mark.parametrize(("text", "expected"), [
    ("vm1:/tmp/x", Location("/tmp/x", "vm1")),
    ("./a:b", Location("./a:b")),
    ("/tmp/a:b", Location("/tmp/a:b")),
    ("plain", Location("plain")),
    ("dir/a:b", Location("dir/a:b")),
])
def test_cp_locations(text: str, expected: Location) -> None:
    assert parse_location(text) == expected


def test_cp_guest_paths_must_be_absolute() -> None:
    with pytest.raises(UsageError, match="absolute"):
        parse_location("vm1:relative")


@contextlib.contextmanager
def one_client_at_a_time(path: Path, respond: Responder) -> Iterator[None]:
    """A fake agent socket that, like QEMU's chardev, serves one connection at a time."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(4)
    stop = threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            while not stop.is_set():
                conn, _ = listener.accept()
                with conn:
                    _serve(conn, respond, [])
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        listener.close()
        # a connection unblocks accept() if it is still waiting
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as poke:
            poke.connect(str(path))
        thread.join(5)


def test_a_long_command_leaves_the_channel_to_other_clients(tmp_path: Path) -> None:
    release = threading.Event()

    def respond(cmd: dict[str, Any]) -> bytes | None:
        if cmd["execute"] == "guest-exec":
            return reply({"pid": 42})
        if cmd["execute"] == "guest-exec-status":
            return reply({"exited": True, "exitcode": 0} if release.is_set()
                         else {"exited": False})
        return reply({"pong": True})
    path = tmp_path / "agent.sock"
    results: list[agent.ExecResult] = []
    with one_client_at_a_time(path, synced(respond)):
        runner = threading.Thread(target=lambda: results.append(
            agent.run_command(path, ["sleep", "9"], timeout=30, session_timeout=5)))
        runner.start()
        # another client gets its turn while the command still runs
        with agent.connect(path, timeout=5) as other:
            assert other.call("guest-ping") == {"pong": True}
        release.set()
        runner.join(30)
    assert results and results[0].exit_code == 0


def test_facts_stay_within_their_timeout_when_the_agent_stalls(tmp_path: Path) -> None:
    path = tmp_path / "agent.sock"
    seen: list[str] = []

    def respond(cmd: dict[str, Any]) -> bytes | None:
        seen.append(cmd["execute"])
        return b""  # answers the sync, then nothing
    with one_client_at_a_time(path, synced(respond)):
        facts = agent.facts(path, timeout=0.5)
    assert facts == {"answering": True, "ip": [], "os": None, "kernel": None}
    # the first stalled question used up the budget: the second was never asked
    assert seen == ["guest-get-osinfo"]
    assert agent.facts(tmp_path / "absent.sock") == agent.NOT_ANSWERING
