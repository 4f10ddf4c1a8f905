"""Port forwarding's pure core: the guest's TCP tables, the plan, reconcile, the record."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import Cli, InProcessCli
from egpu.engine.argv import hostfwd_host, hostfwd_rule
from egpu.errors import AgentError, UsageError
from egpu.vm import ports
from egpu.vm.forwarder import CappedSink, host_port_busy
from egpu.vm.lifecycle import parse_port_forwards

# Linux net/ipv4/tcp_ipv4.c (get_tcp4_sock) and net/ipv6/tcp_ipv6.c (get_tcp6_sock) formats.
TCP_HEADER = ("  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt"
              "   uid  timeout inode")
TCP6_HEADER = ("  sl  local_address                         remote_address                        "
               "st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode")
TAIL = (" 00000000:00000000 00:00000000 00000000     0        0 12345 1 0000000000000000"
        " 100 0 0 10 0")

@pytest.fixture
def cli(inproc: InProcessCli) -> Cli:
    """What these commands decide and print is tested in-process (quick; see InProcessCli)."""
    return inproc



def tcp_line(slot: int, address: str, port: int, state: str) -> str:
    remote = "0" * len(address)
    return f"{slot:4d}: {address}:{port:04X} {remote}:0000 {state}{TAIL}"


def table(header: str, entries: list[tuple[str, int, str]]) -> str:
    return "\n".join([header, *(tcp_line(i, a, p, s) for i, (a, p, s) in enumerate(entries))])


ANY4 = "00000000"
LOOP4 = "0100007F"  # 127.0.0.1, little-endian
GUEST4 = "0F02000A"  # 10.0.2.15, the guest's slirp address
ANY6 = "0" * 32
LOOP6 = "00000000000000000000000001000000"
MAPPED_LOOP6 = "0000000000000000FFFF00000100007F"
ESTABLISHED = "01"


def test_golden_tcp_and_tcp6_tables() -> None:
    tcp = table(TCP_HEADER, [(ANY4, 8123, "0A"), (LOOP4, 6000, "0A"), (GUEST4, 7000, "0A"),
                             (GUEST4, 8123, ESTABLISHED), (LOOP4, 9000, ESTABLISHED)])
    tcp6 = table(TCP6_HEADER, [(ANY6, 5000, "0A"), (LOOP6, 5001, "0A"),
                               (MAPPED_LOOP6, 5002, "0A"), (LOOP6, 6000, "0A")])
    assert ports.parse_tcp_table(tcp) == {8123: "any", 6000: "loopback", 7000: "any"}
    assert ports.parse_tcp_table(tcp6) == {5000: "any", 5001: "loopback", 5002: "loopback",
                                           6000: "loopback"}
    merged = ports.listening_ports(tcp, tcp6)
    assert merged[6000] == "loopback" and merged[8123] == "any" and 9000 not in merged
    # a port with a reachable listener anywhere reaches
    both = table(TCP6_HEADER, [(ANY6, 6000, "0A")])
    assert ports.listening_ports(tcp, both)[6000] == "any"


def test_the_hosts_own_tables_parse() -> None:
    # the host kernel writes the same format (and is little-endian, as both guest arches)
    with socket.socket() as anywhere, socket.socket() as loop:
        anywhere.bind(("0.0.0.0", 0))
        loop.bind(("127.0.0.1", 0))
        anywhere.listen()
        loop.listen()
        found = ports.listening_ports(Path("/proc/net/tcp").read_text(),
                                      Path("/proc/net/tcp6").read_text())
        assert found[anywhere.getsockname()[1]] == "any"
        assert found[loop.getsockname()[1]] == "loopback"


entry = st.tuples(st.sampled_from([ANY4, LOOP4, GUEST4]), st.integers(1, 65535),
                  st.sampled_from(["0A", "01", "06", "08"]))


@given(st.lists(entry, max_size=40))
def test_exactly_the_listeners_are_found(entries: list[tuple[str, int, str]]) -> None:
    expected: dict[int, str] = {}
    for address, port, state in entries:
        if state == "0A" and expected.get(port) != "any":
            expected[port] = "loopback" if address == LOOP4 else "any"
    assert ports.parse_tcp_table(table(TCP_HEADER, entries)) == expected


@given(st.text(max_size=2000))
def test_any_text_never_raises(text: str) -> None:
    found = ports.parse_tcp_table(text)
    assert all(1 <= p <= 65535 and r in ("any", "loopback") for p, r in found.items())


@given(st.binary(max_size=600).map(lambda b: b.decode("latin-1")))
def test_hostile_lines_never_raise(noise: str) -> None:
    text = table(TCP_HEADER, [(ANY4, 8000, "0A")]) + "\n" + noise + "\n" + noise * 3
    assert ports.parse_tcp_table(text).get(8000) == "any"


def test_counts_lengths_and_fields_are_bounded() -> None:
    many = [(ANY4, 10000 + i, "0A") for i in range(ports.MAX_TABLE_LINES + 50)]
    assert len(ports.parse_tcp_table(table(TCP_HEADER, many))) == ports.MAX_TABLE_LINES
    long_line = tcp_line(0, ANY4, 8000, "0A") + " " * ports.MAX_LINE_CHARS
    assert ports.parse_tcp_table(TCP_HEADER + "\n" + long_line) == {}
    for bad in ("   0: 0000000G:1F90 00000000:0000 0A",  # not hex
                "   0: 000000000:1F90 00000000:0000 0A",  # nine digits
                "   0: 00000000:1F9 00000000:0000 0A",  # short port
                "   0: 00000000:0000 00000000:0000 0A",  # port 0
                "   0: 00000000:1F90 00000000:0000 0AB",  # state of three digits
                "x: 00000000:1F90 00000000:0000 0A"):
        assert ports.parse_tcp_table(bad) == {}, bad
    assert ports.parse_tcp_table("   0: 00000000:1F90 00000000:0000 0a") == {8080: "any"}


def test_plan_ignores_ssh_privileged_and_loopback_and_caps_automatic_ones() -> None:
    listeners: dict[int, ports.Reach] = {22: "any", 80: "any", 1023: "any", 1024: "any",
                                         5000: "loopback", 8123: "any", 18080: "any", 3000: "any"}
    wanted, skipped = ports.plan(listeners, static=[(18080, 8080), (2080, 80)], ssh_port=2222)
    assert wanted == [ports.Want(2222, 22, "ssh"), ports.Want(18080, 8080, "static"),
                      ports.Want(2080, 80, "static"), ports.Want(1024, 1024, "auto"),
                      ports.Want(3000, 3000, "auto"), ports.Want(8123, 8123, "auto")]
    states = {f.guest_port: (f.state, f.host_port) for f in skipped}
    assert states == {1023: ("ignored", None), 5000: ("guest-loopback", None),
                      18080: ("conflict", 18080)}  # 22 and 80 are covered by ssh and --port
    assert "static forward" in next(f.reason or "" for f in skipped if f.guest_port == 18080)

    off, none_skipped = ports.plan(listeners, static=[(18080, 8080)], automatic=False)
    assert off == [ports.Want(18080, 8080, "static")] and none_skipped == []

    crowd: dict[int, ports.Reach] = {p: "any" for p in range(20000, 20000 + 300)}
    autos, rest = ports.plan(crowd)
    assert len(autos) == ports.MAX_AUTO_FORWARDS
    assert len(rest) == 300 - ports.MAX_AUTO_FORWARDS and {f.state for f in rest} == {"ignored"}


port = st.integers(1024, 1100)


@given(st.dictionaries(port, port, max_size=20), st.dictionaries(port, port, max_size=20),
       st.sets(port, max_size=3))
def test_reconcile_reaches_what_is_wanted(want_map: dict[int, int], installed: dict[int, int],
                                          fixed: set[int]) -> None:
    wanted = [ports.Want(h, g, "auto") for h, g in want_map.items()]
    actions = ports.reconcile(wanted, installed, fixed)
    after = {h: g for h, g in installed.items() if h not in actions.remove}
    assert not set(actions.remove) & fixed
    assert all(w.host_port not in after for w in actions.add)  # never added over a live one
    after.update({w.host_port: w.guest_port for w in actions.add})
    expected = {h: g for h, g in want_map.items() if h not in fixed}
    expected.update({h: g for h, g in installed.items() if h in fixed})
    assert after == expected
    # reconciling again changes nothing
    assert ports.reconcile(wanted, after, fixed) == ports.Actions()


def test_forward_table_states() -> None:
    wanted = [ports.Want(2222, 22, "ssh"), ports.Want(8123, 8123, "auto"),
              ports.Want(9000, 9000, "auto"), ports.Want(18080, 8080, "static")]
    problems = {9000: ports.Problem("conflict", "host port 9000 is in use")}
    rows = ports.forward_table(wanted, [], {2222: 22, 8123: 8123}, problems)
    assert [(r.kind, r.host_port, r.state) for r in rows] == [
        ("ssh", 2222, "active"), ("static", 18080, "failed"), ("auto", 8123, "active"),
        ("auto", 9000, "conflict")]


@given(st.integers(1, 65535), st.integers(1, 65535))
def test_port_option_round_trip(host: int, guest: int) -> None:
    assert ports.parse_port_option(f"{host}:{guest}") == (host, guest)
    assert ports.parse_port_option(str(guest)) == (guest, guest)
    assert hostfwd_rule(host, guest) == f"tcp:127.0.0.1:{host}-:{guest}"
    assert hostfwd_host(host) == f"tcp:127.0.0.1:{host}"


@pytest.mark.parametrize("text", ["0:80", "80:0", "65536:80", "abc", ":80", "80:", "1:2:3",
                                  "-1:80", "\uff18\uff10:80", "00000000080:80", "", "80 :80"])
def test_bad_port_options_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="--port"):
        ports.parse_port_option(text)


def test_port_forwards_given_twice_are_refused() -> None:
    assert parse_port_forwards(["18080:8080", "9000"], None) == ((18080, 8080), (9000, 9000))
    with pytest.raises(UsageError, match="forwarded twice"):
        parse_port_forwards(["18080:8080", "18080:80"], None)
    with pytest.raises(UsageError, match="forwarded twice"):
        parse_port_forwards(["2222:80"], 2222)


@pytest.mark.parametrize("args", [("--port", "0:80"), ("--port", "x"), ("--port", "70000:1"),
                                  ("--port", "2299:80", "--ssh-port", "2299"),
                                  ("--port", "9000:1", "--port", "9000:2")])
def test_run_refuses_bad_ports_in_one_line(cli: Cli, args: tuple[str, ...]) -> None:
    proc = cli("run", "--dry-run", "--gpu", "none", *args)
    assert proc.returncode == 2, proc.stderr
    assert "--port" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_port_table_round_trips_and_refuses_malformed_records() -> None:
    t = ports.PortTable(automatic=True, guest_error=None, updated=12.5, forwards=(
        ports.Forward(8123, 8123, "auto", "active"),
        ports.Forward(None, 5000, "auto", "guest-loopback", "loopback only")))
    assert ports.PortTable.from_json(t.to_json()) == t
    good = t.to_json()
    bad: object
    for bad in ([], {**good, "automatic": 1}, {**good, "updated": True},
                {**good, "forwards": [{"host_port": 0, "guest_port": 1, "kind": "auto",
                                       "state": "active", "reason": None}]},
                {**good, "forwards": [{**good["forwards"][0], "state": "weird"}]},
                {**good, "forwards": [{**good["forwards"][0], "guest_port": True}]},
                {**good, "forwards": [{**good["forwards"][0], "reason": 3}]},
                {**good, "forwards": "x"}):
        with pytest.raises(ValueError):
            ports.PortTable.from_json(bad)


@contextmanager
def listening(host: str = "127.0.0.1") -> Iterator[int]:
    with socket.socket() as s:
        s.bind((host, 0))
        s.listen()
        yield s.getsockname()[1]


def test_host_port_busy_sees_listeners_on_loopback_and_everywhere() -> None:
    for host in ("127.0.0.1", "0.0.0.0"):
        with listening(host) as busy:
            assert "in use" in (host_port_busy(busy) or "")
    with listening() as freed:
        pass
    assert host_port_busy(freed) is None


def test_a_guest_table_larger_than_the_bound_is_refused_not_buffered() -> None:
    sink = CappedSink(ports.MAX_TABLE_BYTES)
    sink.write(b"x" * ports.MAX_TABLE_BYTES)
    with pytest.raises(AgentError, match="more than"):
        sink.write(b"y")
    assert len(sink.getvalue()) == ports.MAX_TABLE_BYTES


def test_ports_of_an_unknown_vm_is_one_line(cli: Cli) -> None:
    for args in (("ports", "nosuch"), ("ports", "nosuch", "--json")):
        proc = cli(*args)
        assert proc.returncode == 1 and "no VM named 'nosuch'" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
