"""Derive a VM's state from its directory, its processes and QMP."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from egpu.errors import NotFoundError, VMError
from egpu.guest import protocol as guest_protocol
from egpu.process import ProcessRef
from egpu.vm import qmp, store

State = Literal["starting", "running", "stopped", "crashed", "broken"]
ACTIVE_STATES = ("starting", "running")
ENDED_STATES = ("stopped", "crashed")
BROKEN: State = "broken"  # a VM directory egpu cannot read: shown with its problem, never raised
READY_MARKER = guest_protocol.READY_MARKER.encode()
READY_SCAN_LIMIT = 4 << 20  # bytes of console log scanned for the ready marker
STATUS_QMP_TIMEOUT_S = 1.0


def process_alive(ref: ProcessRef | None) -> bool:
    """True while the recorded process runs (verified: pid, start time and program)."""
    return ref is not None and ref.alive()


def log_contains(path: Path, needle: bytes, limit: int = READY_SCAN_LIMIT) -> bool:
    """Whether the first ``limit`` bytes of a log contain ``needle``."""
    try:
        with path.open("rb") as f:
            return needle in f.read(limit)
    except OSError:
        return False


@dataclass
class VmStatus:
    """What ``egpu status`` reports about one VM."""

    name: str
    state: State
    pid: int | None
    guest_ready: bool
    arch: str | None  # None (and the fields below): a broken VM whose config is unreadable
    gpu_path: str | None  # how the GPU reaches the VM
    qemu: str | None  # which QEMU runs it
    qmp_socket: str
    serial_log: str
    cpus: int | None
    memory_mib: int | None
    ssh_port: int | None
    exit: dict[str, Any] | None = None
    servers: list[store.ServerRecord] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    run_state: str | None = None  # QMP query-status: running, paused, shutdown, ...
    display: dict[str, str] | None = None  # its own screen (device, UI); None: headless

    @property
    def active(self) -> bool:
        """QEMU is starting or running."""
        return self.state in ACTIVE_STATES

    @property
    def ended(self) -> bool:
        return self.state in ENDED_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "state": self.state,
            "pid": self.pid,
            "guest_ready": self.guest_ready,
            "arch": self.arch,
            "gpu_path": self.gpu_path,
            "qemu": self.qemu,
            "qmp_socket": self.qmp_socket,
            "serial_log": self.serial_log,
            "cpus": self.cpus,
            "memory_mib": self.memory_mib,
            "ssh_port": self.ssh_port,
            "exit": self.exit,
            # socket at the top, as before the spec held it: scripts read it from here
            "servers": [{**s.to_json(), "socket": str(s.socket), "running": s.alive()}
                        for s in self.servers],
            "problems": self.problems,
            "run_state": self.run_state,
            "display": self.display,
        }


def derive_state(
    *, exit_record: dict[str, Any] | None, qemu_alive: bool, supervisor_alive: bool,
    pid_recorded: bool, qmp_up: bool, run_state: str | None = None,
) -> State:
    """The state from the facts gathered about a VM (pure; see inspect)."""
    if qemu_alive:
        if run_state in qmp.CRASH_RUN_STATES:
            return "crashed"
        return "running" if qmp_up else "starting"
    if exit_record is not None:
        clean = exit_record.get("returncode") == 0 or exit_record.get("stop_requested")
        if (clean and not exit_record.get("server_failure") and not exit_record.get("error")
                and not exit_record.get("run_state")):
            return "stopped"
        return "crashed"
    if supervisor_alive:
        return "starting"
    return "crashed" if pid_recorded else "stopped"


def inspect(vm: store.VmDir) -> VmStatus:
    """Status of an existing VM (NotFoundError when it never existed; ``broken`` if unreadable)."""
    try:
        config = vm.read_config()
    except VMError as e:
        return broken_status(vm, e.message)
    qemu = vm.read_process(store.QEMU_PID)
    sup = vm.read_process(store.SUPERVISOR_PID)
    qemu_alive = process_alive(qemu)
    sup_alive = process_alive(sup)
    # QEMU creates its QMP socket once its monitor is up; the run state comes from QMP itself
    # (None when the monitor is busy with another client, which still means QEMU is up)
    qmp_up = qemu_alive and vm.qmp_socket.exists()
    run_state = qmp.query_status(vm.qmp_socket, STATUS_QMP_TIMEOUT_S) if qmp_up else None
    exit_record = None if qemu_alive else vm.read_json(store.EXIT_RECORD)
    state = derive_state(
        exit_record=exit_record, qemu_alive=qemu_alive, supervisor_alive=sup_alive,
        pid_recorded=qemu is not None or sup is not None, qmp_up=qmp_up, run_state=run_state,
    )
    problems: list[str] = []
    if qemu_alive and run_state in qmp.CRASH_RUN_STATES:
        assert run_state is not None
        problems.append(qmp.crash_problem(run_state, qmp.query_pc(vm.qmp_socket,
                                                                  STATUS_QMP_TIMEOUT_S)))
    if exit_record and isinstance(exit_record.get("run_state"), str):
        pc = exit_record.get("pc")
        problems.append(qmp.crash_problem(exit_record["run_state"],
                                          pc if isinstance(pc, str) else None))
        run_state = exit_record["run_state"]
    if exit_record and exit_record.get("server_failure"):
        problems.append(str(exit_record["server_failure"]))
    if exit_record and exit_record.get("error"):
        problems.append(str(exit_record["error"]))
    if state == "crashed" and not problems:
        problems.append(_crash_reason(vm, exit_record))
    return VmStatus(
        name=vm.name, state=state, pid=qemu.pid if qemu is not None and qemu_alive else None,
        guest_ready=state in ACTIVE_STATES and log_contains(vm.serial_log, READY_MARKER),
        arch=config.arch, gpu_path=config.gpu_path, qemu=config.qemu,
        qmp_socket=str(vm.qmp_socket),
        serial_log=str(vm.serial_log), cpus=config.cpus, memory_mib=config.memory_mib,
        ssh_port=config.ssh_port, exit=exit_record, servers=vm.read_servers(),
        display=config.display,
        problems=problems, run_state=run_state,
    )


def broken_status(vm: store.VmDir, problem: str) -> VmStatus:
    """What a VM directory egpu cannot read is shown as."""
    return VmStatus(
        name=vm.name, state=BROKEN, pid=None, guest_ready=False, arch=None, gpu_path=None,
        qemu=None,
        qmp_socket=str(vm.qmp_socket), serial_log=str(vm.serial_log), cpus=None,
        memory_mib=None, ssh_port=None, problems=[problem],
    )


def inspect_all(names: list[str]) -> list[VmStatus]:
    """Status of each named VM; one that vanished meanwhile is left out, a bad one is broken."""
    statuses = []
    for name in names:
        try:
            statuses.append(inspect(store.VmDir(name)))
        except NotFoundError:
            continue
    return statuses


def _crash_reason(vm: store.VmDir, exit_record: dict[str, Any] | None) -> str:
    if exit_record is None:
        return "QEMU is gone and left no exit record"
    sig = exit_record.get("signal")
    if sig:
        return f"QEMU was killed by signal {sig}"
    tail = last_line(vm.file(store.QEMU_LOG))
    reason = f"QEMU exited with status {exit_record.get('returncode')}"
    return f"{reason}: {tail}" if tail else reason


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a (possibly large) log."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            size = f.tell()
            f.seek(max(0, size - limit))
            lines = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""
