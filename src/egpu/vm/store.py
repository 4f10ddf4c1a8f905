"""One directory per VM, holding everything about it; this module names every file in it.

State is derived from this directory and the processes it names, never from a CLI process, so a
new CLI can inspect or stop a VM another one started (Lima's store does the same).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from egpu.errors import NotFoundError, UsageError, VMError
from egpu.paths import dirs

# File names inside a VM directory.
CONFIG = "config.json"  # VmConfig: what was asked for and the exact argv
SUPERVISOR_PID = "supervisor.pid"
QEMU_PID = "qemu.pid"
QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"
SERIAL_LOG = "serial.log"  # everything the guest printed on its serial console
QEMU_LOG = "qemu.log"  # QEMU's own stderr
SUPERVISOR_LOG = "supervisor.log"
EXIT_RECORD = "exit.json"  # written by the supervisor when QEMU ends
STOP_REQUEST = "stop-requested"  # written by `stop` before it acts, so a kill reads as a stop
SERVERS_DIR = "servers"  # device-server sockets and logs (engine user)
OVERLAY = "overlay.qcow2"
EFI_VARS = "efivars.fd"
NVME_BACKING = "egpu-nvme.img"  # the virtual eGPU's NVMe storage (sparse; kept across runs)
LAST_SCREEN = "last-screen.png"  # what the virtual display showed when QEMU ended
POWER_ASSERTION_PID = "power-assertion.pid"  # macOS: the caffeinate holding off idle sleep
VFIO_BIND = "vfio-bind.json"  # functions egpu moved to vfio-pci, and their previous drivers

# Files that belong to one run; removed before the next run starts.
SERVERS_RECORD = "servers.json"  # device-server pids and exit statuses
RUNTIME_FILES = (
    SUPERVISOR_PID, QEMU_PID, QMP_SOCKET, CONSOLE_SOCKET, EXIT_RECORD, STOP_REQUEST, SERVERS_RECORD,
    LAST_SCREEN,
)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
# sun_path is 108 bytes on Linux (104 on macOS); keep every socket path under the smaller.
MAX_SOCKET_PATH = 103
START_SLACK_S = 0.05  # psutil start times are rounded to clock ticks


def check_name(name: str) -> str:
    """Validate a VM name (it becomes a directory name)."""
    if not NAME_RE.match(name):
        raise UsageError(
            f"bad VM name {name!r}: use letters, digits, '.', '_' or '-' (at most 63), "
            "starting with a letter or digit"
        )
    return name


@dataclass
class VmConfig:
    """What a VM was started with: the request and the exact command."""

    name: str
    arch: str
    cpus: int
    memory_mib: int
    accel: str
    engine: str  # engine kind (none / user / apple / vfio) and QEMU source
    qemu_version: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ssh_port: int | None = None
    selftest: bool = False
    image: str | None = None
    servers: list[dict[str, Any]] = field(default_factory=list)  # device servers to start
    bind_functions: list[str] = field(default_factory=list)  # --bind: move these to vfio-pci
    host_guard: dict[str, Any] | None = None  # engine.safety.HostGuard: kept while QEMU runs
    gpu_bound_at_start: list[str] | None = None  # apple: functions claimed when it started

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> VmConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


class VmDir:
    """The directory of one VM and the paths in it."""

    def __init__(self, name: str, root: Path | None = None) -> None:
        self.name = check_name(name)
        self.path = (root or dirs().vms) / name

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def qmp_socket(self) -> Path:
        return self.path / QMP_SOCKET

    @property
    def console_socket(self) -> Path:
        return self.path / CONSOLE_SOCKET

    @property
    def serial_log(self) -> Path:
        return self.path / SERIAL_LOG

    @property
    def servers_dir(self) -> Path:
        return self.path / SERVERS_DIR

    def exists(self) -> bool:
        return (self.path / CONFIG).exists()

    def require(self) -> VmDir:
        """This VM, or NotFoundError when it never existed."""
        if not self.exists():
            raise NotFoundError(f"no VM named {self.name!r}", hint="see 'egpu list'")
        return self

    def check_socket_paths(self) -> None:
        """Refuse a VM directory too deep for UNIX socket paths."""
        longest = self.servers_dir / "function-0.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise VMError(
                f"VM directory path too long for UNIX sockets ({len(str(longest))} bytes)",
                hint="set EGPU_HOME to a shorter path",
            )

    def create(self) -> None:
        """Make the directory, private to this user (it holds sockets)."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.path, 0o700)

    def read_config(self) -> VmConfig:
        try:
            return VmConfig.from_json(json.loads(self.file(CONFIG).read_text()))
        except FileNotFoundError:
            raise NotFoundError(f"no VM named {self.name!r}", hint="see 'egpu list'") from None
        except (ValueError, TypeError) as e:
            raise VMError(f"VM {self.name!r}: unreadable {CONFIG}: {e}") from e

    def write_config(self, config: VmConfig) -> None:
        write_json(self.file(CONFIG), config.to_json())

    def read_pid(self, which: str) -> int | None:
        ref = self.read_process(which)
        return ref.pid if ref else None

    def read_process(self, which: str) -> ProcessRef | None:
        """The process a pid file names (``PID [START_TIME]``), or None."""
        try:
            fields = self.file(which).read_text().split()
        except OSError:
            return None
        if not fields or not fields[0].isdigit():
            return None
        try:
            started = float(fields[1]) if len(fields) > 1 else None
        except ValueError:
            started = None
        return ProcessRef(int(fields[0]), started)

    def write_pid(self, which: str, pid: int) -> None:
        """Record a process by pid and start time, so a reused pid is never taken for it."""
        self.file(which).write_text(f"{pid} {ProcessRef.of(pid).started}\n")

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.file(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_json_list(self, name: str) -> list[Any]:
        try:
            data = json.loads(self.file(name).read_text())
        except (OSError, ValueError):
            return []
        return data if isinstance(data, list) else []

    def clear_runtime(self) -> None:
        """Forget the last run (pids, sockets, exit record); keeps config, logs and disks."""
        for name in RUNTIME_FILES:
            self.file(name).unlink(missing_ok=True)
        shutil.rmtree(self.servers_dir, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


@dataclass(frozen=True)
class ProcessRef:
    """A process identified by pid and start time (pids are reused; start times are not)."""

    pid: int
    started: float | None = None

    @classmethod
    def of(cls, pid: int) -> ProcessRef:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return cls(pid, None)

    def alive(self) -> bool:
        """True while this very process runs (a zombie counts as gone).

        Identity is by start time, not command line: right after a fork the child's
        /proc/PID/cmdline can still be empty.
        """
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            return self.started is None or abs(proc.create_time() - self.started) < START_SLACK_S
        except psutil.Error:
            return False


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def list_names(root: Path | None = None) -> list[str]:
    """Names of every VM that has a directory with a config."""
    base = root or dirs().vms
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if NAME_RE.match(p.name) and (p / CONFIG).exists())
