"""The Docker VM for real under TCG: ``egpu docker up`` boots the docker-capable test image
(``image build ai --packages docker.io``, the image the serve tests use too), its API answers
through what ``egpu docker env`` prints and nowhere else, a container imported from Debian's
busybox-static (no registry) publishes a port that appears on the host's 127.0.0.1 and goes when
the container stops, and ``egpu docker down`` stops the VM.

The guest image carries dockerd but no docker CLI (Debian's docker-cli is only a Recommends of
docker.io), so the test drives the Engine API from the host over the VM's socket, as a docker
CLI on the host would.
"""

from __future__ import annotations

import io
import json
import os
import socket
import stat
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from built_images import ARCH, BUILD_TIMEOUT_S, WORKLOAD, built_image
from conftest import SHARED_CACHE, Cli, _stop_leftovers
from egpu.images.rootfs import deb_data
from egpu.paths import CACHE_ENV, HOME_ENV
from test_ports_vm import FORWARD_WAIT_S, free_port, http_get, wait_until

UP_TIMEOUT_S = 1200  # firmware, systemd, cloud-init's first boot, dockerd's first start
API_TIMEOUT_S = 120.0  # one Engine API call under TCG (an image import unpacks 2 MB)
pytestmark = [pytest.mark.qemu, pytest.mark.download,
              pytest.mark.timeout(BUILD_TIMEOUT_S + UP_TIMEOUT_S + 900)]
NAME = "docker"
IMAGE = "egpu-busybox:test"
CONTAINER = "web"
CONTAINER_PORT = 8080
PREFERRED_PORT = 8124  # the example; another free port if this host holds it
GREETING = "egpu-docker-greeting"


@dataclass
class DockerVm:
    cli: Cli
    vm_dir: Path
    socket: Path


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The image the serve tests boot too: one cached build serves both."""
    return built_image(tmp_path_factory, *WORKLOAD)


@pytest.fixture(scope="module")
def docker_vm(test_image: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DockerVm]:
    """One VM for the module (one vCPU: see tests/test_distro_guest.py)."""
    home = Path(tmp_path_factory.mktemp("h"))
    cli = Cli({**os.environ, HOME_ENV: str(home), CACHE_ENV: str(SHARED_CACHE)}, home)
    started = time.monotonic()
    try:
        # docker up itself fails fast on a kernel panic in the serial log
        proc = cli("docker", "up", "--name", NAME, "--base", str(test_image), "--arch", ARCH,
                   "--gpu", "none", "--accel", "tcg", "--cpus", "1", "--memory", "2G",
                   "--ssh-port", str(free_port()), "--json", timeout=UP_TIMEOUT_S + 120)
        vm_dir = home / "data/vms" / NAME
        assert proc.returncode == 0, proc.stderr + _tail(vm_dir / "serial.log")
        print(f"docker up: {time.monotonic() - started:.0f}s to /_ping")
        doc = json.loads(proc.stdout)
        yield DockerVm(cli, vm_dir, Path(doc["socket"]))
    finally:
        cli("stop", NAME, "--force")
        _stop_leftovers(home)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def api(vm: DockerVm) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(vm.socket)),
                        base_url="http://docker", timeout=API_TIMEOUT_S)


def busybox_rootfs() -> bytes:
    """A tar of Debian's busybox-static (the built-in guest's, in the shared .deb cache) and
    a page for its httpd: the whole root of the test container."""
    debs = sorted((SHARED_CACHE / "debs").glob("busybox-static_*_amd64.deb"))
    assert debs, "no busybox-static .deb in the shared cache (egpu setup fetches it)"
    with tarfile.open(fileobj=io.BytesIO(deb_data(debs[-1].read_bytes()))) as data:
        member = data.extractfile("./usr/bin/busybox")
        assert member is not None
        busybox = member.read()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, body, mode in (("bin/busybox", busybox, 0o755),
                                 ("www/index.html", f"{GREETING}\n".encode(), 0o644)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(body), mode
            tar.addfile(info, io.BytesIO(body))
    return out.getvalue()


def host_port() -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", PREFERRED_PORT))
            return PREFERRED_PORT
        except OSError:
            return free_port()


def rows(vm: DockerVm) -> list[dict[str, Any]]:
    forwards: list[dict[str, Any]] = vm.cli.json("ports", NAME)["forwards"]
    return forwards


def test_ping_answers_through_what_docker_env_prints(docker_vm: DockerVm) -> None:
    line = docker_vm.cli("docker", "env", "--name", NAME, check=True).stdout.strip()
    assert line.startswith("export DOCKER_HOST=unix://")
    path = Path(line.removeprefix("export DOCKER_HOST=unix://").strip("'"))
    assert path == docker_vm.socket == docker_vm.vm_dir / "docker.sock"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                      base_url="http://docker", timeout=API_TIMEOUT_S) as client:
        reply = client.get("/_ping")
    assert reply.status_code == 200 and reply.text == "OK"
    doc = json.loads(docker_vm.cli("docker", "env", "--name", NAME, "--json", check=True).stdout)
    assert doc["DOCKER_HOST"] == f"unix://{path}"
    # up again reuses the running VM and answers at once
    again = docker_vm.cli("docker", "up", "--name", NAME, "--json", timeout=300)
    assert again.returncode == 0 and json.loads(again.stdout)["socket"] == str(path)


def _qemu_listeners(vm_dir: Path) -> list[tuple[str, int]]:
    """Every TCP address QEMU listens on: its socket inodes matched in /proc/net/tcp{,6}."""
    pid = int((vm_dir / "qemu.pid").read_text().split()[0])
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((address, int(port, 16)))
    return found


def test_api_socket_is_private_and_nothing_listens_beyond_loopback(docker_vm: DockerVm) -> None:
    mode = docker_vm.socket.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(docker_vm.vm_dir.stat().st_mode) == 0o700
    listeners = _qemu_listeners(docker_vm.vm_dir)
    assert listeners, "QEMU listens on no TCP port (not even ssh's forward)"
    # 127.0.0.1, as /proc/net/tcp prints it (little-endian); no IPv6 and no wildcard
    assert all(address == "0100007F" for address, _ in listeners), listeners
    assert 2375 not in {port for _, port in listeners}
    # the guest's API port is listed as not forwarded, with why
    api_rows = [f for f in rows(docker_vm) if f["guest_port"] == 2375]
    assert all(f["host_port"] is None and f["state"] == "ignored" for f in api_rows), api_rows


def test_a_published_container_port_is_mirrored_and_removed(docker_vm: DockerVm) -> None:
    port = host_port()
    with api(docker_vm) as client:
        made = client.post("/images/create", params={"fromSrc": "-", "repo": "egpu-busybox",
                                                     "tag": "test"},
                           content=busybox_rootfs(), headers={"Content-Type": "application/x-tar"})
        assert made.status_code == 200, made.text
        created = client.post("/containers/create", params={"name": CONTAINER}, json={
            "Image": IMAGE, "Cmd": ["/bin/busybox", "httpd", "-f", "-p", str(CONTAINER_PORT),
                                    "-h", "/www"],
            "ExposedPorts": {f"{CONTAINER_PORT}/tcp": {}},
            "HostConfig": {"PortBindings": {f"{CONTAINER_PORT}/tcp": [{"HostPort": str(port)}]}},
        })
        assert created.status_code == 201, created.text
        asked = time.monotonic()
        assert client.post(f"/containers/{CONTAINER}/start").status_code == 204
        running = time.monotonic()  # dockerd answers once the container runs
        # the promise is 10 s; under TCG on shared cores the time is reported, not held
        reply = wait_until(lambda: http_get(port), FORWARD_WAIT_S + 50, "the mirrored port")
        print(f"start call {running - asked:.1f}s; from its reply to an answer on "
              f"127.0.0.1:{port}: {time.monotonic() - running:.2f}s")
        assert GREETING in reply
        mine = [f for f in rows(docker_vm) if f["guest_port"] == port]
        # one forward, the docker one: the docker-proxy listener gets no second (auto) forward
        assert [(f["kind"], f["host_port"], f["state"]) for f in mine] == [
            ("docker", port, "active")], mine
        stopped = client.post(f"/containers/{CONTAINER}/stop", params={"t": "1"})
        assert stopped.status_code in (204, 304), stopped.text
    wait_until(lambda: not any(f["host_port"] == port for f in rows(docker_vm)),
               FORWARD_WAIT_S + 50, "the mirrored forward to go")
    assert http_get(port) is None


FAILING_UP_TIMEOUT_S = 20  # the daemon is stopped: any wait gives up; this one is short


def test_up_when_the_daemon_never_answers_fails_in_one_line_with_the_journal(
        docker_vm: DockerVm) -> None:
    """A daemon that never answers: up (reusing the running VM) gives up at its deadline, says
    why on one error line, shows docker.service's journal, and leaves the VM running."""
    # masked, not only stopped: a connection to the API socket would start dockerd again
    stop = docker_vm.cli("exec", NAME, "--timeout", "120", "--", "systemctl", "mask", "--runtime",
                         "--now", "docker.socket", "docker.service", timeout=180)
    assert stop.returncode == 0, stop.stderr
    proc = docker_vm.cli("docker", "up", "--name", NAME, "--timeout", str(FAILING_UP_TIMEOUT_S),
                         timeout=FAILING_UP_TIMEOUT_S + 300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "did not answer /_ping" in errors[0], proc.stderr
    assert "docker.service: " in proc.stderr and "Stopped docker.service" in proc.stderr, (
        proc.stderr)  # the journal's own lines
    assert docker_vm.cli.status(NAME)["state"] == "running"


def test_down_stops_the_vm(docker_vm: DockerVm) -> None:
    proc = docker_vm.cli("docker", "down", "--name", NAME, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert docker_vm.cli.status(NAME)["state"] == "stopped"
    after = docker_vm.cli("docker", "env", "--name", NAME)
    assert after.returncode == 1 and "is stopped" in after.stderr
