"""Build the QEMU command for a VM: a pure function from a VmSpec to argv.

Device pieces for real passthrough (GPU path ``apple`` / ``vfio``) and the virtual eGPU come in as
ready-made argument lists (``VmSpec.devices``); this module composes the machine around them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from egpu.engine.display import DisplayPlan
from egpu.engine.qemu_options import OptionValue, escape, option_string
from egpu.engine.shares import Share, share_args
from egpu.errors import UsageError
from egpu.units import MIB, parse_size

MIN_MEMORY_MIB = 64
MAX_MEMORY_MIB = 1 << 22  # 4 TiB
MIN_CPUS = 1
# hvf and kvm run each vCPU on a host CPU; tcg emulates any number (slowly)
HOST_CPU_ACCELS = ("hvf", "kvm")
# the name scottjg/qemu-vfio-apple's launcher gives it (contrib/apple-vfio/qemu-vfio-apple/
# VMLauncher.swift, buildQemuArgv)
RAM_BACKEND_ID = "pc.ram"
FIRMWARE_MENU_WAIT_MS = 0  # no firmware boot-menu countdown
CONSOLE_ID = "console"  # chardev ids
SEED_DRIVE_ID = "seed"
QMP_ID = "qmp"
NETDEV_ID = "net0"  # the user-mode network, which port forwards are added to over QMP
FORWARD_HOST_ADDRESS = "127.0.0.1"  # every host port forward binds loopback only
GUEST_SSH_PORT = 22
MAX_PORT = 65535
AGENT_ID = "agent"
# the port name qemu-ga looks for (QEMU docs/interop/qemu-ga.rst; Debian's udev rule and
# systemd unit match on it too)
AGENT_PORT_NAME = "org.qemu.guest_agent.0"

Accel = Literal["tcg", "kvm", "hvf"]
MemoryBackend = Literal["plain", "memfd-shared", "prealloc"]


def parse_memory(text: str) -> int:
    """Guest memory in MiB from ``512M``, ``2G``, ``1.5GiB`` (a bare number is MiB, as in QEMU)."""
    mib = parse_size(text, bare_unit=MIB, granule=MIB, what="memory size") // MIB
    if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
        raise UsageError(f"memory size {text!r} out of range ({MIN_MEMORY_MIB}M to 4T)")
    return mib


@dataclass(frozen=True)
class Disk:
    """An extra block device given with ``--disk PATH[:ro]``."""

    path: Path
    fmt: str
    readonly: bool = False


def parse_disk_option(text: str) -> tuple[Path, bool]:
    """Split ``PATH[:ro]`` into a path and a read-only flag."""
    if text.endswith(":ro"):
        return Path(text[:-3]), True
    if text.endswith(":rw"):
        return Path(text[:-3]), False
    if not text:
        raise UsageError("--disk needs a path")
    return Path(text), False


@dataclass(frozen=True)
class Firmware:
    """UEFI through two pflash drives: the engine's code (read-only) and a per-VM vars copy."""

    code: Path
    vars: Path


@dataclass(frozen=True)
class VmSpec:
    """Everything that decides a VM's QEMU command line."""

    name: str
    arch: str
    cpus: int
    memory_mib: int
    accel: Accel
    qmp_socket: Path
    console_socket: Path
    serial_log: Path
    agent_socket: Path | None = None  # the guest agent's channel; None: no agent port
    kernel: Path | None = None
    initrd: Path | None = None
    append: str | None = None
    firmware: Firmware | None = None
    boot_disk: Disk | None = None
    disks: tuple[Disk, ...] = ()
    shares: tuple[Share, ...] = ()  # --mount: host folders over virtio-9p
    ssh_port: int | None = None
    memory_backend: MemoryBackend = "plain"
    cpu_model: str | None = None  # default: max under tcg, host otherwise
    accel_options: tuple[str, ...] = ()  # e.g. ("tso=on",) for hvf
    machine_options: tuple[str, ...] = ()
    devices: tuple[tuple[str, ...], ...] = field(default_factory=tuple)
    extra: tuple[str, ...] = ()
    display: DisplayPlan | None = None  # None: no display device (headless)
    seed: Path | None = None  # cloud-init NoCloud seed (an ISO labelled cidata), read-only
    # unix sockets on the host forwarded to guest TCP ports (the Docker VM's API): (path, port)
    socket_forwards: tuple[tuple[Path, int], ...] = ()


def machine_type(arch: str) -> str:
    return "virt" if arch == "aarch64" else "q35"


def check_cpu_floor(cpus: int) -> None:
    """Refuse a vCPU count no machine runs (checked before anything is downloaded)."""
    if cpus < MIN_CPUS:
        raise UsageError(f"--cpus must be at least {MIN_CPUS}")


def check_cpus(cpus: int, arch: str, accel: str, *, machine_max: int,
               host_cpus: int | None) -> int:
    """Refuse a vCPU count the machine type (at most ``machine_max``) or the host cannot run.

    ``host_cpus`` bounds hvf and kvm guests; None when the host is not the one that will run.
    """
    check_cpu_floor(cpus)
    if cpus > machine_max:
        raise UsageError(f"--cpus {cpus} is more than QEMU's {machine_type(arch)} machine "
                         f"takes ({machine_max})")
    if host_cpus is not None and accel in HOST_CPU_ACCELS and cpus > host_cpus:
        raise UsageError(f"--cpus {cpus} is more than this host's {host_cpus} CPUs "
                         f"(accelerator {accel} runs each vCPU on one)")
    return cpus


def _port(port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= MAX_PORT:
        raise UsageError(f"{port!r} is not a TCP port (1-{MAX_PORT})")
    return port


def hostfwd_rule(host_port: int, guest_port: int) -> str:
    """A slirp forward rule, ``tcp:127.0.0.1:HOST-:GUEST`` (for -netdev hostfwd= and hostfwd_add).

    Only ever built from two checked port numbers: loopback on the host, the guest's address.
    """
    return f"tcp:{FORWARD_HOST_ADDRESS}:{_port(host_port)}-:{_port(guest_port)}"


def hostfwd_host(host_port: int) -> str:
    """The host end of a rule, ``tcp:127.0.0.1:HOST``, as hostfwd_remove names it."""
    return f"tcp:{FORWARD_HOST_ADDRESS}:{_port(host_port)}"


# sun_path holds 108 bytes with its NUL (Linux); slirp's parser reads the rule into 256.
MAX_UNIX_FORWARD_PATH = 107


def hostfwd_unix_rule(path: Path, guest_port: int) -> str:
    """A slirp forward from a unix socket QEMU creates on the host, ``unix:PATH-:GUEST``.

    QEMU >= 10.1 with libslirp >= 4.7 (net/slirp.c, slirp_hostfwd); the socket takes QEMU's
    umask (the supervisor's 0177: mode 0600). The path ends at the rule's '-:' separator, so
    it may not contain ':'.
    """
    text = str(path)
    if not path.is_absolute() or ":" in text or len(text.encode()) > MAX_UNIX_FORWARD_PATH:
        raise UsageError(f"{text!r} cannot be a forwarded socket (an absolute path without ':', "
                         f"at most {MAX_UNIX_FORWARD_PATH} bytes)",
                         hint="set EGPU_HOME to a shorter, plainer path")
    return f"unix:{text}-:{_port(guest_port)}"


def build_argv(qemu: Sequence[str], spec: VmSpec) -> list[str]:
    """The full QEMU command: ``qemu`` (the engine's prefix) followed by the VM's options.

    Every path and name goes into its option through egpu.engine.qemu_options, so a comma in
    it stays part of the value; UsageError for a value no escaping can carry.
    """
    argv = list(qemu)
    argv += ["-name", option_string(None, {"guest": spec.name,
                                           "process": f"egpu-{spec.name}"})]
    accel = spec.accel + "".join(f",{o}" for o in spec.accel_options)
    if spec.accel == "tcg" and not spec.accel_options:
        accel += ",thread=multi"
    argv += ["-accel", accel]
    argv += ["-cpu", spec.cpu_model or ("max" if spec.accel == "tcg" else "host")]
    argv += ["-smp", f"{spec.cpus},sockets=1,cores={spec.cpus},threads=1"]

    machine = [machine_type(spec.arch)]
    if spec.arch == "aarch64":
        machine.append("highmem=on")
    machine += spec.machine_options
    mem = f"{spec.memory_mib}M"
    if spec.memory_backend != "plain":
        # fd-backed shared RAM lets a vfio-user server map guest memory (DMA_MAP carries fds)
        if spec.memory_backend == "memfd-shared":
            backend = f"memory-backend-memfd,id={RAM_BACKEND_ID},size={mem},share=on"
        else:
            backend = (f"memory-backend-ram,id={RAM_BACKEND_ID},size={mem},"
                       "prealloc=on,share=off")
        argv += ["-object", backend]
        machine.append(f"memory-backend={RAM_BACKEND_ID}")
    argv += ["-machine", ",".join(machine), "-m", mem]

    if spec.firmware is not None:
        argv += [
            "-drive", option_string(None, {"if": "pflash", "format": "raw", "unit": 0,
                                           "readonly": True, "file": spec.firmware.code}),
            "-drive", option_string(None, {"if": "pflash", "format": "raw", "unit": 1,
                                           "file": spec.firmware.vars}),
            # edk2 takes its boot-menu countdown from fw_cfg when the menu is on: zero skips
            # the 5 s wait on every boot (the boot disk carries bootindex=0)
            "-boot", f"menu=on,splash-time={FIRMWARE_MENU_WAIT_MS}",
        ]
    if spec.kernel is not None:
        # -kernel, -initrd and -append take their argument whole (no option syntax)
        argv += ["-kernel", str(spec.kernel)]
        if spec.initrd is not None:
            argv += ["-initrd", str(spec.initrd)]
        if spec.append:
            argv += ["-append", spec.append]

    disks = ((spec.boot_disk,) if spec.boot_disk else ()) + spec.disks
    for i, disk in enumerate(disks):
        drive: dict[str, OptionValue] = {"file": disk.path, "format": disk.fmt, "if": "none",
                                         "id": f"disk{i}"}
        if disk.readonly:
            drive["readonly"] = True
        else:
            drive |= {"discard": "unmap", "detect-zeroes": "unmap"}
        device: dict[str, OptionValue] = {"drive": f"disk{i}"}
        if i == 0 and spec.boot_disk is not None:
            device["bootindex"] = 0
        argv += ["-drive", option_string(None, drive),
                 "-device", option_string("virtio-blk-pci", device)]
    if spec.seed is not None:
        # NoCloud finds its seed by filesystem label on any block device, so virtio-blk serves
        # both arches (aarch64 virt has no IDE for a cdrom); no bootindex: firmware skips it
        argv += ["-drive", option_string(None, {"file": spec.seed, "format": "raw", "if": "none",
                                                "id": SEED_DRIVE_ID, "readonly": True}),
                 "-device", option_string("virtio-blk-pci", {"drive": SEED_DRIVE_ID})]

    argv += share_args(spec.shares)

    netdev = f"user,id={NETDEV_ID}"
    if spec.ssh_port is not None:
        # loopback only: a guest's sshd is never exposed beyond this host
        netdev += f",hostfwd={hostfwd_rule(spec.ssh_port, GUEST_SSH_PORT)}"
    for path, guest_port in spec.socket_forwards:
        # on the host only this user can open it: a 0600 socket in the 0700 VM directory
        netdev += f",hostfwd={escape(hostfwd_unix_rule(path, guest_port), 'hostfwd')}"
    argv += ["-netdev", netdev, "-device", f"virtio-net-pci,netdev={NETDEV_ID},romfile="]
    argv += ["-device", "virtio-rng-pci"]

    for dev in spec.devices:
        argv += list(dev)

    if spec.agent_socket is not None:
        # one virtio-serial port named for qemu-ga, its host end a socket in the VM directory
        argv += [
            "-chardev", option_string("socket", {
                "id": AGENT_ID, "path": spec.agent_socket, "server": True, "wait": False}),
            "-device", "virtio-serial-pci",
            "-device", option_string("virtserialport", {"chardev": AGENT_ID,
                                                        "name": AGENT_PORT_NAME}),
        ]

    argv += [
        "-chardev", option_string("socket", {
            "id": CONSOLE_ID, "path": spec.console_socket, "server": True, "wait": False,
            "logfile": spec.serial_log, "logappend": True}),
        "-serial", f"chardev:{CONSOLE_ID}",
        # a chardev, not "-qmp unix:PATH,...": there the path is an implied first value, which
        # an "=" in it would turn into KEY=VALUE; here it is an ordinary option value
        "-chardev", option_string("socket", {
            "id": QMP_ID, "path": spec.qmp_socket, "server": True, "wait": False}),
        "-qmp", f"chardev:{QMP_ID}",
        *(spec.display.qemu_args() if spec.display else ["-display", "none"]),
        "-nodefaults",
        "-no-user-config",
    ]
    argv += list(spec.extra)
    return argv
