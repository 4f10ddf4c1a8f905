"""Start, stop and wait for VMs: the I/O edge around the pure argv builder and state logic."""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from egpu.engine import virtual
from egpu.engine.argv import Disk, Firmware, VmSpec, build_argv, check_cpus, parse_disk_option
from egpu.engine.display import DisplayPlan
from egpu.engine.passthrough import RunPassthrough
from egpu.engine.qemu import EngineInfo, check_arch, host_is_virtual
from egpu.engine.shares import DEVICE as SHARE_DEVICE
from egpu.engine.shares import OPTION as MOUNT_OPTION
from egpu.engine.shares import Share, resolve_mounts
from egpu.errors import (
    AgentError,
    ConflictError,
    EngineError,
    GuestCrashedError,
    HostError,
    ImageError,
    UsageError,
    VMError,
)
from egpu.guest import protocol as guest_protocol
from egpu.guest.assets import GuestAssets
from egpu.host import vfio_bind
from egpu.images.disk import BootDisk, plan_boot_disk, prepare_boot_disk
from egpu.images.firmware import ensure_vars, find_firmware
from egpu.images.seed import SeedMount, SeedSpec, check_hostname, login_user, new_instance_id
from egpu.images.seed import seed_files as seed_file_contents
from egpu.images.seed_iso import write_seed_iso
from egpu.process import ProcessRef, run_tool, signal_process, wait_gone
from egpu.progress import Progress
from egpu.vm import agent, docker_api, ports, qmp, sshkeys, store
from egpu.vm.status import BROKEN, VmStatus, inspect, last_line, process_alive

START_TIMEOUT_S = 30.0
STOP_SIGTERM_WAIT_S = 5.0
SUPERVISOR_EXIT_WAIT_S = 5.0
DEFAULT_STOP_TIMEOUT_S = 30.0
# the share of the stop timeout ACPI powerdown gets before the guest agent is asked instead
ACPI_SHARE = 0.5
AGENT_STOP_TIMEOUT_S = 2.0
QEMU_IMG_TIMEOUT_S = 30
POLL_S = 0.05
MAX_PORT = 65535
# scottjg/qemu-vfio-apple's launcher default (contrib/apple-vfio/qemu-vfio-apple/main.swift)
DEFAULT_IMAGE_SSH_PORT = 2222
# its images are Ubuntu cloud images with the default user
# (contrib/apple-vfio/image-builder/cloud-init/user-data.template)
DEFAULT_SSH_USER = "ubuntu"
SSH_USER_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,31}")  # useradd's 32-byte limit


@dataclass(frozen=True)
class RunRequest:
    """What the user asked ``egpu run`` for, already parsed but not yet checked against the host."""

    name: str
    arch: str
    cpus: int
    memory_mib: int
    disks: tuple[str, ...] = ()
    ssh_port: int | None = None
    accel: str | None = None
    selftest: bool = False
    extra: tuple[str, ...] = ()
    gpu: RunPassthrough | None = None  # resolved --gpu / --passthrough; None: no GPU
    bind: bool = False  # GPU path vfio: move the functions to vfio-pci for this run
    nvme_size: str = virtual.DEFAULT_NVME_SIZE
    image: str | None = None  # OCI reference of a full guest image (UEFI boot)
    base: str | None = None  # a local qcow2 to boot instead of an image
    display: DisplayPlan | None = None  # the VM's own screen; None: headless
    ports: tuple[tuple[int, int], ...] = ()  # --port HOST:GUEST, checked by parse_port_forwards
    port_forwarding: bool = True  # forward the guest's listening ports automatically
    mounts: tuple[str, ...] = ()  # --mount HOST_DIR[:GUEST_DIR][:ro], as typed
    seed: bool = True  # a full image gets a cloud-init NoCloud seed (--no-seed: none)
    cloud_init: Mapping[str, Any] | None = None  # the user's --cloud-init, parsed and checked
    docker: bool = False  # egpu docker up: the Docker API on the VM's docker.sock


@dataclass(frozen=True)
class RunPlan:
    """A checked request turned into the exact command and the config to record."""

    vm: store.VmDir
    spec: VmSpec
    config: store.VmConfig
    argv: list[str] = field(default_factory=list)
    boot: BootDisk | None = None  # a full image: its overlay is made at start
    notices: tuple[str, ...] = ()
    seed: SeedSpec | None = None  # written at start, with the login keys found then

    @property
    def shares(self) -> tuple[Share, ...]:
        """The shared folders (9p tag, host directory, guest path, read-only), in tag order."""
        return self.spec.shares


def check_port_free(port: int) -> None:
    """Refuse a host port that something already listens on (we bind 127.0.0.1 only)."""
    if not 1 <= port <= MAX_PORT:
        raise UsageError(f"--ssh-port {port} is not a TCP port number")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            raise ConflictError(
                f"port {port} on 127.0.0.1 is already in use", hint="pick another --ssh-port"
            ) from None


def parse_port_forwards(texts: Sequence[str], ssh_port: int | None) -> tuple[tuple[int, int], ...]:
    """``run --port HOST:GUEST`` values: each well-formed, no host port given twice or taken by
    ``--ssh-port``. A busy host port is not refused here: the forwarder reports it."""
    pairs: list[tuple[int, int]] = []
    for text in texts:
        try:
            host, guest = ports.parse_port_option(text)
        except ValueError as e:
            raise UsageError(str(e)) from None
        if host == ssh_port or any(host == h for h, _ in pairs):
            raise UsageError(f"--port {text}: host port {host} is forwarded twice")
        pairs.append((host, guest))
    return tuple(pairs)


def probe_disk(qemu_img: Sequence[str], env: dict[str, str], text: str) -> Disk:
    """Check a ``--disk`` with qemu-img and learn its format (never writes to it)."""
    path, readonly = parse_disk_option(text)
    if not path.exists():
        raise UsageError(f"--disk {path}: no such file")
    stdout = run_tool(
        # absolute: a relative name could read as a block protocol ("nbd:...")
        [*qemu_img, "info", "--output=json", "-U", str(path.absolute())],
        lambda why: UsageError(f"--disk {path}: qemu-img cannot probe it: {why}"),
        timeout=QEMU_IMG_TIMEOUT_S, env=env,
    )
    try:
        fmt = json.loads(stdout)["format"]
    except (ValueError, KeyError, TypeError):
        raise UsageError(f"--disk {path}: qemu-img gave no format") from None
    return Disk(path=path.absolute(), fmt=str(fmt), readonly=readonly)


def assumed_disk(text: str) -> Disk:
    """A ``--disk`` checked only for existence; its format guessed from its name."""
    path, readonly = parse_disk_option(text)
    if not path.exists():
        raise UsageError(f"--disk {path}: no such file")
    fmt = "qcow2" if path.suffix == ".qcow2" else "raw"
    return Disk(path=path.absolute(), fmt=fmt, readonly=readonly)


NESTED_KVM_NOTICE = ("this host is itself a VM: using TCG, since nested KVM is often unreliable "
                     "(pass --accel kvm to try it)")


def choose_accel(
    info: EngineInfo, arch: str, wanted: str | None, *, nested: bool = False
) -> tuple[str, str | None]:
    """The accelerator and a notice: the one asked for if offered, else the best offered.

    Inside a VM (``nested``) KVM is not chosen by default: on the machines egpu was developed on,
    nested KVM guests died early with a KVM internal-error.
    """
    offered = info.accelerators.get(arch, ())
    if wanted:
        if wanted not in offered:
            raise UsageError(
                f"accelerator {wanted!r} is not available for {arch} here "
                f"(available: {', '.join(offered) or 'none'})"
            )
        return wanted, None
    for accel in ("hvf", "kvm", "tcg"):
        if accel == "kvm" and nested and "kvm" in offered:
            return "tcg", NESTED_KVM_NOTICE
        if accel in offered:
            return accel, None
    raise VMError(f"the engine offers no accelerator for {arch}")


def plan_run(
    request: RunRequest, info: EngineInfo, guest: GuestAssets, *, check_host: bool = True
) -> RunPlan:
    """Check a request against the host and build its command; creates nothing.

    Without ``check_host`` (dry runs, possibly with no engine) disks are only checked to exist.
    """
    arch = check_arch(request.arch)
    if arch not in info.arches:
        raise VMError(f"the engine has no qemu-system-{arch}")
    vm = store.VmDir(request.name)
    vm.check_socket_paths()
    if check_host:
        disks = tuple(probe_disk(info.engine.qemu_img(), info.engine.env(), d)
                      for d in request.disks)
    else:
        disks = tuple(assumed_disk(d) for d in request.disks)
    shares = resolve_mounts(request.mounts)
    if shares and check_host and SHARE_DEVICE not in info.devices.get(arch, ()):
        raise EngineError(
            f"QEMU {info.version_text} has no {SHARE_DEVICE} device for {MOUNT_OPTION}",
            hint="use a QEMU built with virtfs (9p); 'egpu engine --provision' installs one")
    boot = None
    seed = None
    ssh_port = request.ssh_port
    if request.image or request.base:
        boot = plan_boot_disk(vm.file(store.OVERLAY), image=request.image, base=request.base)
        if ssh_port is None:
            ssh_port = DEFAULT_IMAGE_SSH_PORT
        if request.seed:
            # a full image's own init knows nothing of egpu: cloud-init mounts the shares
            seed = plan_seed(vm, request, tuple(SeedMount(sh.tag, sh.guest, sh.readonly)
                                                for sh in shares))
    if request.docker and boot is None:
        raise UsageError("a Docker VM boots a docker-profile image (--image or --base)")
    if ssh_port is not None and check_host:
        check_port_free(ssh_port)
    if ssh_port is not None and any(host == ssh_port for host, _ in request.ports):
        raise UsageError(f"--port: host port {ssh_port} is the ssh forward already")
    accel, accel_notice = choose_accel(info, arch, request.accel, nested=host_is_virtual())
    gpu_path = request.gpu.path if request.gpu else "none"
    gpu_plan = request.gpu.plan if request.gpu else None
    # the accelerator the VM will run on: a passthrough plan sets its own (hvf, kvm)
    check_cpus(request.cpus, arch, gpu_plan.accel if gpu_plan else accel,
               machine_max=info.cpu_limit(arch), host_cpus=os.cpu_count() if check_host else None)
    card = None
    if gpu_path == "user":
        if check_host and "vfio-user-pci" not in info.devices.get(arch, ()):
            raise EngineError(
                f"QEMU {info.version_text} has no vfio-user-pci device for the virtual eGPU",
                hint="QEMU >= 10.1 is needed; 'egpu engine --provision' installs one",
            )
        card = virtual.virtual_egpu_plan(
            vm.servers_dir, nvme_backing=vm.file(store.NVME_BACKING), nvme_size=request.nvme_size)
    checks = guest_protocol.BASE_CHECKS + (card.checks if card else ())
    try:
        append = guest_protocol.kernel_cmdline(
            guest, selftest=request.selftest, cpus=request.cpus, memory_mib=request.memory_mib,
            checks=checks, mounts=[guest_protocol.GuestMount(s.tag, s.guest, s.readonly)
                                   for s in shares],
        )
    except ValueError as e:
        raise UsageError(f"{MOUNT_OPTION}: {e}", hint="use fewer or shorter guest paths") from e
    spec = VmSpec(
        name=request.name, arch=arch, cpus=request.cpus, memory_mib=request.memory_mib,
        accel=accel,  # type: ignore[arg-type]
        qmp_socket=vm.qmp_socket, console_socket=vm.console_socket, serial_log=vm.serial_log,
        agent_socket=vm.agent_socket, kernel=guest.kernel, initrd=guest.initramfs, append=append,
        disks=disks, shares=shares, ssh_port=ssh_port, extra=request.extra,
        display=request.display,
        socket_forwards=((vm.file(store.DOCKER_SOCKET), docker_api.GUEST_API_PORT),)
        if request.docker else (),
    )
    if boot is not None:
        # a full image boots through UEFI from its overlay; the built-in guest is not involved
        spec = replace(spec, kernel=None, initrd=None, append=None,
                       boot_disk=Disk(boot.overlay, "qcow2"),
                       firmware=_firmware(info, vm, arch, check_host),
                       seed=vm.file(store.SEED) if seed is not None else None)
    if card is not None:
        spec = card.apply(spec)
    elif request.gpu is not None and request.gpu.plan is not None:
        if request.gpu.plan.needs_firmware and spec.firmware is None:
            spec = replace(spec, firmware=_firmware(info, vm, arch, check_host))
        spec = request.gpu.plan.apply(spec)
    argv = build_argv(info.engine.qemu(arch), spec)
    servers = [_server_entry(s) for s in card.servers] if card else []
    config = store.VmConfig(
        name=request.name, arch=arch, cpus=request.cpus, memory_mib=request.memory_mib,
        accel=spec.accel, gpu_path=gpu_path,
        qemu=f"{info.engine.source} QEMU {info.version_text}", qemu_version=info.version_text,
        argv=argv, env=info.engine.env(),
        ssh_port=ssh_port, selftest=request.selftest, servers=servers, mounts=list(shares),
        image=boot.source if boot else None,
        bind_functions=list(request.gpu.plan.functions)
        if request.bind and request.gpu and request.gpu.plan and gpu_path == "vfio" else [],
        host_guard=request.gpu.guard.to_json() if request.gpu and request.gpu.guard else None,
        gpu_bound_at_start=list(request.gpu.bound_at_start)
        if request.gpu and request.gpu.bound_at_start is not None else None,
        display=request.display.to_json() if request.display else None,
        ports=list(request.ports), port_forwarding=request.port_forwarding,
        ssh_user=seed.user if seed else None,
        seed_instance_id=seed.instance_id if seed else None,
        docker=request.docker,
    )
    notices: tuple[str, ...] = (accel_notice,) if accel_notice and spec.accel == accel else ()
    if request.display and request.display.notice:
        notices += (request.display.notice,)
    return RunPlan(vm=vm, spec=spec, config=config, argv=argv, boot=boot, notices=notices,
                   seed=seed)


def host_user() -> str | None:
    """The name of the user running egpu, or None when the system cannot say."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return None


def plan_seed(vm: store.VmDir, request: RunRequest,
              mounts: tuple[SeedMount, ...] = ()) -> SeedSpec:
    """What a full image's seed will say (its keys are found at start); reads, never writes.

    The instance-id is kept from the VM's recorded config: cloud-init's once-per-instance
    setup runs on the VM's first boot, not again on every run.
    """
    instance_id = None
    if vm.file(store.CONFIG).exists():
        with contextlib.suppress(VMError):
            instance_id = vm.read_config().seed_instance_id
    return SeedSpec(hostname=check_hostname(request.name),
                    instance_id=instance_id or new_instance_id(),
                    user=login_user(host_user()), public_keys=(), mounts=mounts,
                    user_data=request.cloud_init)


def write_seed(vm: store.VmDir, seed: SeedSpec) -> sshkeys.LoginKeys:
    """Find (or make) the login keys and write the VM's seed ISO with them."""
    keys = sshkeys.login_keys()
    write_seed_iso(vm.file(store.SEED),
                   seed_file_contents(replace(seed, public_keys=keys.public_keys)))
    return keys


def _server_entry(server: virtual.DeviceServer) -> store.ServerLaunch:
    """How the supervisor starts one device server (a process of its own: a crash there is
    reported, never taken down with QEMU)."""
    return store.ServerLaunch(name=server.name, function=server.function, spec=server.spec,
                              spec_file=str(server.spec_file), log=str(server.log))


def _firmware(info: EngineInfo, vm: store.VmDir, arch: str, check_host: bool) -> Firmware:
    """UEFI code from the engine and this VM's own vars file (made at start)."""
    try:
        code = find_firmware(info.engine.firmware_dirs(), arch).code
    except ImageError:
        if check_host:
            raise
        code = Path(f"/usr/share/qemu/edk2-{arch}-code.fd")  # a dry run elsewhere: nominal
    return Firmware(code=code, vars=vm.file(store.EFI_VARS))


def start(plan: RunPlan, info: EngineInfo, progress: Progress | None = None) -> VmStatus:
    """Start a planned VM detached; return once QEMU answers QMP and its guest runs.

    The caller holds the VM's lock (``store.VmDir.lock``) from planning through this call. A VM
    of that name that is running is refused; a stopped or crashed one is cleaned up and started
    again. If the start fails, what this call created is removed, and nothing else.
    """
    vm = plan.vm
    dir_existed = vm.exists()
    previous_image = None
    if dir_existed:
        current = inspect(vm)
        if current.state == BROKEN and vm.file(store.CONFIG).exists():
            raise ConflictError(f"VM {vm.name!r} is broken: {'; '.join(current.problems)}",
                                hint=f"remove it: egpu rm {vm.name}")
        if current.active:
            raise ConflictError(f"VM {vm.name!r} is already {current.state}",
                                hint=f"stop it first: egpu stop {vm.name}")
        _kill_run(vm)  # what a crashed run left behind (a stuck QEMU, orphaned servers)
        previous_image = vm.read_config().image if current.state != BROKEN else None
        vm.clear_runtime()
    before = set(os.listdir(vm.path)) if dir_existed else set()
    try:
        vm.create()
        config = plan.config
        if plan.seed is not None:
            keys = write_seed(vm, plan.seed)
            config = replace(config, ssh_key=str(keys.private))
        vm.write_config(config)
        if plan.config.servers:
            vm.servers_dir.mkdir(mode=0o700, exist_ok=True)
        if plan.spec.firmware is not None and not plan.spec.firmware.vars.exists():
            ensure_vars(find_firmware([plan.spec.firmware.code.parent], plan.spec.arch),
                        plan.spec.firmware.vars)
        if plan.boot is not None:
            _, made = prepare_boot_disk(plan.boot, info.engine.qemu_img(), info.engine.env(),
                                        progress=progress, previous_source=previous_image)
            if made != "kept":
                # a new or rebased disk: the guest makes new host keys on its first boot
                vm.file(store.KNOWN_HOSTS).unlink(missing_ok=True)
        if plan.config.bind_functions:
            vfio_bind.ensure_vfio_pci()
            record = vfio_bind.bind_to_vfio(plan.config.bind_functions)
            store.write_json(vm.file(store.VFIO_BIND), record.to_json())
        for log in (vm.serial_log, vm.file(store.QEMU_LOG), vm.file(store.SUPERVISOR_LOG)):
            log.write_bytes(b"")  # this run's own, so a failure is never read from an old one
        _spawn_supervisor(vm)
        return wait_started(vm)
    except GuestCrashedError:
        raise  # QEMU ran: the VM exists and reads as crashed, with its run state
    except BaseException:
        _kill_run(vm)
        restore_bindings(vm)
        if dir_existed:
            _remove_new_entries(vm, before)
        else:
            vm.remove()
        raise


def _remove_new_entries(vm: store.VmDir, before: set[str]) -> None:
    """Remove what a failed start added to a directory that existed before it; keep the rest."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.scandir(vm.path):
            if entry.name in before:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)


def stop_orphaned_servers(vm: store.VmDir) -> None:
    """End device servers a dead supervisor left behind (normally it stops them itself)."""
    for server in vm.read_servers():
        if _signal(server.process, signal.SIGTERM) and not _wait_gone(
                server.process, STOP_SIGTERM_WAIT_S):
            _signal(server.process, signal.SIGKILL)


def restore_bindings(vm: store.VmDir) -> list[str]:
    """Give functions moved to vfio-pci for this VM back to their drivers; returns problems."""
    path = vm.file(store.VFIO_BIND)
    if not path.exists():
        return []
    try:
        record = vfio_bind.BindRecord.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, HostError) as e:
        return [f"cannot read {path}: {e}"]
    problems = vfio_bind.restore(record)
    path.unlink(missing_ok=True)
    return problems


def _spawn_supervisor(vm: store.VmDir) -> None:
    with open(vm.file(store.SUPERVISOR_LOG), "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "egpu.vm.supervisor", str(vm.path)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the CLI, and Ctrl-C in the CLI does not reach it
            close_fds=True,
        )
    ref = ProcessRef.of_popen(proc)
    if ref is not None:  # None: it is already gone, and wait_started reads why from its log
        vm.write_process(store.SUPERVISOR_PID, ref)


def wait_started(vm: store.VmDir, timeout: float = START_TIMEOUT_S) -> VmStatus:
    """Wait until QEMU answers QMP with its guest running; VMError with the cause otherwise."""
    deadline = time.monotonic() + timeout
    status = None
    while time.monotonic() < deadline:
        status = inspect(vm)
        if status.state == "running" and status.run_state == qmp.RUNNING_RUN_STATE:
            return status
        if status.state == "crashed" and status.run_state in qmp.CRASH_RUN_STATES:
            raise GuestCrashedError(f"VM {vm.name!r} crashed: {'; '.join(status.problems)}")
        if status.ended:
            raise VMError(f"VM {vm.name!r} failed to start: {_failure_text(vm, status)}")
        time.sleep(POLL_S)
    if status is not None and status.run_state is not None:
        raise VMError(f"VM {vm.name!r}: QEMU is up but its guest is {status.run_state}, "
                      f"not running, after {timeout:.0f}s")
    raise VMError(f"VM {vm.name!r}: QEMU did not come up within {timeout:.0f}s")


def _failure_text(vm: store.VmDir, status: VmStatus) -> str:
    """What failed, in the words of whoever said so; never an unnamed error."""
    record = status.exit or {}
    for why in (record.get("error"), record.get("server_failure"),
                last_line(vm.file(store.QEMU_LOG)), last_line(vm.file(store.SUPERVISOR_LOG))):
        if why:
            return str(why)
    if status.problems:
        return "; ".join(status.problems)
    return f"the supervisor ended without a record (see {vm.file(store.SUPERVISOR_LOG)})"


def _signal(ref: ProcessRef | None, sig: int) -> bool:
    """Signal a recorded process only if it is verifiably still that process."""
    return signal_process(ref, sig)


def _wait_gone(ref: ProcessRef | None, timeout: float) -> bool:
    return wait_gone(ref, timeout, POLL_S)


def _kill_run(vm: store.VmDir) -> None:
    """Best-effort teardown of a half-started or crashed run (verified processes only)."""
    stop_orphaned_servers(vm)
    qemu = vm.read_process(store.QEMU_PID)
    if _signal(qemu, signal.SIGKILL):
        _wait_gone(qemu, STOP_SIGTERM_WAIT_S)
    sup = vm.read_process(store.SUPERVISOR_PID)
    if _signal(sup, signal.SIGTERM):
        _wait_gone(sup, SUPERVISOR_EXIT_WAIT_S)


def remove(name: str, *, force: bool = False) -> None:
    """Delete a VM's directory (``egpu rm``); a live VM is refused unless ``force`` stops it."""
    vm = store.VmDir(name).require()
    with vm.lock():
        status = inspect(vm)
        live = status.active or any(process_alive(vm.read_process(p))
                                    for p in (store.QEMU_PID, store.SUPERVISOR_PID))
        if live and not force:
            raise ConflictError(f"VM {name!r} is {status.state if status.active else 'live'}",
                                hint=f"stop it first (egpu stop {name}) or egpu rm --force {name}")
        if status.active:
            stop(name, force=True)
        _kill_run(vm)
        restore_bindings(vm)
        vm.remove()


def stop(name: str, *, timeout: float = DEFAULT_STOP_TIMEOUT_S, force: bool = False) -> VmStatus:
    """Stop a VM: powerdown over QMP, then the guest agent's shutdown, then SIGTERM, then SIGKILL
    (``force`` skips the first two)."""
    vm = store.VmDir(name).require()
    status = inspect(vm)
    if not status.active:
        _kill_run(vm)  # a crashed run's leftovers, if any still verifiably run
        return status
    vm.file(store.STOP_REQUEST).write_text(f"{time.time()}\n")
    qemu = vm.read_process(store.QEMU_PID)
    gone = False
    deadline = time.monotonic() + timeout
    if not force and vm.qmp_socket.exists():
        try:
            qmp.execute(vm.qmp_socket, "system_powerdown")
            gone = _wait_gone(qemu, timeout * ACPI_SHARE)
        except VMError:
            gone = False
    if not force and not gone and vm.agent_socket.exists():
        # a guest that ignores the power button may still run its agent
        try:
            with agent.connect(vm.agent_socket, AGENT_STOP_TIMEOUT_S) as client:
                client.shutdown()
        except AgentError:
            pass
        else:
            gone = _wait_gone(qemu, max(deadline - time.monotonic(), 0.0))
    if not gone:
        _signal(qemu, signal.SIGTERM)
        gone = _wait_gone(qemu, STOP_SIGTERM_WAIT_S)
    if not gone:
        _signal(qemu, signal.SIGKILL)
        _wait_gone(qemu, STOP_SIGTERM_WAIT_S)
    sup = vm.read_process(store.SUPERVISOR_PID)
    if not _wait_gone(sup, SUPERVISOR_EXIT_WAIT_S):
        _signal(sup, signal.SIGKILL)
    stop_orphaned_servers(vm)
    restore_bindings(vm)  # normally the supervisor did it; a no-op then
    if vm.read_json(store.EXIT_RECORD) is None:
        # the supervisor was gone too: record the stop ourselves so it does not read as a crash
        store.write_json(vm.file(store.EXIT_RECORD), {
            "returncode": None, "signal": None, "ended": time.time(), "stop_requested": True,
            "server_failure": None, "error": None,
        })
    return inspect(vm)


def wait_exit(name: str, timeout: float | None = None) -> VmStatus:
    """Block until the VM's QEMU has ended and its supervisor recorded how."""
    vm = store.VmDir(name).require()
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        status = inspect(vm)
        # a crashed guest's QEMU may still be up: the supervisor ends it, then records how
        if status.ended and (status.exit is not None or status.pid is None):
            return status
        if deadline is not None and time.monotonic() > deadline:
            raise VMError(f"VM {name!r} still running after {timeout:.0f}s")
        time.sleep(POLL_S * 4)


def follow_log(
    path: Path, *, follow: bool, until: Callable[[], bool] | None = None
) -> Iterator[bytes]:
    """Yield a log's content, then (when ``follow``) what is appended, until ``until()`` is true."""
    stop_when = until
    with path.open("rb") as f:
        while True:
            chunk = f.read(65536)
            if chunk:
                yield chunk
                continue
            if not follow or (stop_when is not None and stop_when()):
                # one last read: output written just before the end
                rest = f.read()
                if rest:
                    yield rest
                return
            time.sleep(POLL_S)


def check_ssh_user(user: str) -> str:
    """A guest user name, or UsageError: ssh would read a leading '-' as one of its options."""
    if not SSH_USER_RE.fullmatch(user):
        raise UsageError(f"bad --user {user!r}: a user name is letters, digits, '.', '_' or '-' "
                         "(at most 32), not starting with '-' or '.'")
    return user


def ssh_argv(port: int, user: str, command: Sequence[str] = (), *, key: Path | None = None,
             known_hosts: Path | None = None) -> list[str]:
    """The ssh command into a VM's loopback forward.

    With ``known_hosts`` (a seeded VM's own file) the guest's host key is trusted on first use
    and checked after; egpu clears that file when the VM gets a new disk. Without it, host keys
    are not recorded (the forward is loopback-only). The user's ~/.ssh/known_hosts is never
    touched. ``key`` is passed alone (IdentitiesOnly), so an agent's other keys are not tried.
    """
    check_ssh_user(user)
    if known_hosts is not None:
        hosts = ["-o", "StrictHostKeyChecking=accept-new",
                 "-o", f"UserKnownHostsFile={_ssh_config_path(known_hosts)}"]
    else:
        hosts = ["-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null"]
    identity = ["-i", str(key), "-o", "IdentitiesOnly=yes"] if key is not None else []
    return ["ssh", "-p", str(port), *identity, *hosts, "-o", "LogLevel=ERROR",
            f"{user}@127.0.0.1", *command]


def _ssh_config_path(path: Path) -> str:
    """A path as an ssh -o value: ssh splits it at whitespace and expands '%' and '~'."""
    text = str(path)
    if any(c.isspace() or c in "%~\"'" for c in text):
        raise UsageError(f"{text!r}: egpu cannot pass this path to ssh",
                         hint="set EGPU_HOME to a path without spaces, '%' or quotes")
    return text


def ssh_login(vm: store.VmDir, config: store.VmConfig, user: str | None) -> tuple[
        str, Path | None, Path | None]:
    """The user, key and known_hosts file ``egpu ssh`` uses for a VM (``user``: asked for)."""
    key = Path(config.ssh_key) if config.ssh_key else None
    if key is not None and not key.is_file():
        key = None  # moved or deleted: ssh falls back to the user's own configuration
    known_hosts = vm.file(store.KNOWN_HOSTS) if config.ssh_user else None
    return user or config.ssh_user or DEFAULT_SSH_USER, key, known_hosts


def has_ended(vm: store.VmDir) -> bool:
    """Whether the VM's QEMU has ended (for following its console until then)."""
    return inspect(vm).ended
