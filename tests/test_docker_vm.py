"""The Docker VM for real under TCG: ``egpu docker up --profile ai`` boots egpu's ai image
(llama-server and Docker, the image the serve tests boot too), its API answers through what
``egpu docker env`` prints and nowhere else, and a real docker CLI on the host drives it: a
container imported from Debian's busybox-static (no registry) and run with ``-p`` appears on the
host's 127.0.0.1 and goes when ``docker stop`` stops it; ``egpu docker context`` gives that CLI a
working context; ``egpu docker down`` stops the VM.

The host's docker CLI is the very binary the image carries (Debian's docker-cli, whose .deb the
image build left in the shared cache), unpacked into the test's own directory.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import socket
import stat
import subprocess
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
from egpu.vm.docker_api import GUEST_API_PORT
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


DOCKER_CLI_TIMEOUT_S = 300  # one docker CLI call under TCG (an import unpacks 2 MB)


@dataclass
class DockerVm:
    cli: Cli
    vm_dir: Path
    socket: Path
    docker: Path  # a docker CLI for this host


def deb_member(glob: str, member: str) -> bytes:
    """One file of the newest .deb matching ``glob`` in the shared .deb cache."""
    debs = sorted((SHARED_CACHE / "debs").glob(glob))
    assert debs, f"no {glob} in the shared .deb cache (egpu setup and image build fetch it)"
    with tarfile.open(fileobj=io.BytesIO(deb_data(debs[-1].read_bytes()))) as data:
        found = data.extractfile(member)
        assert found is not None, f"{debs[-1].name} has no {member}"
        return found.read()


def docker_cli(directory: Path) -> Path:
    """The docker CLI of the image's docker-cli .deb, as an executable in ``directory``."""
    path = directory / "docker"
    path.write_bytes(deb_member("docker-cli_*_amd64.deb", "./usr/bin/docker"))
    path.chmod(0o755)
    return path


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
        # --profile ai: the default path (egpu's own image, built once), found in the cache
        proc = cli("docker", "up", "--name", NAME, "--profile", "ai", "--arch", ARCH,
                   "--gpu", "none", "--accel", "tcg", "--cpus", "1", "--memory", "2G",
                   "--ssh-port", str(free_port()), "--json", timeout=UP_TIMEOUT_S + 120)
        vm_dir = home / "data/vms" / NAME
        assert proc.returncode == 0, proc.stderr + _tail(vm_dir / "serial.log")
        print(f"docker up: {time.monotonic() - started:.0f}s to /_ping")
        doc = json.loads(proc.stdout)
        bin_dir = Path(tmp_path_factory.mktemp("bin"))
        yield DockerVm(cli, vm_dir, Path(doc["socket"]), docker_cli(bin_dir))
    finally:
        cli("stop", NAME, "--force")
        _stop_leftovers(home)


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def docker(vm: DockerVm, *args: str, host: str | None = None, input: bytes | None = None,
           config: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The host's docker CLI with DOCKER_HOST ``host`` (or none: its context decides)."""
    env = {k: v for k, v in os.environ.items() if k != "DOCKER_HOST"}
    env["DOCKER_CONFIG"] = str(config or vm.docker.parent / "config")  # not ~/.docker
    if host is not None:
        env["DOCKER_HOST"] = host
    proc = subprocess.run([str(vm.docker), *args], env=env, input=input, capture_output=True,
                          timeout=DOCKER_CLI_TIMEOUT_S)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(),
                                       proc.stderr.decode())


def env_host(vm: DockerVm) -> str:
    """DOCKER_HOST as ``egpu docker env`` prints it (an ``export`` line for a shell)."""
    line = vm.cli("docker", "env", "--name", NAME, check=True).stdout.strip()
    assert line.startswith("export DOCKER_HOST=")
    return shlex.split(line.removeprefix("export "))[0].removeprefix("DOCKER_HOST=")


def busybox_rootfs() -> bytes:
    """A tar of Debian's busybox-static (the built-in guest's, in the shared .deb cache) and
    a page for its httpd: the whole root of the test container."""
    busybox = deb_member("busybox-static_*_amd64.deb", "./usr/bin/busybox")
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
    host = env_host(docker_vm)
    assert host.startswith("unix://")
    path = Path(host.removeprefix("unix://"))
    assert path == docker_vm.socket == docker_vm.vm_dir / "docker.sock"
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)),
                      base_url="http://docker", timeout=API_TIMEOUT_S) as client:
        reply = client.get("/_ping")
    assert reply.status_code == 200 and reply.text == "OK"
    doc = json.loads(docker_vm.cli("docker", "env", "--name", NAME, "--json", check=True).stdout)
    assert doc["DOCKER_HOST"] == f"unix://{path}"
    # the image carries the CLI too: docker inside the guest talks to the same daemon
    inside = docker_vm.cli("exec", NAME, "--timeout", "120", "--", "docker", "version",
                           "--format", "{{.Server.Version}}", timeout=180)
    assert inside.returncode == 0, inside.stderr
    outside = docker(docker_vm, "version", "--format", "{{.Server.Version}}", host=host)
    assert outside.returncode == 0, outside.stderr
    assert inside.stdout.strip() == outside.stdout.strip() != ""
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
    assert GUEST_API_PORT not in {port for _, port in listeners}
    # the guest's API port is listed as not forwarded, with why
    api_rows = [f for f in rows(docker_vm) if f["guest_port"] == GUEST_API_PORT]
    assert all(f["host_port"] is None and f["state"] == "ignored" for f in api_rows), api_rows


def test_a_published_container_port_is_mirrored_and_removed(docker_vm: DockerVm) -> None:
    """docker import, docker run -d -p, docker stop: the host's docker CLI, as a user runs it."""
    port, host = host_port(), env_host(docker_vm)
    made = docker(docker_vm, "import", "-", IMAGE, host=host, input=busybox_rootfs())
    assert made.returncode == 0, made.stderr
    asked = time.monotonic()
    ran = docker(docker_vm, "run", "-d", "--name", CONTAINER, "-p", f"{port}:{CONTAINER_PORT}",
                 IMAGE, "/bin/busybox", "httpd", "-f", "-p", str(CONTAINER_PORT), "-h", "/www",
                 host=host)
    assert ran.returncode == 0, ran.stderr
    running = time.monotonic()  # docker run -d returns once the container runs
    # the promise is 10 s; under TCG on shared cores the time is reported, not held
    reply = wait_until(lambda: http_get(port), FORWARD_WAIT_S + 50, "the mirrored port")
    print(f"docker run -d {running - asked:.1f}s; from its return to an answer on "
          f"127.0.0.1:{port}: {time.monotonic() - running:.2f}s")
    assert GREETING in reply
    mine = [f for f in rows(docker_vm) if f["guest_port"] == port]
    # one forward, the docker one: the docker-proxy listener gets no second (auto) forward
    assert [(f["kind"], f["host_port"], f["state"]) for f in mine] == [
        ("docker", port, "active")], mine
    stopped = docker(docker_vm, "stop", "-t", "1", CONTAINER, host=host)
    assert stopped.returncode == 0, stopped.stderr
    wait_until(lambda: not any(f["host_port"] == port for f in rows(docker_vm)),
               FORWARD_WAIT_S + 50, "the mirrored forward to go")
    assert http_get(port) is None
    assert docker(docker_vm, "rm", CONTAINER, host=host).returncode == 0


def test_context_gives_the_host_cli_a_working_context(docker_vm: DockerVm,
                                                      tmp_path: Path) -> None:
    config = tmp_path / "docker-config"
    env = {**docker_vm.cli.env, "PATH": f"{docker_vm.docker.parent}:{os.environ['PATH']}",
           "DOCKER_CONFIG": str(config)}
    runner = Cli(env, docker_vm.cli.home)
    first = json.loads(runner("docker", "context", "--name", NAME, "--json", check=True).stdout)
    again = json.loads(runner("docker", "context", "--name", NAME, "--json", check=True).stdout)
    assert (first["action"], again["action"]) == ("created", "updated")
    listed = docker(docker_vm, "--context", "egpu", "images", "--format", "{{.Repository}}",
                    config=config)
    assert listed.returncode == 0, listed.stderr
    assert IMAGE.split(":")[0] in listed.stdout.split()  # the import above, by that daemon


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
