"""``egpu docker up|down|env|context``: a Docker VM whose API is a 0600 unix socket in its VM
directory on this host (nothing listens on a TCP port for it), its containers' published
ports mirrored to 127.0.0.1 by the VM's supervisor."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import time
from typing import Any

import click

from egpu.cli import output
from egpu.cli.host_commands import passthrough_options
from egpu.cli.interrupts import sigterm_interrupts
from egpu.cli.vm_commands import run
from egpu.engine.qemu import host_machine
from egpu.errors import AgentError, ConflictError, NotFoundError, UsageError, VMError
from egpu.images import profiles
from egpu.images.pull import DEFAULT_IMAGE
from egpu.vm import agent, docker_api, lifecycle, store
from egpu.vm.status import inspect

DEFAULT_NAME = "docker"
# the profiles whose images run Docker, the docker profile first (the default)
DOCKER_PROFILES = tuple(sorted((p.name for p in profiles.PROFILES.values()
                                if profiles.DOCKER_FEATURE in p.features),
                               key=lambda n: n != DEFAULT_NAME))
DEFAULT_CPUS = 2
DEFAULT_MEMORY = "2G"
# a first boot under TCG (cloud-init, dockerd's first start) takes minutes on a shared host
DEFAULT_UP_TIMEOUT_S = 900.0
CONTEXT_NAME = "egpu"
DOCKER_CLI = "docker"
DOCKER_CLI_TIMEOUT_S = 30.0
JOURNAL_LINES = 20
JOURNAL_TIMEOUT_S = 30.0
PANIC_MARKER = b"Kernel panic"
SERIAL_TAIL_BYTES = 1 << 20
# docker's --docker KEY=VALUE,... is CSV: a socket path with these would need quoting there
_CONTEXT_UNSAFE = frozenset(',"=')


def docker_host(vm: store.VmDir) -> str:
    """The DOCKER_HOST value of a Docker VM: its socket as a unix:// URL."""
    return f"unix://{vm.file(store.DOCKER_SOCKET)}"


def _docker_vm(name: str) -> store.VmDir:
    """A VM ``egpu docker up`` made, or a one-line error saying what to do."""
    vm = store.VmDir(store.check_name(name))
    if not vm.exists():
        raise NotFoundError(f"no Docker VM named {name!r}",
                            hint=f"start one: egpu docker up --name {name}")
    if not vm.read_config().docker:
        raise UsageError(f"VM {name!r} is not a Docker VM (it was not started by egpu docker up)",
                         hint=f"stop it (egpu stop {name}) or pick another --name")
    return vm


def _running_docker_vm(name: str) -> store.VmDir:
    vm = _docker_vm(name)
    state = inspect(vm).state
    if state != "running":
        raise VMError(f"Docker VM {name!r} is {state}",
                      hint=f"start it: egpu docker up --name {name}")
    return vm


@click.group(name="docker")
def docker_group() -> None:
    """Run Docker in a VM, its API on this host only (up, down, env, context)."""


def _default_image(profile: str, arch: str, progress: output.BarProgress) -> str:
    """The egpu-built image of ``profile`` for ``arch``: from the cache, else built now."""
    from egpu.engine.select import ensure_engine_info
    from egpu.guest.assets import ensure_guest
    from egpu.vm import image_build  # the Debian client (httpx): only without --base/--image

    request = profiles.parse_request(profile, arch, profiles.DEFAULT_SIZE, [], (), os.environ)
    info = ensure_engine_info(progress=progress)
    with sigterm_interrupts():  # a kill stops the builder VM too, as Ctrl-C does
        result = image_build.build_image(request, info, ensure_guest(arch, progress),
                                         progress=progress)
    return str(result.image)


def _alive(vm: store.VmDir, serial_from: int) -> str | None:
    """Why the VM can no longer answer (ended, or its kernel panicked), or None."""
    status = inspect(vm)
    if status.ended:
        return f"VM {vm.name!r} {status.state}" + (
            f": {'; '.join(status.problems)}" if status.problems else "")
    try:
        with vm.serial_log.open("rb") as log:
            size = os.fstat(log.fileno()).st_size
            log.seek(max(serial_from, size - SERIAL_TAIL_BYTES))
            if PANIC_MARKER in log.read():
                return f"the kernel of VM {vm.name!r} panicked (see egpu logs {vm.name})"
    except OSError:
        pass
    return None


def _journal(vm: store.VmDir) -> list[str]:
    """docker.service's last journal lines, through the guest agent (empty when it cannot)."""
    try:
        result = agent.run_command(vm.agent_socket, docker_api.journal_argv(JOURNAL_LINES),
                                   timeout=JOURNAL_TIMEOUT_S)
    except (AgentError, OSError):
        return []
    text = result.stdout.decode(errors="replace")
    return ["".join(c if c.isprintable() else "?" for c in line)
            for line in text.splitlines()[-JOURNAL_LINES:]]


def _wait_daemon(vm: store.VmDir, timeout: float, quiet: bool, serial_from: int) -> None:
    from egpu.vm.docker_mirror import wait_ready  # httpx

    socket = vm.file(store.DOCKER_SOCKET)
    if not quiet:
        output.notice(f"waiting for the Docker daemon in VM {vm.name!r} "
                      f"(GET {docker_api.PING_PATH}, up to {timeout:.0f}s) ...")
    try:
        wait_ready(socket, time.monotonic() + timeout,
                   alive=lambda: _alive(vm, serial_from))
    except VMError as e:
        for line in _journal(vm):
            output.notice(f"  {docker_api.DOCKER_SERVICE}: {line}")
        raise VMError(f"Docker VM {vm.name!r}: {e}",
                      hint=f"see egpu logs {vm.name}; stop it: egpu docker down --name "
                      f"{vm.name}") from None


@docker_group.command("up")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="VM name")
@click.option("--base", default=None, metavar="PATH",
              help="boot this docker-profile qcow2 [default: egpu's docker image, built once]")
@click.option("--profile", default=None, type=click.Choice(DOCKER_PROFILES),
              help="boot egpu's image of this profile, built once "
              f"[default: {DOCKER_PROFILES[0]}; ai adds llama-server]")
@click.option("--image", default=None, is_flag=False, flag_value=DEFAULT_IMAGE, metavar="REF",
              help=f"boot this OCI image [bare --image: {DEFAULT_IMAGE}]")
@click.option("--arch", default=None, help="guest architecture [default: this host's]")
@click.option("--cpus", default=DEFAULT_CPUS, show_default=True, type=int)
@click.option("--memory", default=DEFAULT_MEMORY, show_default=True,
              help="e.g. 2G, 8G (a bare number is MiB)")
@click.option("--mount", "mounts", multiple=True, metavar="HOST_DIR[:GUEST_DIR][:ro]",
              help="share a host folder (virtio-9p); repeatable")
@click.option("--ssh-port", type=int, default=None,
              help="forward 127.0.0.1:PORT to guest :22 "
              f"[default: {lifecycle.DEFAULT_IMAGE_SSH_PORT}]")
@click.option("--qemu", default=None, metavar="PATH", help="use this qemu-system binary")
@click.option("--accel", type=click.Choice(["tcg", "kvm", "hvf"]), default=None,
              help="accelerator [default: best available]")
@click.option("--timeout", default=DEFAULT_UP_TIMEOUT_S, show_default=True, type=float,
              help="seconds to wait for the daemon to answer")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.option("--json", "as_json", is_flag=True, help="print DOCKER_HOST and the socket as JSON")
@passthrough_options
@click.pass_context
def up(ctx: click.Context, /, name: str, base: str | None, profile: str | None,
       image: str | None, arch: str | None,
       cpus: int, memory: str, mounts: tuple[str, ...], ssh_port: int | None,
       qemu: str | None, accel: str | None, timeout: float, quiet: bool, as_json: bool,
       **gpu: Any) -> None:
    """Boot (or reuse) the Docker VM and wait until its daemon answers; print DOCKER_HOST."""
    vm = store.VmDir(store.check_name(name))
    if not timeout > 0 or timeout == float("inf"):
        raise UsageError(f"--timeout {timeout} must be a finite, positive number of seconds")
    if sum(x is not None for x in (base, image, profile)) > 1:
        raise UsageError("give one of --base, --image and --profile")
    current = inspect(vm) if vm.exists() else None
    serial_from = 0
    if current is not None and current.active:
        if not vm.read_config().docker:
            raise ConflictError(f"VM {name!r} is {current.state} but is not a Docker VM",
                                hint=f"stop it (egpu stop {name}) or pick another --name")
        if (base or image or profile) and not quiet:
            output.notice(f"VM {name!r} is already {current.state}: reusing it as it is")
        serial_from = vm.serial_log.stat().st_size if vm.serial_log.exists() else 0
    else:
        arch = arch or host_machine()
        progress = output.BarProgress(quiet=quiet or as_json)
        if not base and not image:
            base = _default_image(profile or DOCKER_PROFILES[0], arch, progress)
        ctx.invoke(run, name=name, arch=arch, cpus=cpus, memory=memory, mounts=mounts,
                   base=base, image=image, ssh_port=ssh_port, qemu=qemu, accel=accel, detach=True,
                   quiet=quiet or as_json, docker=True, **gpu)
    _wait_daemon(vm, timeout, quiet or as_json, serial_from)
    host = docker_host(vm)
    if as_json:
        output.emit_json({"name": name, "docker_host": host,
                          "socket": str(vm.file(store.DOCKER_SOCKET))})
        return
    output.notice(f"Docker is up in VM {name!r}; its containers' ports appear on 127.0.0.1 "
                  f"(egpu ports {name})")
    output.out.print(f"export DOCKER_HOST={shlex.quote(host)}", markup=False)


@docker_group.command("down")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="VM name")
@click.option("--timeout", default=lifecycle.DEFAULT_STOP_TIMEOUT_S, show_default=True,
              type=float, help="seconds to wait for the guest to power off")
def down(name: str, timeout: float) -> None:
    """Stop the Docker VM (its containers stop with it)."""
    if not timeout > 0 or timeout == float("inf"):
        raise UsageError(f"--timeout {timeout} must be a finite, positive number of seconds")
    vm = _docker_vm(name)
    before = inspect(vm)
    after = lifecycle.stop(name, timeout=timeout)
    output.notice(f"Docker VM {name!r} " + (after.state if before.active
                                            else f"is already {before.state}"))


@docker_group.command("env")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="VM name")
@click.option("--json", "as_json", is_flag=True)
def env(name: str, as_json: bool) -> None:
    """Print the DOCKER_HOST line for the Docker VM: eval "$(egpu docker env)"."""
    vm = _running_docker_vm(name)
    host = docker_host(vm)
    if as_json:
        output.emit_json({"name": name, "DOCKER_HOST": host,
                          "socket": str(vm.file(store.DOCKER_SOCKET))})
        return
    output.out.print(f"export DOCKER_HOST={shlex.quote(host)}", markup=False)


def _docker_cli(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=DOCKER_CLI_TIMEOUT_S,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise VMError(f"{shlex.join(argv)}: {e}") from None


def _first_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


@docker_group.command("context")
@click.option("--name", default=DEFAULT_NAME, show_default=True, help="VM name")
@click.option("--json", "as_json", is_flag=True)
def context(name: str, as_json: bool) -> None:
    """Create or update the docker CLI's context 'egpu' for the Docker VM."""
    cli = shutil.which(DOCKER_CLI)
    if cli is None:
        raise NotFoundError("no docker CLI on this host's PATH to add a context to",
                            hint='install one (Debian: apt-get install docker-cli), or use '
                            'eval "$(egpu docker env)"')
    vm = _docker_vm(name)
    host = docker_host(vm)
    if _CONTEXT_UNSAFE & set(host):
        raise UsageError(f"the socket path {host!r} holds a character docker's --docker "
                         "option cannot take", hint="set EGPU_HOME to a plainer path")
    exists = _docker_cli([cli, "context", "inspect", CONTEXT_NAME]).returncode == 0
    verb = "update" if exists else "create"
    argv = [cli, "context", verb, CONTEXT_NAME,
            "--description", f"egpu Docker VM {name}", "--docker", f"host={host}"]
    done = _docker_cli(argv)
    if done.returncode != 0:
        raise VMError(f"docker context {verb} {CONTEXT_NAME} failed: "
                      f"{_first_line(done.stderr or done.stdout)}")
    if as_json:
        output.emit_json({"context": CONTEXT_NAME, "action": verb + "d", "docker_host": host})
        return
    output.notice(f"docker context {CONTEXT_NAME!r} {verb}d for VM {name!r}: "
                  f"docker --context {CONTEXT_NAME} ps, or docker context use {CONTEXT_NAME}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    group.add_command(docker_group)

