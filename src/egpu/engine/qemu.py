"""Find the QEMU that will run, and probe what it can do on this host.

Search order: an explicit ``--qemu PATH``; a QEMU on PATH new enough for ``vfio-user-pci``;
otherwise the private engine egpu provisions into its cache (egpu.engine.provision). A private
engine is a Debian root unpacked without installing, so its programs run through the root's own
dynamic loader with its own library path (REFERENCE.md section 6).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from egpu.engine.argv import machine_type
from egpu.errors import EngineError, UsageError
from egpu.paths import dirs

MIN_VERSION = (10, 1, 0)  # first release with the vfio-user-pci client
ARCHES = ("aarch64", "x86_64")
PASSTHROUGH_DEVICES = ("vfio-user-pci", "vfio-pci", "vfio-apple-pci")
PROBE_TIMEOUT_S = 20
MARKER = ".egpu-engine.json"  # written last into a complete private root

Source = Literal["explicit", "path", "private"]

# How a private Debian root runs its programs: its loader and library dirs, by host machine.
_LOADERS = {
    "x86_64": ("usr/lib64/ld-linux-x86-64.so.2", "x86_64-linux-gnu"),
    "aarch64": ("usr/lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu"),
}
# QEMU 11.1's cpu-max for virt and q35 (QMP query-machines): for an engine that cannot say
FALLBACK_MAX_CPUS = {"aarch64": 512, "x86_64": 4096}
# QMP over stdin: the machine types and their cpu-max, then quit
QUERY_MACHINES = "".join(json.dumps({"execute": c}) + "\n"
                         for c in ("qmp_capabilities", "query-machines", "quit"))
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")


def host_machine() -> str:
    """The host CPU architecture in QEMU's naming (x86_64, aarch64)."""
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def host_is_virtual(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this host is itself a virtual machine (the CPU's hypervisor flag)."""
    try:
        text = cpuinfo.read_text(errors="replace")
    except OSError:
        return False
    return any(line.startswith("flags") and " hypervisor" in line for line in text.splitlines())


def check_arch(arch: str) -> str:
    """Validate a guest architecture name."""
    if arch not in ARCHES:
        raise UsageError(f"unknown architecture {arch!r}; use one of: {', '.join(ARCHES)}")
    return arch


def parse_version(text: str) -> tuple[int, int, int] | None:
    """Parse ``QEMU emulator version X.Y.Z`` into a tuple."""
    m = _VERSION_RE.search(text)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)


@dataclass(frozen=True)
class Engine:
    """A runnable QEMU: where its programs are and how to start them."""

    source: Source
    bindir: Path
    root: Path | None = None  # private Debian root, run through its own loader
    datadirs: tuple[Path, ...] = ()  # firmware and ROM search path (-L, in order)

    def program(self, name: str) -> list[str]:
        """The argv prefix that runs one of the engine's programs."""
        exe = self.bindir / name
        if self.root is None:
            return [str(exe)]
        loader, triplet = _LOADERS[host_machine()]
        libs = f"{self.root}/usr/lib/{triplet}:{self.root}/lib/{triplet}"
        return [str(self.root / loader), "--library-path", libs, str(exe)]

    def qemu(self, arch: str) -> list[str]:
        """The argv prefix for ``qemu-system-<arch>``, data dir included."""
        argv = self.program(f"qemu-system-{check_arch(arch)}")
        for d in self.datadirs:
            argv += ["-L", str(d)]
        return argv

    def qemu_img(self) -> list[str]:
        """The argv prefix for ``qemu-img``."""
        return self.program("qemu-img")

    def env(self) -> dict[str, str]:
        """Extra environment its programs need (module dir of a private root)."""
        if self.root is None:
            return {}
        _, triplet = _LOADERS[host_machine()]
        return {"QEMU_MODULE_DIR": str(self.root / "usr/lib" / triplet / "qemu")}

    def has(self, arch: str) -> bool:
        return (self.bindir / f"qemu-system-{arch}").exists()

    def firmware_dirs(self) -> list[Path]:
        """Where UEFI firmware files of this engine live."""
        base = self.root / "usr/share" if self.root else Path("/usr/share")
        return [base / "AAVMF", base / "OVMF", base / "qemu", base / "qemu-efi-aarch64"]


@dataclass(frozen=True)
class EngineInfo:
    """What a probe of an engine found."""

    engine: Engine
    version: tuple[int, int, int]
    arches: tuple[str, ...]
    accelerators: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per arch
    devices: dict[str, tuple[str, ...]] = field(default_factory=dict)  # per arch, of ours
    max_cpus: dict[str, int] = field(default_factory=dict)  # per arch, of its machine type

    def cpu_limit(self, arch: str) -> int:
        """The most vCPUs the machine type egpu uses for ``arch`` takes in this engine."""
        return self.max_cpus.get(arch, FALLBACK_MAX_CPUS[arch])

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    def to_json(self) -> dict[str, object]:
        e = self.engine
        return {
            "source": e.source,
            "version": self.version_text,
            "path": str(e.bindir),
            "root": str(e.root) if e.root else None,
            "arches": list(self.arches),
            "accelerators": {a: list(v) for a, v in self.accelerators.items()},
            "devices": {a: list(v) for a, v in self.devices.items()},
            "max_cpus": {a: self.cpu_limit(a) for a in self.arches},
            "command": {a: e.qemu(a) for a in self.arches},
        }


def _run(argv: Sequence[str], env: dict[str, str], stdin: str = "") -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=PROBE_TIMEOUT_S,
            env={**os.environ, **env}, input=stdin,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise EngineError(f"cannot run {argv[-1] if argv else 'qemu'}: {e}") from e
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise EngineError(f"{' '.join(argv[-3:])} failed: {last}")
    return proc.stdout


def host_accelerators(arch: str) -> set[str]:
    """Accelerators this host could offer a guest of ``arch`` (before asking QEMU)."""
    usable = {"tcg"}
    same = arch == host_machine()
    if same and platform.system() == "Linux" and os.access("/dev/kvm", os.R_OK | os.W_OK):
        usable.add("kvm")
    if same and platform.system() == "Darwin":
        usable.add("hvf")
    return usable


def parse_help_names(text: str, prefix: str = "") -> set[str]:
    """Names from ``-accel help`` (one per line) or ``-device help`` (``name "x"`` entries)."""
    if prefix:
        return set(re.findall(rf'{prefix}"([^"]+)"', text))
    return {ln.strip() for ln in text.splitlines()[1:] if ln.strip() and " " not in ln.strip()}


def parse_max_cpus(text: str, machine: str) -> int | None:
    """``cpu-max`` of ``machine`` (a name or an alias) in QMP replies, one JSON per line."""
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        machines = doc.get("return") if isinstance(doc, dict) else None
        if not isinstance(machines, list):
            continue
        for m in machines:
            if isinstance(m, dict) and machine in (m.get("name"), m.get("alias")):
                n = m.get("cpu-max")
                return n if type(n) is int and n >= 1 else None
    return None


def probe(engine: Engine) -> EngineInfo:
    """Ask the engine its version, and per architecture its accelerators and our devices."""
    arches = tuple(a for a in ARCHES if engine.has(a))
    if not arches:
        raise EngineError(f"no qemu-system-aarch64 or qemu-system-x86_64 in {engine.bindir}")
    env = engine.env()
    version = parse_version(_run([*engine.qemu(arches[0]), "--version"], env))
    if version is None:
        raise EngineError(f"{engine.bindir}: not a QEMU (no version)")
    accels: dict[str, tuple[str, ...]] = {}
    devices: dict[str, tuple[str, ...]] = {}
    max_cpus: dict[str, int] = {}
    for arch in arches:
        base = [*engine.qemu(arch), "-machine", "none"]
        compiled = parse_help_names(_run([*base, "-accel", "help"], env))
        accels[arch] = tuple(sorted(compiled & host_accelerators(arch)))
        names = parse_help_names(_run([*base, "-device", "help"], env), prefix="name ")
        devices[arch] = tuple(d for d in PASSTHROUGH_DEVICES if d in names)
        replies = _run([*base, "-nodefaults", "-display", "none", "-qmp", "stdio"], env,
                       stdin=QUERY_MACHINES)
        most = parse_max_cpus(replies, machine_type(arch))
        if most is not None:  # else cpu_limit falls back, and QEMU itself has the last word
            max_cpus[arch] = most
    return EngineInfo(engine, version, arches, accels, devices, max_cpus)


def explicit_engine(path: str) -> Engine:
    """An engine from ``--qemu PATH`` (a qemu-system binary or the directory holding it)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return Engine("explicit", p.absolute())
    if not p.exists():
        raise UsageError(f"--qemu {path}: no such file")
    if not p.name.startswith("qemu-system-"):
        raise UsageError(f"--qemu {path}: expected a qemu-system-* program")
    return Engine("explicit", p.absolute().parent)


def path_engine() -> Engine | None:
    """A QEMU on PATH, if any (its version is checked by the caller)."""
    for arch in ARCHES:
        found = shutil.which(f"qemu-system-{arch}")
        if found:
            return Engine("path", Path(found).parent)
    return None


def engine_root() -> Path:
    """Where the private engine's Debian root lives."""
    return dirs().engine / "root"


def private_engine() -> Engine | None:
    """The provisioned engine, if a complete one is in the cache."""
    root = engine_root()
    if not (root / MARKER).exists():
        return None
    # Debian's QEMU is built with this firmware path; -L replaces it, so name every part
    datadirs = tuple(root / d for d in ("usr/share/qemu", "usr/share/seabios", "usr/lib/ipxe/qemu"))
    return Engine("private", root / "usr/bin", root=root, datadirs=datadirs)


def placeholder_info() -> EngineInfo:
    """A stand-in for when no engine exists: QEMU on PATH by name, TCG, our devices assumed.

    Lets ``run --dry-run`` show the command on any host without installing anything.
    """
    engine = Engine("path", Path("/usr/bin"))
    return EngineInfo(
        engine, MIN_VERSION, ARCHES,
        {a: ("tcg",) for a in ARCHES}, {a: PASSTHROUGH_DEVICES for a in ARCHES},
    )


def find_engine(qemu: str | None = None) -> Engine:
    """The engine that would run (without provisioning); EngineError when there is none."""
    return find_engine_info(qemu).engine


def find_engine_info(qemu: str | None = None) -> EngineInfo:
    """Resolve and probe the engine: ``--qemu``, then QEMU on PATH if new enough, then private."""
    minimum = ".".join(map(str, MIN_VERSION))
    if qemu:
        info = probe(explicit_engine(qemu))
        if info.version < MIN_VERSION:
            raise EngineError(f"--qemu {qemu} is QEMU {info.version_text}; egpu needs >= {minimum}")
        return info
    on_path = path_engine()
    if on_path is not None:
        try:
            found: EngineInfo | None = probe(on_path)
        except EngineError:
            found = None
        if found is not None and found.version >= MIN_VERSION:
            return found
    private = private_engine()
    if private is None:
        raise EngineError(
            f"no usable QEMU (>= {minimum}) found",
            hint="run 'egpu engine --provision' or pass --qemu PATH",
        )
    return probe(private)
