"""One directory per VM, holding everything about it; this module names every file in it.

State is derived from this directory and the processes it names, never from a CLI process, so a
new CLI can inspect or stop a VM another one started (Lima's store does the same).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from egpu import atomic
from egpu.devices.serve_spec import ServeSpec, serve_argv
from egpu.engine.argv import MAX_PORT
from egpu.engine.shares import Share
from egpu.errors import ConflictError, NotFoundError, UsageError, VMError
from egpu.paths import dirs
from egpu.process import ProcessRef
from egpu.vm.ports import PortTable

# File names inside a VM directory.
CONFIG = "config.json"  # VmConfig: what was asked for and the exact argv
SUPERVISOR_PID = "supervisor.pid"
QEMU_PID = "qemu.pid"
QMP_SOCKET = "qmp.sock"
CONSOLE_SOCKET = "console.sock"
AGENT_SOCKET = "agent.sock"  # the QEMU guest agent's virtio-serial channel (vm/agent.py)
SERIAL_LOG = "serial.log"  # everything the guest printed on its serial console
QEMU_LOG = "qemu.log"  # QEMU's own stderr
SUPERVISOR_LOG = "supervisor.log"
EXIT_RECORD = "exit.json"  # written by the supervisor when QEMU ends
STOP_REQUEST = "stop-requested"  # written by `stop` before it acts, so a kill reads as a stop
SERVERS_DIR = "servers"  # device-server sockets and logs (GPU path user)
OVERLAY = "overlay.qcow2"
EFI_VARS = "efivars.fd"
NVME_BACKING = "egpu-nvme.img"  # the virtual eGPU's NVMe storage (sparse; kept across runs)
LAST_SCREEN = "last-screen.png"  # what the virtual display showed when QEMU ended
SCREENDUMP = "screendump.png"  # QEMU's screendump of the VM's own display, before it is checked
POWER_ASSERTION_PID = "power-assertion.pid"  # macOS: the caffeinate holding off idle sleep
VFIO_BIND = "vfio-bind.json"  # functions egpu moved to vfio-pci, and their previous drivers
SEED = "seed.iso"  # cloud-init NoCloud seed (label cidata) of a full image; rewritten each run
KNOWN_HOSTS = "known_hosts"  # the guest's ssh host key, for egpu ssh; cleared with a new disk
DOCKER_SOCKET = "docker.sock"  # a Docker VM's API (QEMU forwards it to the guest; 0600)

# Files that belong to one run; removed before the next run starts.
SERVERS_RECORD = "servers.json"  # device-server pids and exit statuses
PORTS_RECORD = "ports.json"  # vm.ports.PortTable: the supervisor's port forwards and states
SERVE_RECORD = "serve.json"  # the model `egpu serve` runs and its forwarded port (vm/serving.py)
RUNTIME_FILES = (
    SUPERVISOR_PID, QEMU_PID, QMP_SOCKET, CONSOLE_SOCKET, AGENT_SOCKET, EXIT_RECORD, STOP_REQUEST,
    SERVERS_RECORD, LAST_SCREEN, SCREENDUMP, PORTS_RECORD, SERVE_RECORD, DOCKER_SOCKET,
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")  # whole string: fullmatch
# sun_path is 108 bytes on Linux (104 on macOS); keep every socket path under the smaller.
MAX_SOCKET_PATH = 103
PID_FILE_FIELDS = 3  # PID START PROGRAM
LOCK_SUFFIX = ".lock"
LOCK_ATTEMPTS = 8  # a lock file removed by its holder as another opens it: open it again


def check_name(name: str) -> str:
    """Validate a VM name (it becomes a directory name)."""
    if not NAME_RE.fullmatch(name):
        raise UsageError(
            f"bad VM name {name!r}: use letters, digits, '.', '_' or '-' (at most 63), "
            "starting with a letter or digit"
        )
    return name


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], *,
         optional: bool = False) -> Any:
    """One field of a JSON record, type-checked (bool is never taken for int)."""
    value = data.get(key)
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = "/".join(k.__name__ for k in kinds)
        raise ValueError(f"{key}: expected {names}, got {type(value).__name__}")
    return value


def _str_list(data: dict[str, Any], key: str) -> list[str]:
    value = _get(data, key, list, optional=True) or []
    if not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a list of strings")
    return list(value)


def _str_map(data: dict[str, Any], key: str) -> dict[str, str] | None:
    value = _get(data, key, dict, optional=True)
    if value is not None and not all(isinstance(k, str) and isinstance(v, str)
                                     for k, v in value.items()):
        raise ValueError(f"{key}: expected an object of strings")
    return None if value is None else dict(value)


def _port_pairs(data: dict[str, Any], key: str) -> list[tuple[int, int]]:
    """A list of [host, guest] port pairs (older configs have none)."""
    pairs = []
    for value in _get(data, key, list, optional=True) or []:
        if not (isinstance(value, list) and len(value) == 2 and all(
                isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= MAX_PORT
                for p in value)):
            raise ValueError(f"{key}: expected [host, guest] port pairs")
        pairs.append((value[0], value[1]))
    return pairs


def _spec(data: dict[str, Any]) -> ServeSpec:
    return ServeSpec.from_json(_get(data, "spec", dict))


@dataclass(frozen=True)
class ServerLaunch:
    """What the vm layer starts for one device server: its spec, the file it goes in, the log."""

    name: str
    function: int  # PCI function number at the guest slot
    spec: ServeSpec
    spec_file: str
    log: str

    @property
    def argv(self) -> tuple[str, ...]:
        return serve_argv(Path(self.spec_file))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "function": self.function, "spec": self.spec.to_json(),
                "spec_file": self.spec_file, "log": self.log}

    @classmethod
    def from_json(cls, data: object) -> ServerLaunch:
        if not isinstance(data, dict):
            raise ValueError("a device server entry is not an object")
        return cls(name=_get(data, "name", str), function=_get(data, "function", int),
                   spec=_spec(data), spec_file=_get(data, "spec_file", str),
                   log=_get(data, "log", str))


@dataclass(frozen=True)
class ServerRecord:
    """What a running (or ended) device server is: what it serves, verified identity, exit."""

    name: str
    function: int
    spec: ServeSpec
    log: str
    process: ProcessRef | None  # None: no identity recorded, so never signalled
    returncode: int | None = None

    @property
    def socket(self) -> Path:
        return self.spec.socket

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def alive(self) -> bool:
        """The very process egpu started still runs."""
        return self.process is not None and self.process.alive()

    def to_json(self) -> dict[str, Any]:
        identity = self.process.to_json() if self.process else {
            "pid": None, "started": None, "program": None}
        return {"name": self.name, "function": self.function, "spec": self.spec.to_json(),
                "log": self.log, **identity, "returncode": self.returncode}

    @classmethod
    def from_json(cls, data: object) -> ServerRecord:
        if not isinstance(data, dict):
            raise ValueError("a device server record is not an object")
        return cls(name=_get(data, "name", str), function=_get(data, "function", int),
                   spec=_spec(data), log=_get(data, "log", str),
                   process=ProcessRef.from_json(data),
                   returncode=_get(data, "returncode", int, optional=True))


@dataclass
class VmConfig:
    """What a VM was started with: the request and the exact command."""

    name: str
    arch: str
    cpus: int
    memory_mib: int
    accel: str
    gpu_path: str  # how the GPU reaches the VM: none / user / apple / vfio
    qemu: str  # the engine that runs it, e.g. "private QEMU 11.1.3"
    qemu_version: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    ssh_port: int | None = None
    selftest: bool = False
    image: str | None = None
    servers: list[ServerLaunch] = field(default_factory=list)  # device servers to start
    bind_functions: list[str] = field(default_factory=list)  # --bind: move these to vfio-pci
    host_guard: dict[str, Any] | None = None  # engine.safety.HostGuard: kept while QEMU runs
    gpu_bound_at_start: list[str] | None = None  # apple: functions claimed when it started
    display: dict[str, str] | None = None  # engine.display.DisplayPlan: device and UI
    ports: list[tuple[int, int]] = field(default_factory=list)  # run --port HOST:GUEST
    port_forwarding: bool = True  # forward guest listeners automatically (--no-port-forwarding)
    mounts: list[Share] = field(default_factory=list)  # --mount: shared folders (9p)
    ssh_user: str | None = None  # the login user the seed created (egpu ssh's default)
    ssh_key: str | None = None  # the private key whose public half the seed authorized
    seed_instance_id: str | None = None  # NoCloud instance-id, kept for the VM's lifetime
    docker: bool = False  # egpu docker up: the API on docker.sock, container ports mirrored

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["servers"] = [s.to_json() for s in self.servers]
        data["ports"] = [list(p) for p in self.ports]
        data["mounts"] = [m.to_json() for m in self.mounts]
        return data

    @classmethod
    def from_json(cls, data: object) -> VmConfig:
        """A config read back; ValueError names the first field that is missing or wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"expected an object, got {type(data).__name__}")
        env = _get(data, "env", dict, optional=True) or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("env: expected strings")
        argv = _str_list(data, "argv")
        if not argv:
            raise ValueError("argv: missing")
        if "gpu_path" in data:
            gpu_path, qemu = _get(data, "gpu_path", str), _get(data, "qemu", str)
        else:
            gpu_path, qemu = legacy_engine_field(_get(data, "engine", str))
        return cls(
            name=_get(data, "name", str), arch=_get(data, "arch", str),
            cpus=_get(data, "cpus", int), memory_mib=_get(data, "memory_mib", int),
            accel=_get(data, "accel", str), gpu_path=gpu_path, qemu=qemu,
            qemu_version=_get(data, "qemu_version", str), argv=argv, env=dict(env),
            ssh_port=_get(data, "ssh_port", int, optional=True),
            selftest=bool(_get(data, "selftest", bool, optional=True)),
            image=_get(data, "image", str, optional=True),
            servers=[ServerLaunch.from_json(s)
                     for s in _get(data, "servers", list, optional=True) or []],
            bind_functions=_str_list(data, "bind_functions"),
            host_guard=_get(data, "host_guard", dict, optional=True),
            gpu_bound_at_start=(_str_list(data, "gpu_bound_at_start")
                                if data.get("gpu_bound_at_start") is not None else None),
            display=_str_map(data, "display"),
            ports=_port_pairs(data, "ports"),
            port_forwarding=_get(data, "port_forwarding", bool, optional=True) is not False,
            mounts=[Share.from_json(m) for m in _get(data, "mounts", list, optional=True) or []],
            ssh_user=_get(data, "ssh_user", str, optional=True),
            ssh_key=_get(data, "ssh_key", str, optional=True),
            seed_instance_id=_get(data, "seed_instance_id", str, optional=True),
            docker=_get(data, "docker", bool, optional=True) is True,
        )


def legacy_engine_field(text: str) -> tuple[str, str]:
    """GPU path and QEMU text from the "engine" field older versions wrote: "user (QEMU ...)"."""
    path, _, rest = text.partition(" ")
    return path, rest.strip().removeprefix("(").removesuffix(")")


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
    def agent_socket(self) -> Path:
        return self.path / AGENT_SOCKET

    @property
    def serial_log(self) -> Path:
        return self.path / SERIAL_LOG

    @property
    def servers_dir(self) -> Path:
        return self.path / SERVERS_DIR

    @property
    def lock_path(self) -> Path:
        """Beside the directory, not in it: a run locks the name before the directory exists."""
        return self.path.with_name(f".{self.name}{LOCK_SUFFIX}")

    def exists(self) -> bool:
        """Whether this VM has a directory (a usable one or a broken one)."""
        return self.path.is_dir()

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold this VM's name for one command (run, rm): a second one is refused at once.

        The lock file is removed on release, so a failed start leaves nothing behind; a holder
        checks after locking that its file is still the one at the path (not one just removed).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for _ in range(LOCK_ATTEMPTS):
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ConflictError(
                    f"VM {self.name!r} is already starting (another egpu command holds it)",
                    hint=f"see 'egpu status {self.name}'") from None
            try:
                current = os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(fd).st_ino:
                break
            os.close(fd)  # the previous holder removed this file as we opened it: again
        else:
            raise ConflictError(f"VM {self.name!r} is busy (its lock keeps changing hands)")
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                self.lock_path.unlink()
            os.close(fd)  # closing the descriptor releases the lock

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
        """The recorded config; NotFoundError without a directory, VMError for a broken one."""
        try:
            return VmConfig.from_json(json.loads(self.file(CONFIG).read_text()))
        except FileNotFoundError:
            if not self.exists():
                raise NotFoundError(f"no VM named {self.name!r}", hint="see 'egpu list'") from None
            raise VMError(f"VM {self.name!r}: missing {CONFIG}") from None
        except (OSError, ValueError) as e:
            raise VMError(f"VM {self.name!r}: unreadable {CONFIG}: {e}") from e

    def write_config(self, config: VmConfig) -> None:
        write_json(self.file(CONFIG), config.to_json())

    def read_process(self, which: str) -> ProcessRef | None:
        """The process a pid file names (``PID START PROGRAM``), or None without full identity."""
        try:
            fields = self.file(which).read_text().split(maxsplit=2)
        except OSError:
            return None
        if len(fields) != PID_FILE_FIELDS or not fields[0].isdigit():
            return None
        try:
            started = float(fields[1])
        except ValueError:
            return None
        return ProcessRef.from_json(
            {"pid": int(fields[0]), "started": started, "program": fields[2].rstrip("\n")})

    def write_process(self, which: str, ref: ProcessRef) -> None:
        """Record a process by pid, start time and program: a reused pid is never taken for it."""
        write_text(self.file(which), f"{ref.pid} {ref.started!r} {ref.program}\n")

    def read_json(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.file(name).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def read_servers(self) -> list[ServerRecord]:
        """The device servers this run recorded; entries that do not parse are left out."""
        try:
            data = json.loads(self.file(SERVERS_RECORD).read_text())
        except (OSError, ValueError):
            return []
        records = []
        for entry in data if isinstance(data, list) else []:
            with contextlib.suppress(ValueError):
                records.append(ServerRecord.from_json(entry))
        return records

    def write_servers(self, records: Iterable[ServerRecord]) -> None:
        write_json(self.file(SERVERS_RECORD), [r.to_json() for r in records])

    def read_ports(self) -> PortTable | None:
        """The supervisor's port table, or None when there is none (yet) or it does not parse."""
        try:
            return PortTable.from_json(json.loads(self.file(PORTS_RECORD).read_text()))
        except (OSError, ValueError):
            return None

    def write_ports(self, table: PortTable) -> None:
        write_json(self.file(PORTS_RECORD), table.to_json())

    def clear_runtime(self) -> None:
        """Forget the last run (pids, sockets, exit record); keeps config, logs and disks."""
        for name in RUNTIME_FILES:
            self.file(name).unlink(missing_ok=True)
        shutil.rmtree(self.servers_dir, ignore_errors=True)

    def remove(self) -> None:
        """Delete this VM's directory and nothing outside it (a symlinked one: only the link)."""
        if self.path.is_symlink():
            self.path.unlink()
            return
        shutil.rmtree(self.path, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    """Write a file atomically through a temp file of this writer's own, then rename.

    Readers never see half a file, and two writers of one file never share a temp file.
    """
    atomic.write_bytes(path, text.encode())


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (see write_text)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def list_names(root: Path | None = None) -> list[str]:
    """Names of every VM directory, usable or broken (lock and temp files start with '.')."""
    base = root or dirs().vms
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if NAME_RE.fullmatch(p.name) and p.is_dir())
