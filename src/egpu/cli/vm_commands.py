"""VM lifecycle commands: run, console, status, list, logs, stop, screenshot, ssh, rm."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import shlex
import shutil
import signal
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import click

from egpu.cli import output
from egpu.cli.host_commands import (
    check_guest_drivers,
    guest_drivers,
    hotplug_for,
    passthrough_options,
    run_passthrough,
)
from egpu.devices.display import is_blank, replaceable, request_screenshot
from egpu.devices.nvme.function import SIZE as NVME_SIZE
from egpu.engine import virtual
from egpu.engine.argv import check_cpu_floor, parse_memory
from egpu.engine.display import AUTO, DISPLAY_CHOICES, choose_display
from egpu.engine.qemu import (
    APPLE_DEVICE,
    EngineInfo,
    check_arch,
    find_engine_info,
    placeholder_info,
)
from egpu.engine.select import ensure_engine_info
from egpu.engine.shares import resolve_mounts
from egpu.errors import EgpuError, EngineError, UsageError, VMError
from egpu.guest import protocol as guest_protocol
from egpu.guest.assets import GuestAssets, ensure_guest, planned_guest
from egpu.images import seed
from egpu.images.pull import DEFAULT_IMAGE
from egpu.vm import agent, console, docker_api, lifecycle, screen, store
from egpu.vm.status import BROKEN, VmStatus, inspect, inspect_all

DEFAULT_NAME = "default"
SELFTEST_NAME = "selftest"
DEFAULT_CPUS = 2
DEFAULT_MEMORY = "512M"
SELFTEST_TIMEOUT_S = 300.0


def _status_of(name: str) -> VmStatus:
    return inspect(store.VmDir(name).require())


def _status_row(s: VmStatus) -> list[object]:
    ready = "yes" if s.guest_ready else "no"
    memory = f"{s.memory_mib}M" if s.memory_mib is not None else None
    return [s.name, s.state, s.pid, ready, s.arch, s.cpus, memory, s.gpu_path, s.qemu]


def _broken_notices(statuses: list[VmStatus]) -> None:
    """Say what is wrong with each broken VM (the table has no room for it)."""
    for s in statuses:
        if s.state == BROKEN:
            output.notice(f"VM {s.name!r} is broken: {'; '.join(s.problems)} "
                          f"(remove it: egpu rm {s.name})")


STATUS_COLUMNS = ("NAME", "STATE", "PID", "READY", "ARCH", "CPUS", "MEMORY", "GPU", "QEMU")


def _engine_for(
    qemu: str | None, gpu_path: str, *, dry_run: bool, progress: output.BarProgress
) -> EngineInfo:
    if dry_run and gpu_path == "apple" and platform.system() != "Darwin" and not qemu:
        # this host's QEMU is not the one a Mac runs: show the command by program name
        return placeholder_info()
    need = APPLE_DEVICE if gpu_path == "apple" else None
    if dry_run:
        # a dry run starts nothing and downloads nothing, so it works without any engine
        try:
            return find_engine_info(qemu, need)
        except EngineError:
            if qemu or need:
                raise
            return placeholder_info()
    return ensure_engine_info(qemu, progress=progress, need=need)


def _guest_for(arch: str, *, dry_run: bool, progress: output.BarProgress) -> GuestAssets:
    return planned_guest(arch) if dry_run else ensure_guest(arch, progress)


@click.command(context_settings={"ignore_unknown_options": False})
@click.option("--name", default=None, help=f"VM name [default: {DEFAULT_NAME}]")
@click.option("--arch", default="aarch64", show_default=True, help="guest architecture")
@click.option("--cpus", default=DEFAULT_CPUS, show_default=True, type=int)
@click.option("--memory", default=DEFAULT_MEMORY, show_default=True,
              help="e.g. 512M, 4G (a bare number is MiB)")
@click.option("--disk", "disks", multiple=True, metavar="PATH[:ro]", help="extra disk (virtio)")
@click.option("--mount", "mounts", multiple=True, metavar="HOST_DIR[:GUEST_DIR][:ro]",
              help="share a host folder (virtio-9p), in the guest at GUEST_DIR [default: the "
              "host path]; repeatable")
@click.option("--ssh-port", type=int, default=None, help="forward 127.0.0.1:PORT to guest :22")
@click.option("--port", "ports", multiple=True, metavar="HOST:GUEST",
              help="forward 127.0.0.1:HOST to guest port GUEST (repeatable; any port, 22 too)")
@click.option("--no-port-forwarding", is_flag=True,
              help="do not forward the guest's listening ports automatically")
@click.option("--detach", "-d", is_flag=True, help="return once QEMU is up")
@click.option("--dry-run", is_flag=True, help="print the QEMU command; start nothing")
@click.option("--json", "as_json", is_flag=True, help="JSON output (--dry-run, --self-test)")
@click.option("--self-test", "selftest", is_flag=True,
              help="boot, let the guest check itself, power off, report")
@click.option("--qemu", default=None, metavar="PATH", help="use this qemu-system binary")
@click.option("--accel", type=click.Choice(["tcg", "kvm", "hvf"]), default=None,
              help="accelerator [default: best available]")
@click.option("--quiet", "-q", is_flag=True, help="no progress output")
@click.option("--nvme-size", default=virtual.DEFAULT_NVME_SIZE, show_default=True,
              help="virtual eGPU: size of its NVMe function's (sparse) storage, "
              f"{NVME_SIZE.bounds()} (a bare number is bytes)")
@click.option("--image", default=None, is_flag=False, flag_value=DEFAULT_IMAGE,
              metavar="REF", help=f"boot a full guest image [bare --image: {DEFAULT_IMAGE}]")
@click.option("--base", default=None, metavar="PATH", help="boot a local qcow2 (with an overlay)")
@click.option("--display", "display", default=None, is_flag=False, flag_value=AUTO,
              metavar="UI", help=f"give the VM a screen ({'|'.join(DISPLAY_CHOICES)}; bare: "
              "the platform's window; none: no window, screenshots only) [default: a window "
              "for images with a desktop, else headless]")
@click.option("--headless", is_flag=True, help="no display device at all")
@click.option("--cloud-init", "cloud_init", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="--image/--base: a #cloud-config file merged into egpu's first-boot seed "
              "(your lists append to egpu's users, ssh_authorized_keys, runcmd, mounts, "
              "packages; your other keys win, except hostname)")
@click.option("--no-seed", is_flag=True,
              help="--image/--base: no cloud-init seed (no hostname, login user or key set up)")
@passthrough_options
@click.argument("extra", nargs=-1, type=click.UNPROCESSED, metavar="[-- EXTRA QEMU ARGS]")
def run(
    name: str | None, arch: str, cpus: int, memory: str, disks: tuple[str, ...],
    mounts: tuple[str, ...], ssh_port: int | None, ports: tuple[str, ...],
    no_port_forwarding: bool, detach: bool, dry_run: bool, as_json: bool,
    selftest: bool, qemu: str | None, accel: str | None, quiet: bool, nvme_size: str,
    gpu_path: str | None, gpu_path_alias: str | None, passthrough: str | None, no_tso: bool,
    bind: bool, ioreg: Path | None,
    sysfs: Path | None, systemextensions: Path | None, image: str | None, base: str | None,
    display: str | None, headless: bool,
    extra: tuple[str, ...], cloud_init: Path | None = None, no_seed: bool = False,
    force: bool = False, allow_sleep: bool = False, dma_bounce_size: str | None = None,
    docker: bool = False,
) -> None:
    """Boot a VM (the built-in guest unless an image is given).

    With no real eGPU on the host, the VM gets the virtual eGPU (GPU path user).
    """
    check_arch(arch)
    memory_mib = parse_memory(memory)
    check_cpu_floor(cpus)
    if as_json and not (dry_run or selftest):
        raise UsageError("--json goes with --dry-run or --self-test")
    if detach and selftest:
        raise UsageError("--self-test waits for the guest; it cannot --detach")
    if image and base:
        raise UsageError("give --image or --base, not both")
    if selftest and (image or base):
        raise UsageError("--self-test runs the built-in guest; drop --image/--base")
    vm_name = store.check_name(name or (SELFTEST_NAME if selftest else DEFAULT_NAME))
    NVME_SIZE.parse(nvme_size, "--nvme-size")
    user_data = _seed_input(vm_name, image or base, cloud_init, no_seed)
    if docker:  # egpu docker up: the guest serves the Docker API to the VM's docker.sock
        user_data = seed.merge_user_data(docker_api.guest_cloud_config(), user_data)
    # cheap checks first: bad input must fail before anything is downloaded or built
    for disk in disks:
        lifecycle.assumed_disk(disk)
    resolve_mounts(mounts)
    if ssh_port is not None:
        lifecycle.check_port_free(ssh_port)
    forwards = lifecycle.parse_port_forwards(ports, ssh_port)
    gpu = run_passthrough(gpu_path, passthrough, gpu_path_alias=gpu_path_alias, ioreg=ioreg,
                          sysfs=sysfs, systemextensions=systemextensions, no_tso=no_tso, bind=bind,
                          allow_sleep=allow_sleep, dma_bounce_size=dma_bounce_size)
    drivers = guest_drivers(image, base)
    gpu = check_guest_drivers(gpu, drivers, force=force)
    screen_plan = choose_display(display, headless=headless, arch=arch,
                                 features=drivers.features or (), platform=sys.platform,
                                 environ=os.environ)
    progress = output.BarProgress(quiet=quiet or as_json)
    info = _engine_for(qemu, gpu.path, dry_run=dry_run, progress=progress)
    if screen_plan is not None and screen_plan.needs_ui_modules and not dry_run:
        from egpu.engine.provision import provision_ui  # downloads: only when a window is asked
        info = replace(info, engine=provision_ui(info.engine, progress))
    gpu = gpu.for_engine(info)
    # a full image brings its own kernel; the built-in guest's paths are then unused
    full_image = bool(image or base)
    guest = _guest_for(arch, dry_run=dry_run or full_image, progress=progress)
    request = lifecycle.RunRequest(
        name=vm_name, arch=arch, cpus=cpus, memory_mib=memory_mib, disks=disks,
        ssh_port=ssh_port, accel=accel, selftest=selftest, extra=extra, gpu=gpu,
        nvme_size=nvme_size, bind=bind, image=image, base=base, display=screen_plan,
        ports=forwards, port_forwarding=not no_port_forwarding, mounts=mounts,
        seed=not no_seed, cloud_init=user_data, docker=docker,
    )
    if dry_run:
        plan = lifecycle.plan_run(request, info, guest, check_host=False)
        _print_notices((*info.notices, *gpu.notices, *plan.notices), as_json)
        if as_json:
            output.emit_json({"argv": plan.argv, "gpu": gpu.to_json()})
        else:
            output.out.print(shlex.join(plan.argv), markup=False)
        return
    # one name, one VM: held from planning (ports, disks) until QEMU runs
    with store.VmDir(vm_name).lock():
        plan = lifecycle.plan_run(request, info, guest)
        _print_notices((*info.notices, *gpu.notices, *plan.notices), as_json)
        status = lifecycle.start(plan, info, progress)
    if selftest:
        _finish_selftest(vm_name, as_json)
    elif detach:
        output.notice(f"VM {vm_name!r} running (pid {status.pid}); "
                      f"console: egpu console {vm_name}; stop: egpu stop {vm_name}")
    else:
        _attach(vm_name)


def _seed_input(
    name: str, image: str | None, cloud_init: Path | None, no_seed: bool
) -> dict[str, Any] | None:
    """Check the seed options before anything is downloaded; the user's cloud-config, parsed."""
    if not image:
        if cloud_init is not None or no_seed:
            raise UsageError("--cloud-init and --no-seed go with --image or --base "
                             "(the built-in guest has no cloud-init)")
        return None
    if no_seed:
        if cloud_init is not None:
            raise UsageError("give --cloud-init or --no-seed, not both")
        return None
    seed.check_hostname(name)
    if cloud_init is None:
        return None
    try:
        with cloud_init.open("rb") as f:
            data = f.read(seed.MAX_USER_DATA_BYTES + 1)  # one byte more tells "too large"
    except OSError as e:
        raise UsageError(f"--cloud-init {cloud_init}: {e.strerror or e}") from None
    return seed.parse_user_cloud_config(data, str(cloud_init))


def _print_notices(notices: tuple[str, ...], as_json: bool) -> None:
    if not as_json:
        for notice in notices:
            output.notice(notice)


def _finish_selftest(name: str, as_json: bool) -> None:
    try:
        status = lifecycle.wait_exit(name, timeout=SELFTEST_TIMEOUT_S)
    except EgpuError:
        lifecycle.stop(name, force=True)
        raise
    vm = store.VmDir(name)
    text = vm.serial_log.read_bytes().decode(errors="replace")
    result = guest_protocol.parse_selftest(text)
    if result is None:
        why = "; ".join(status.problems) or "the guest printed no self-test result"
        result = guest_protocol.SelfTestResult(ok=False, error=why)
    if vm.read_config().servers:
        result = _with_screen_check(result, vm.file(store.LAST_SCREEN))
    if as_json:
        output.emit_json(result.as_dict())
    else:
        for check in result.checks:
            mark = "[green]ok[/green]  " if check.ok else "[red]FAIL[/red]"
            output.out.print(f"{mark} {check.name}: {check.detail}")
        if result.error:
            output.out.print(f"[red]error[/red] {result.error}")
        output.out.print("self-test " + ("passed" if result.ok else "FAILED"))
    if not result.ok:
        sys.exit(1)


def _with_screen_check(
    result: guest_protocol.SelfTestResult, screen: Path
) -> guest_protocol.SelfTestResult:
    """Add the host's own display check: what the virtual display showed last is not blank."""
    from PIL import Image  # only a self-test with a display needs Pillow

    try:
        with Image.open(screen) as image:
            blank = is_blank(image)
            detail = f"{image.width}x{image.height} " + ("blank" if blank else "drawn")
    except OSError as e:
        blank, detail = True, f"no screenshot of the display ({e.strerror or e})"
    check = guest_protocol.CheckResult("screenshot", not blank, detail)
    return guest_protocol.SelfTestResult(
        ok=result.ok and not blank, checks=(*result.checks, check), error=result.error)


def _attach(name: str) -> None:
    """Show the console until the VM ends; at a terminal, keystrokes go to the guest as typed."""
    # Ctrl-] detaches (the VM keeps running). A hang-up, SIGTERM, or Ctrl-C when not at a
    # terminal (at one, Ctrl-C is the guest's) stop the VM cleanly.
    vm = store.VmDir(name)
    keyboard = sys.stdin.fileno() if sys.stdin.isatty() else None
    if keyboard is None:
        output.notice(f"VM {name!r} started; Ctrl-C stops it")
    else:
        output.notice(f"VM {name!r} started; {console.DETACH_KEY_NAME} detaches (the VM keeps "
                      "running), closing the terminal stops it")
    outcome: console.Outcome | None
    try:
        outcome = _session(vm, keyboard, raw=keyboard is not None, log_offset=0)
    except KeyboardInterrupt:
        outcome = None
    except console.Signalled as e:
        outcome = console.Outcome.HUNG_UP if e.signum == signal.SIGHUP else None
    if outcome is console.Outcome.DETACHED:
        _detached_notice(name)
        return
    if outcome is console.Outcome.ENDED:
        _ended(vm)
        return
    # interrupted, terminated, or its terminal is gone: the VM goes with it
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if outcome in (console.Outcome.HUNG_UP, console.Outcome.INPUT_CLOSED):
        _leave_terminal()
    output.notice(f"\nstopping {name!r} ...")
    status = lifecycle.stop(name)
    output.notice(f"VM {name!r} {status.state}")


def _session(
    vm: store.VmDir, keyboard: int | None, *, raw: bool, log_offset: int
) -> console.Outcome:
    """One console session on this process's terminal (raw when ``raw``), output on stdout."""
    ended = partial(lifecycle.has_ended, vm)
    with console.signals_raise(signal.SIGHUP, signal.SIGTERM), contextlib.ExitStack() as stack:
        if raw and keyboard is not None:
            stack.enter_context(console.raw_terminal(keyboard))
        return console.attach(vm, keyboard=keyboard, screen=sys.stdout.fileno(), ended=ended,
                              log_offset=log_offset)


def _ended(vm: store.VmDir) -> VmStatus:
    """The status of a VM whose QEMU ended, once its supervisor recorded how; VMError if crashed."""
    # between QEMU's end and the supervisor's exit record, a crash would read as a clean stop
    status = lifecycle.wait_exit(vm.name, timeout=lifecycle.DEFAULT_STOP_TIMEOUT_S)
    if status.state == "crashed":
        raise VMError(f"VM {vm.name!r} crashed: "
                      f"{'; '.join(status.problems) or 'unknown reason'}")
    return status


def _leave_terminal() -> None:
    """Point stdin, stdout and stderr at /dev/null: the terminal is gone, writes would fail."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)


def _detached_notice(name: str) -> None:
    output.notice(f"\ndetached from VM {name!r}, which keeps running: 'egpu console {name}' "
                  f"returns to it, 'egpu stop {name}' stops it")


@click.command(name="console")
@click.argument("name")
def console_command(name: str) -> None:
    """Attach to a running VM's serial console; Ctrl-] detaches, the VM keeps running."""
    vm = store.VmDir(name).require()
    status = inspect(vm)
    if status.state != "running":
        raise VMError(f"VM {name!r} is {status.state}", hint=f"start it: egpu run --name {name}")
    at_terminal = sys.stdin.isatty()
    if at_terminal:
        # output from before is in the log: replayed here, the shell's terminal queries in it
        # would be answered by this terminal and typed into whatever runs in the guest now
        output.notice(f"attached to the console of VM {name!r} ({console.DETACH_KEY_NAME} "
                      f"detaches; earlier output: egpu logs {name}); Enter shows a prompt")
    # this session only looks in: whatever ends it, a VM started detached stays so
    try:
        outcome = _session(vm, sys.stdin.fileno(), raw=at_terminal,
                           log_offset=console.log_end(vm))
    except KeyboardInterrupt:
        outcome = console.Outcome.DETACHED
    except console.Signalled as e:
        outcome = console.Outcome.HUNG_UP if e.signum == signal.SIGHUP else console.Outcome.DETACHED
    if outcome is console.Outcome.HUNG_UP:
        _leave_terminal()
    elif outcome is console.Outcome.ENDED:
        output.notice(f"\nVM {name!r} {_ended(vm).state}")
    elif outcome is console.Outcome.DETACHED and at_terminal:
        _detached_notice(name)


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True)
@click.option("--ioreg", default=None, metavar="FILE", type=click.Path(path_type=Path),
              help="Mac: compare with a saved `ioreg -a -l` dump instead of this registry")
def status(name: str | None, as_json: bool, ioreg: Path | None) -> None:
    """Show the state of one VM, or of all."""
    statuses = [_status_of(name)] if name else inspect_all(store.list_names())
    late = hotplug_for(statuses, ioreg)
    # from the guest agent, with a short timeout each: only running VMs are asked
    facts = {s.name: agent.facts(store.VmDir(s.name).agent_socket)
             for s in statuses if s.state == "running"}
    if as_json:
        docs = [{**s.to_json(), "hotplug": late.get(s.name, []),
                 "agent": facts.get(s.name, agent.NOT_ANSWERING)} for s in statuses]
        output.emit_json(docs[0] if name else docs)
        return
    for notes in late.values():
        for note in notes:
            output.notice(note)
    if name:
        s = statuses[0]
        for key, value in {**s.to_json(), "agent": facts.get(s.name)}.items():
            if value not in (None, [], {}):
                output.out.print(f"{key:12} {value}", markup=False)
        return
    output.table(STATUS_COLUMNS, [_status_row(s) for s in statuses])
    _broken_notices(statuses)


@click.command(name="list")
@click.option("--json", "as_json", is_flag=True)
@click.option("--quiet", "-q", is_flag=True, help="names only")
def list_vms(as_json: bool, quiet: bool) -> None:
    """List VMs."""
    statuses = inspect_all(store.list_names())
    if as_json:
        output.emit_json([s.to_json() for s in statuses])
    elif quiet:
        for s in statuses:
            output.out.print(s.name, markup=False)
    else:
        output.table(STATUS_COLUMNS, [_status_row(s) for s in statuses])
        _broken_notices(statuses)


@click.command()
@click.argument("name")
@click.option("--follow", "-f", is_flag=True, help="keep printing what the guest prints")
def logs(name: str, follow: bool) -> None:
    """Print a VM's serial console log."""
    vm = store.VmDir(name).require()
    if not vm.serial_log.exists():
        return

    try:
        ended = partial(lifecycle.has_ended, vm)
        for chunk in lifecycle.follow_log(vm.serial_log, follow=follow, until=ended):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass


@click.command()
@click.argument("name")
@click.option("--timeout", default=lifecycle.DEFAULT_STOP_TIMEOUT_S, show_default=True,
              type=float, help="seconds to wait for the guest to power off")
@click.option("--force", is_flag=True, help="skip the clean powerdown")
def stop(name: str, timeout: float, force: bool) -> None:
    """Stop a VM: powerdown over QMP, then the guest agent, then SIGTERM, then SIGKILL."""
    # nan passes every comparison and inf never ends the wait
    if not math.isfinite(timeout) or timeout <= 0:
        raise UsageError(f"--timeout {timeout} must be a finite, positive number of seconds")
    before = _status_of(name)
    if not before.active:
        lifecycle.stop(name)  # ends what a crashed run left behind (verified processes only)
        output.notice(f"VM {name!r} is already {before.state}")
        return
    after = lifecycle.stop(name, timeout=timeout, force=force)
    output.notice(f"VM {name!r} {after.state}")


@click.command()
@click.argument("name")
@click.option("--output", "-o", "out", required=True, type=click.Path(dir_okay=False,
              path_type=Path), help="PNG file to write")
def screenshot(name: str, out: Path) -> None:
    """Write what a VM's display (its own or the virtual eGPU's) shows to a PNG."""
    # checked again where the file is written; refusing here needs no VM at all
    if not replaceable(out.resolve()):
        raise UsageError(f"-o {out} is not a regular file; screenshots replace only those")
    vm = store.VmDir(name).require()
    status = inspect(vm)
    display = next((s for s in status.servers if s.name == "display"), None)
    request = display.spec.screenshot_request if display else None
    if status.display is None and (display is None or request is None):
        raise UsageError(f"VM {name!r} has no display",
                         hint="run it with --display (or --display none for no window)")
    if status.state != "running":
        raise VMError(f"VM {name!r} is {status.state}; screenshots need it running")
    if status.display is not None:
        width, height = screen.screendump(vm, out)
        output.notice(f"wrote {out} ({width}x{height})")
        return
    assert display is not None and request is not None
    # only the display server this VM's supervisor started, verified, is ever signalled
    request_screenshot(display.process, request, out)
    output.notice(f"wrote {out}")


@click.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--user", "-l", default=None, envvar="EGPU_SSH_USER",
              help="guest user [default: the user the VM's seed created, else "
              f"{lifecycle.DEFAULT_SSH_USER}]")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def ssh(name: str, user: str | None, command: tuple[str, ...]) -> None:
    """Open a shell (or run COMMAND) in a VM over its loopback ssh forward."""
    if user is not None:
        lifecycle.check_ssh_user(user)
    status = _status_of(name)
    if status.state != "running":
        raise VMError(f"VM {name!r} is {status.state}", hint=f"start it: egpu run --name {name}")
    if status.ssh_port is None:
        raise UsageError(f"VM {name!r} forwards no ssh port (run it with --ssh-port or --image)")
    vm = store.VmDir(name)
    login, key, known_hosts = lifecycle.ssh_login(vm, vm.read_config(), user)
    argv = lifecycle.ssh_argv(status.ssh_port, login, command, key=key, known_hosts=known_hosts)
    if shutil.which(argv[0]) is None:
        raise UsageError("no ssh client found (apt-get install openssh-client)")
    os.execvp(argv[0], argv)


@click.command(name="rm")
@click.argument("name")
@click.option("--force", "-f", is_flag=True, help="stop a live VM first")
def rm(name: str, force: bool) -> None:
    """Delete a VM: its directory, disks and logs (a live one only with --force)."""
    lifecycle.remove(name, force=force)
    output.notice(f"removed VM {name!r}")


def register(group: click.Group) -> None:
    """Add this module's commands to the root group."""
    for command in (run, console_command, status, list_vms, logs, stop, screenshot, ssh, rm):
        group.add_command(command)

