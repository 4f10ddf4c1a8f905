"""The Docker VM's pure core and CLI edges that boot nothing: the daemon's replies (recorded in
the Docker Engine API's documented shapes, and hostile ones), the mirror plan beside the
automatic forwards, the guest's cloud-config, the socket forward's QEMU rule, and
``egpu docker env|context|down`` errors and output."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import queue
import socketserver
import stat
import threading
import time
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from conftest import InProcessCli
from egpu.engine.argv import VmSpec, build_argv, hostfwd_unix_rule
from egpu.errors import UsageError
from egpu.images import seed
from egpu.vm import docker_api, ports, store
from egpu.vm.docker_mirror import DockerWatcher, _lines, ping
from egpu.vm.ports import Mirror

ID1 = "8dfafdbc3a40" + "0" * 52
ID2 = "9cd87474be90" + "1" * 52

# GET /containers/json as dockerd 26 answers it (Engine API v1.45, "List containers"): one
# container publishing 8080 on every IPv4 and IPv6 address as 8124, with an unpublished and a
# udp port; one publishing on the guest's loopback only.
RECORDED_LIST = json.dumps([
    {"Id": ID1, "Names": ["/web"], "Image": "egpu-busybox:test", "ImageID": "sha256:" + "a" * 64,
     "Command": "/bin/busybox httpd -f -p 8080 -h /www", "Created": 1764607200,
     "Ports": [{"IP": "0.0.0.0", "PrivatePort": 8080, "PublicPort": 8124, "Type": "tcp"},
               {"IP": "::", "PrivatePort": 8080, "PublicPort": 8124, "Type": "tcp"},
               {"PrivatePort": 80, "Type": "tcp"},
               {"IP": "0.0.0.0", "PrivatePort": 53, "PublicPort": 5353, "Type": "udp"}],
     "Labels": {}, "State": "running", "Status": "Up 3 seconds",
     "HostConfig": {"NetworkMode": "bridge"}, "Mounts": []},
    {"Id": ID2, "Names": ["/private"], "Image": "egpu-busybox:test",
     "Ports": [{"IP": "127.0.0.1", "PrivatePort": 9000, "PublicPort": 9000, "Type": "tcp"}],
     "State": "running"},
]).encode()

# GET /events lines (Engine API "Monitor events"): a start, an unrelated event, a die.
RECORDED_EVENTS = [
    json.dumps({"status": "start", "id": ID1, "from": "egpu-busybox:test", "Type": "container",
                "Action": "start", "Actor": {"ID": ID1, "Attributes": {"name": "web"}},
                "scope": "local", "time": 1764607200, "timeNano": 1764607200000000000}),
    json.dumps({"Type": "network", "Action": "connect",
                "Actor": {"ID": "b" * 64, "Attributes": {"container": ID1}}}),
    json.dumps({"status": "die", "id": ID1, "Type": "container", "Action": "die",
                "Actor": {"ID": ID1, "Attributes": {"exitCode": "137", "name": "web"}}}),
]


def test_recorded_container_list_gives_the_published_tcp_ports() -> None:
    containers = docker_api.parse_containers(RECORDED_LIST)
    assert set(containers) == {ID1, ID2}
    assert containers[ID1].name == "web"
    # IPv4 and IPv6 entries of one port are one mirror; unpublished and udp ports none
    assert docker_api.mirrors(containers) == (
        Mirror(8124, "any", "web"), Mirror(9000, "loopback", "private"))


def test_recorded_events_drive_the_containers() -> None:
    events = [docker_api.parse_event(line.encode()) for line in RECORDED_EVENTS]
    assert events == [docker_api.Event("start", ID1), None, docker_api.Event("die", ID1)]
    containers = docker_api.parse_containers(RECORDED_LIST)
    after_start, relist = docker_api.apply_event(containers, docker_api.Event("start", ID1))
    assert relist and after_start == containers
    after_die, relist = docker_api.apply_event(containers, docker_api.Event("die", ID1))
    assert not relist and set(after_die) == {ID2}
    after_stop, _ = docker_api.apply_event(after_die, docker_api.Event("stop", ID2))
    assert after_stop == {} and docker_api.mirrors(after_stop) == ()


def test_events_query_asks_for_container_start_die_and_stop() -> None:
    query = docker_api.events_query()
    assert query.startswith("filters=")
    from urllib.parse import parse_qs

    assert json.loads(parse_qs(query)["filters"][0]) == {
        "type": ["container"], "event": ["start", "die", "stop"]}


@pytest.mark.parametrize("body", [
    b"not json", b"{}", b'"a string"', b"[" * 100_000 + b"]" * 100_000,
    b" " * (docker_api.MAX_LIST_BYTES + 1),
    json.dumps([{"Id": ID1}] * (docker_api.MAX_CONTAINERS + 1)).encode(),
], ids=["garbage", "object", "string", "deep", "huge", "too-many"])
def test_unusable_container_lists_are_one_error(body: bytes) -> None:
    with pytest.raises(docker_api.DockerReplyError):
        docker_api.parse_containers(body)


@pytest.mark.parametrize("port", [0, 70000, -1, True, "8080", 8080.0, None, 2 ** 64])
def test_published_ports_outside_1_to_65535_are_skipped(port: object) -> None:
    body = json.dumps([{"Id": ID1, "Names": ["/x"],
                        "Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": port,
                                   "Type": "tcp"}]}]).encode()
    assert docker_api.mirrors(docker_api.parse_containers(body)) == ()


@pytest.mark.parametrize("entry", [
    {"Names": ["/x"]}, {"Id": "XYZ"}, {"Id": ID1.upper()}, {"Id": "a" * 65}, {"Id": 7},
    "a string", None, [ID1],
], ids=["no-id", "not-hex", "upper", "long", "number", "string", "null", "list"])
def test_containers_without_a_usable_id_are_skipped(entry: object) -> None:
    body = json.dumps([entry, {"Id": ID2, "Names": ["/ok"]}]).encode()
    assert set(docker_api.parse_containers(body)) == {ID2}


def test_hostile_names_and_port_counts_are_bounded() -> None:
    many = [{"IP": "0.0.0.0", "PrivatePort": 1, "PublicPort": 10000 + i, "Type": "tcp"}
            for i in range(docker_api.MAX_PORTS_PER_CONTAINER * 4)]
    body = json.dumps([{"Id": ID1, "Names": ["/\x1b[31mred\n", "/" + "n" * 500], "Ports": many},
                       {"Id": ID2, "Names": "not a list", "Ports": "nope"}]).encode()
    containers = docker_api.parse_containers(body)
    assert containers[ID1].name == ID1[:12]  # no usable name: the short id, never the text
    assert len(containers[ID1].ports) == docker_api.MAX_PORTS_PER_CONTAINER
    assert containers[ID2] == docker_api.Container(ID2, ID2[:12], ())


@given(st.binary(max_size=2048))
def test_any_container_list_bytes_give_containers_or_one_error(body: bytes) -> None:
    with contextlib.suppress(docker_api.DockerReplyError):
        for container in docker_api.parse_containers(body).values():
            assert len(container.ports) <= docker_api.MAX_PORTS_PER_CONTAINER


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                     lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(
                         ["Id", "Names", "Ports", "IP", "PublicPort", "Type", "Action", "Actor",
                          "ID", "id", "status"]), inner, max_size=5), max_leaves=20)


@given(st.lists(_json, max_size=5))
def test_any_json_container_list_never_raises(doc: list[object]) -> None:
    containers = docker_api.parse_containers(json.dumps(doc).encode())
    for mirror in docker_api.mirrors(containers):
        assert 1 <= mirror.port <= 65535


@given(st.binary(max_size=1024) | _json.map(lambda d: json.dumps(d).encode()))
def test_any_event_line_never_raises(line: bytes) -> None:
    event = docker_api.parse_event(line)
    assert event is None or len(event.id) <= 64


def test_overlong_event_lines_are_skipped() -> None:
    line = json.dumps({"Type": "container", "Action": "die", "id": ID1,
                       "pad": "x" * docker_api.MAX_EVENT_BYTES}).encode()
    assert docker_api.parse_event(line) is None
    # the stream splitter drops a line longer than the cap whole, even across chunks
    good = RECORDED_EVENTS[0].encode()
    chunks = [good[:10], good[10:] + b"\n" + b"y" * (docker_api.MAX_EVENT_BYTES // 2),
              b"y" * docker_api.MAX_EVENT_BYTES, b"y\n" + good + b"\n"]
    assert list(_lines(iter(chunks))) == [good, good]


def test_mirrors_win_over_automatic_forwards_and_the_api_port_is_private() -> None:
    # the docker-proxy listens on 8124 in the guest: that port gets one forward, kind docker
    listeners: dict[int, ports.Reach] = {8124: "any", docker_api.GUEST_API_PORT: "any",
                                         9000: "loopback", 7000: "any"}
    mirrors = (Mirror(8124, "any", "web"), Mirror(9000, "loopback", "private"),
               Mirror(8124, "any", "web"))
    wanted, skipped = ports.plan(listeners, ssh_port=2222, docker=mirrors,
                                 private={docker_api.GUEST_API_PORT})
    assert wanted == [ports.Want(2222, 22, "ssh"), ports.Want(8124, 8124, "docker"),
                      ports.Want(7000, 7000, "auto")]
    states = {(f.guest_port, f.kind): f.state for f in skipped}
    assert states == {(9000, "docker"): "guest-loopback",
                      (docker_api.GUEST_API_PORT, "auto"): "ignored"}


def test_a_mirror_on_a_static_host_port_is_a_conflict_note() -> None:
    wanted, skipped = ports.plan({}, static=[(8124, 80)], docker=[Mirror(8124, "any", "web")])
    assert wanted == [ports.Want(8124, 80, "static")]
    assert [(f.kind, f.state) for f in skipped] == [("docker", "conflict")]
    assert "static forward" in (skipped[0].reason or "")


def test_mirrors_are_capped() -> None:
    mirrors = [Mirror(20000 + i, "any", "c") for i in range(ports.MAX_AUTO_FORWARDS + 5)]
    wanted, skipped = ports.plan({}, docker=mirrors)
    assert len(wanted) == ports.MAX_AUTO_FORWARDS
    assert len(skipped) == 5 and {f.state for f in skipped} == {"ignored"}


def test_docker_rows_round_trip_through_the_port_table() -> None:
    table = ports.PortTable(automatic=True, forwards=(
        ports.Forward(8124, 8124, "docker", "active"),))
    assert ports.PortTable.from_json(json.loads(json.dumps(table.to_json()))) == table


def test_guest_cloud_config_limits_the_api_to_slirps_host_and_merges_into_the_seed() -> None:
    doc = docker_api.guest_cloud_config()
    units = {f["path"]: f["content"] for f in doc["write_files"]}
    socket_unit = units[f"/etc/systemd/system/{docker_api.API_SOCKET_UNIT}"]
    assert f"ListenStream={docker_api.GUEST_API_PORT}" in socket_unit
    assert "IPAddressDeny=any" in socket_unit and "IPAddressAllow=10.0.2.2" in socket_unit
    service = units[f"/etc/systemd/system/{docker_api.API_SERVICE_UNIT}"]
    assert "systemd-socket-proxyd /run/docker.sock" in service
    spec = seed.SeedSpec(hostname="docker", instance_id="i-1", user="me",
                         public_keys=("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIB me@host",),
                         user_data=doc)
    text = seed.user_data(spec)
    loaded = yaml.safe_load(text)
    assert loaded["write_files"] == doc["write_files"]
    # egpu's own runcmd (the guest agent) stays first, the Docker units are enabled after it
    assert loaded["runcmd"][-2:] == [["systemctl", "enable", "--now", docker_api.API_SOCKET_UNIT],
                                     ["systemctl", "enable", "--now", "docker.service"]]
    assert len(loaded["runcmd"]) == 4


def test_socket_forward_rule_and_its_refusals(tmp_path: Path) -> None:
    assert hostfwd_unix_rule(Path("/v/a-b/docker.sock"), 2375) == "unix:/v/a-b/docker.sock-:2375"
    for bad in (Path("relative.sock"), Path("/a:b/docker.sock"), Path("/" + "x" * 120)):
        with pytest.raises(UsageError):
            hostfwd_unix_rule(bad, 2375)
    with pytest.raises(UsageError):
        hostfwd_unix_rule(Path("/v/docker.sock"), 0)


def test_the_api_socket_is_the_only_forward_beside_ssh() -> None:
    vm = VmSpec(name="docker", arch="x86_64", cpus=1, memory_mib=2048, accel="tcg",
                qmp_socket=Path("/r/qmp.sock"), console_socket=Path("/r/con.sock"),
                serial_log=Path("/r/serial.log"), ssh_port=2222,
                socket_forwards=((Path("/r/a,b/docker.sock"), docker_api.GUEST_API_PORT),))
    argv = build_argv(["q"], vm)
    netdev = argv[argv.index("-netdev") + 1]
    # the comma in the path is doubled (QemuOpts), so it stays part of the one rule
    assert netdev == ("user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22,"
                      "hostfwd=unix:/r/a,,b/docker.sock-:2375")


def _docker_vm(home: Path, name: str = "docker", docker: bool = True) -> store.VmDir:
    vm = store.VmDir(name, root=home / "data" / "vms")
    vm.create()
    vm.write_config(store.VmConfig(
        name=name, arch="x86_64", cpus=1, memory_mib=2048, accel="tcg", gpu_path="none",
        qemu="test", qemu_version="11.1", argv=["qemu-system-x86_64"], docker=docker))
    return vm


def test_docker_config_round_trips(egpu_home: Path) -> None:
    vm = _docker_vm(egpu_home)
    assert vm.read_config().docker
    assert not _docker_vm(egpu_home, "plain", docker=False).read_config().docker


def test_env_and_down_refuse_what_is_not_a_running_docker_vm(inproc: InProcessCli) -> None:
    missing = inproc("docker", "env")
    assert missing.returncode == 1 and "no Docker VM named 'docker'" in missing.stderr
    assert "egpu docker up" in missing.stderr
    _docker_vm(inproc.home, "plain", docker=False)
    plain = inproc("docker", "env", "--name", "plain")
    assert plain.returncode == 2 and "not a Docker VM" in plain.stderr
    _docker_vm(inproc.home)
    stopped = inproc("docker", "env", "--json")
    assert stopped.returncode == 1 and "is stopped" in stopped.stderr, stopped.stderr
    down = inproc("docker", "down")
    assert down.returncode == 0 and "already stopped" in down.stderr
    assert inproc("docker", "down", "--name", "plain").returncode == 2
    bad = inproc("docker", "env", "--name", "-x")
    assert bad.returncode == 2 and "bad VM name" in bad.stderr
    assert inproc("docker", "up", "--timeout", "0").returncode == 2
    assert inproc("docker", "up", "--base", "a", "--image", "b").returncode == 2


FAKE_DOCKER = """#!/bin/sh
printf '%s\\n' "$*" >> "{log}"
if [ "$1 $2" = "context inspect" ]; then
    [ -e "{exists}" ] && exit 0
    echo "context not found" >&2; exit 1
fi
if [ "$2" = "create" ]; then : > "{exists}"; fi
exit 0
"""


def test_context_needs_a_docker_cli(inproc: InProcessCli, tmp_path: Path) -> None:
    _docker_vm(inproc.home)
    inproc.env["PATH"] = str(tmp_path)  # nothing named docker there
    proc = inproc("docker", "context")
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "no docker CLI" in lines[0] and len(lines) <= 2, proc.stderr


def test_context_is_created_then_updated(inproc: InProcessCli, tmp_path: Path) -> None:
    vm = _docker_vm(inproc.home)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log, exists = tmp_path / "argv.log", tmp_path / "exists"
    fake = bindir / "docker"
    fake.write_text(FAKE_DOCKER.format(log=log, exists=exists))
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    inproc.env["PATH"] = f"{bindir}{os.pathsep}{inproc.env['PATH']}"
    host = f"unix://{vm.file(store.DOCKER_SOCKET)}"
    first = inproc("docker", "context", "--json")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == {"context": "egpu", "action": "created",
                                        "docker_host": host}
    second = inproc("docker", "context")
    assert second.returncode == 0 and "updated" in second.stderr
    calls = log.read_text().splitlines()
    assert calls == [
        "context inspect egpu",
        f"context create egpu --description egpu Docker VM docker --docker host={host}",
        "context inspect egpu",
        f"context update egpu --description egpu Docker VM docker --docker host={host}",
    ]


class _FakeDaemon(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """dockerd's three endpoints the watcher uses, over a unix socket, in documented shapes:
    a container list the test sets, and an events stream fed line by line (chunked)."""

    daemon_threads = True

    def __init__(self, path: Path) -> None:
        self.containers: list[dict[str, object]] = []
        self.events: queue.Queue[bytes | None] = queue.Queue()
        self.lists = 0
        super().__init__(str(path), _Handler)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _FakeDaemon

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        if self.path == "/_ping":
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"OK")
            return
        if self.path.startswith("/containers/json"):
            self.server.lists += 1
            body = json.dumps(self.server.containers).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        assert self.path.startswith("/events?filters=")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.wfile.flush()
        while (line := self.server.events.get()) is not None:
            chunk = line + b"\n"
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")  # the daemon ends the stream: the watcher reconnects
        self.close_connection = True


def _published(container_id: str, name: str, port: int) -> dict[str, object]:
    return {"Id": container_id, "Names": [f"/{name}"], "State": "running",
            "Ports": [{"IP": "0.0.0.0", "PrivatePort": 80, "PublicPort": port, "Type": "tcp"}]}


def test_watcher_follows_events_and_lists_again_on_each_connect(tmp_path: Path) -> None:
    daemon = _FakeDaemon(tmp_path / "docker.sock")
    threading.Thread(target=daemon.serve_forever, daemon=True).start()
    changes = threading.Event()
    logged: list[str] = []
    watcher = DockerWatcher(tmp_path / "docker.sock", log=logged.append, on_change=changes.set)
    stop = threading.Event()
    daemon.containers = [_published(ID1, "web", 8124)]
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    try:
        def mirrored(expected: tuple[Mirror, ...]) -> None:
            deadline = time.monotonic() + 30
            while watcher.mirrors() != expected:
                assert time.monotonic() < deadline, (watcher.mirrors(), logged)
                changes.wait(0.2)
                changes.clear()

        mirrored((Mirror(8124, "any", "web"),))  # the list on connect
        assert ping(tmp_path / "docker.sock") is None
        daemon.containers.append(_published(ID2, "api", 9000))
        daemon.events.put(RECORDED_EVENTS[1].encode())  # not a container event: ignored
        daemon.events.put(json.dumps({"Type": "container", "Action": "start",
                                      "Actor": {"ID": ID2}}).encode())
        mirrored((Mirror(8124, "any", "web"), Mirror(9000, "any", "api")))
        daemon.events.put(b"\xff garbage")
        daemon.events.put(RECORDED_EVENTS[2].encode())  # web died: removed without a list
        mirrored((Mirror(9000, "any", "api"),))
        lists = daemon.lists
        daemon.containers = []
        daemon.events.put(None)  # the stream ends; reconnecting lists again: api is gone too
        mirrored(())
        assert daemon.lists > lists
    finally:
        stop.set()
        daemon.events.put(None)
        daemon.shutdown()
        daemon.server_close()


def test_watcher_survives_a_daemon_that_is_not_there(tmp_path: Path) -> None:
    logged: list[str] = []
    watcher = DockerWatcher(tmp_path / "missing.sock", log=logged.append, on_change=lambda: None)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, args=(stop,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not logged:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    assert watcher.mirrors() == () and len(logged) == 1 and "retrying" in logged[0]
    assert ping(tmp_path / "missing.sock") is not None
