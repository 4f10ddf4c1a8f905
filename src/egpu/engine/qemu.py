"""Find the QEMU that will run, and probe what it can do on this host.

Search order: an explicit ``--qemu PATH``; a QEMU on PATH new enough for ``vfio-user-pci``;
otherwise the private engine egpu provisions into its cache (egpu.engine.provision). A private
engine is a Debian root unpacked without installing, so its programs run through the root's own
dynamic loader with its own library path (``ld.so --library-path``, ld.so(8)), so no host
library is mixed in and nothing needs installing.

GPU path ``apple`` needs a QEMU with ``vfio-apple-pci``, which Mac users have inside the
scottjg/qemu-vfio-apple host app (contrib/apple-vfio/scripts/embed-qemu.sh):
``X.app/Contents/MacOS/qemu-system-aarch64`` and ``qemu-img``, firmware and data in
``Contents/Resources/share/qemu``, pci.ids in ``Contents/Resources``. Then the app bundles in
/Applications and ~/Applications come before PATH, and a QEMU without the device (Homebrew's,
say) is skipped with a notice, never chosen. ``--qemu`` also takes a ``.app`` directory.
"""

from __future__ import annotations

import json
import os
import platform
import plistlib
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from xml.parsers.expat import ExpatError

from egpu.engine.argv import machine_type
from egpu.errors import EngineError, UsageError
from egpu.paths import dirs
from egpu.process import run_tool

MIN_VERSION = (10, 1, 0)  # first release with the vfio-user-pci client
ARCHES = ("aarch64", "x86_64")
PASSTHROUGH_DEVICES = ("vfio-user-pci", "vfio-pci", "vfio-apple-pci")
PROBE_TIMEOUT_S = 20
MARKER = ".egpu-engine.json"  # written last into a complete private root
APPLE_DEVICE = "vfio-apple-pci"
APPLE_ARCH = "aarch64"

Source = Literal["explicit", "app", "path", "private"]

# The host app bundle's layout, as contrib/apple-vfio/scripts/embed-qemu.sh builds it.
APP_SUFFIX = ".app"
APP_BINDIR = Path("Contents/MacOS")
APP_DATADIR = Path("Contents/Resources/share/qemu")
APP_PCI_IDS = Path("Contents/Resources/pci.ids")
APP_INFO_PLIST = Path("Contents/Info.plist")
MAC_APP_DIRS = (Path("/Applications"), Path("~/Applications"))

# How a private Debian root runs its programs: its loader and library dirs, by host machine.
_LOADERS = {
    "x86_64": ("usr/lib64/ld-linux-x86-64.so.2", "x86_64-linux-gnu"),
    "aarch64": ("usr/lib/ld-linux-aarch64.so.1", "aarch64-linux-gnu"),
}
# Library dirs of a private root, in search order; the UI root's after the engine's own.
# PulseAudio's private libraries sit in a subdirectory that libpulse finds through its RUNPATH,
# which names the host's /usr, so that one is named here.
_LIB_DIRS = ("usr/lib/{triplet}", "lib/{triplet}")
_UI_LIB_DIRS = (*_LIB_DIRS, "usr/lib/{triplet}/pulseaudio")
# QEMU 11.1's cpu-max for virt and q35 (QMP query-machines): for an engine that cannot say
FALLBACK_MAX_CPUS = {"aarch64": 512, "x86_64": 4096}
# QMP over stdin: the machine types and their cpu-max, then quit
QUERY_MACHINES = "".join(json.dumps({"execute": c}) + "\n"
                         for c in ("qmp_capabilities", "query-machines", "quit"))
_VERSION_RE = re.compile(r"version (\d+)\.(\d+)(?:\.(\d+))?")
# One line of ``-device NAME,help``: ``  name=<type>   - description (default: value)``.
_PROPERTY_RE = re.compile(r"^\s+([A-Za-z0-9_.-]+)=<([^>]*)>(.*)$")
_DEFAULT_RE = re.compile(r"\(default: ([^()]*)\)\s*$")


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
    bundle: Path | None = None  # the host app (``X.app``) this QEMU came in
    # a private root's window UIs (Debian's qemu-system-gui with its closure): an add-on root
    # unpacked beside the engine only when a VM asks for a window (egpu.engine.provision)
    ui_root: Path | None = None

    @property
    def location(self) -> Path:
        """What a user would name: the app bundle, the private root, or the program dir."""
        return self.bundle or self.root or self.bindir

    def program(self, name: str) -> list[str]:
        """The argv prefix that runs one of the engine's programs."""
        exe = self.bindir / name
        if self.root is None:
            return [str(exe)]
        loader, triplet = _LOADERS[host_machine()]
        lib_dirs = [f"{self.root}/{d.format(triplet=triplet)}" for d in _LIB_DIRS]
        if self.ui_root is not None:
            lib_dirs += [f"{self.ui_root}/{d.format(triplet=triplet)}" for d in _UI_LIB_DIRS]
        libs = ":".join(lib_dirs)
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
        # the UI root carries every module of its QEMU build (qemu-system-common comes along),
        # so one module dir serves: QEMU reads a single QEMU_MODULE_DIR
        modules = self.ui_root or self.root
        return {"QEMU_MODULE_DIR": str(modules / "usr/lib" / triplet / "qemu")}

    def has(self, arch: str) -> bool:
        return (self.bindir / f"qemu-system-{arch}").exists()

    def firmware_dirs(self) -> list[Path]:
        """Where UEFI firmware files of this engine live."""
        if self.bundle is not None:
            return [self.bundle / APP_DATADIR]
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
    # properties of the passthrough devices that vary between builds (vfio-apple-pci), by name
    properties: dict[str, tuple[DeviceProperty, ...]] = field(default_factory=dict)
    notices: tuple[str, ...] = ()  # candidates skipped on the way here
    max_cpus: dict[str, int] = field(default_factory=dict)  # per arch, of its machine type

    def cpu_limit(self, arch: str) -> int:
        """The most vCPUs the machine type egpu uses for ``arch`` takes in this engine."""
        return self.max_cpus.get(arch, FALLBACK_MAX_CPUS[arch])

    @property
    def version_text(self) -> str:
        return ".".join(map(str, self.version))

    @property
    def label(self) -> str:
        """The build, for messages: ``QEMU 10.2.0 (app /Applications/X.app)``."""
        return f"QEMU {self.version_text} ({self.engine.source} {self.engine.location})"

    def has_device(self, device: str, arch: str = APPLE_ARCH) -> bool:
        return device in self.devices.get(arch, ())

    def property_names(self, device: str) -> frozenset[str]:
        return frozenset(p.name for p in self.properties.get(device, ()))

    def to_json(self) -> dict[str, object]:
        e = self.engine
        return {
            "source": e.source,
            "version": self.version_text,
            "path": str(e.bindir),
            "root": str(e.root) if e.root else None,
            "bundle": str(e.bundle) if e.bundle else None,
            "app_bundle_id": app_bundle_id(e.bundle) if e.bundle else None,
            "pci_ids": str(e.bundle / APP_PCI_IDS) if e.bundle else None,
            "arches": list(self.arches),
            "accelerators": {a: list(v) for a, v in self.accelerators.items()},
            "devices": {a: list(v) for a, v in self.devices.items()},
            "properties": {d: [p.to_json() for p in v] for d, v in self.properties.items()},
            "max_cpus": {a: self.cpu_limit(a) for a in self.arches},
            "command": {a: e.qemu(a) for a in self.arches},
        }


@dataclass(frozen=True)
class DeviceProperty:
    """One property of a QEMU device, as ``-device NAME,help`` lists it."""

    name: str
    type: str
    default: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "type": self.type, "default": self.default}


def parse_device_properties(text: str) -> tuple[DeviceProperty, ...]:
    """The properties in ``-device NAME,help`` output, sorted by name."""
    out: dict[str, DeviceProperty] = {}
    for line in text.splitlines():
        m = _PROPERTY_RE.match(line)
        if m is None:
            continue
        d = _DEFAULT_RE.search(m[3])
        out[m[1]] = DeviceProperty(m[1], m[2], d[1].strip() if d else None)
    return tuple(out[k] for k in sorted(out))


def _run(argv: Sequence[str], env: dict[str, str], stdin: str = "") -> str:
    return run_tool(
        argv, lambda why: EngineError(f"{' '.join(argv[-3:])} failed: {why}"),
        timeout=PROBE_TIMEOUT_S, env=env, stdin=stdin,
    )


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
    properties: dict[str, tuple[DeviceProperty, ...]] = {}
    if APPLE_DEVICE in devices.get(APPLE_ARCH, ()):
        # its options changed between launcher versions (dma-companion's default flipped,
        # host-root and dma-bounce-size arrived): the command is built from what this has
        text = _run([*engine.qemu(APPLE_ARCH), "-machine", "none", "-device",
                     f"{APPLE_DEVICE},help"], env)
        properties[APPLE_DEVICE] = parse_device_properties(text)
    return EngineInfo(engine, version, arches, accels, devices, properties,
                      max_cpus=max_cpus)


def app_engine(bundle: Path, source: Source = "app") -> Engine:
    """The QEMU embedded in a host app bundle; UsageError when the bundle has none."""
    bundle = bundle.expanduser().absolute()
    if not (bundle / APP_BINDIR / f"qemu-system-{APPLE_ARCH}").exists():
        raise UsageError(f"{bundle}: no {APP_BINDIR}/qemu-system-{APPLE_ARCH} in this app bundle")
    return Engine(source, bundle / APP_BINDIR, datadirs=(bundle / APP_DATADIR,), bundle=bundle)


def app_bundle_id(bundle: Path) -> str | None:
    """The app's ``CFBundleIdentifier`` (its driver extension is ``<id>.VFIOUserPCIDriver``)."""
    try:
        with (bundle / APP_INFO_PLIST).open("rb") as f:
            doc = plistlib.load(f)
    except (OSError, plistlib.InvalidFileException, ValueError, ExpatError):
        return None
    ident = doc.get("CFBundleIdentifier") if isinstance(doc, dict) else None
    return ident if isinstance(ident, str) and ident else None


def app_bundles(dirs_: Sequence[Path] | None = None) -> list[Path]:
    """App bundles carrying a QEMU, in the Mac's application folders (sorted by name)."""
    if dirs_ is None:
        dirs_ = MAC_APP_DIRS if platform.system() == "Darwin" else ()
    found: list[Path] = []
    for d in dirs_:
        d = d.expanduser()
        try:
            apps = sorted(d.glob(f"*{APP_SUFFIX}"))
        except OSError:
            continue
        found += [a for a in apps if (a / APP_BINDIR / f"qemu-system-{APPLE_ARCH}").exists()]
    return found


def explicit_engine(path: str) -> Engine:
    """An engine from ``--qemu PATH`` (a qemu-system binary, the directory holding it, or a
    host app bundle ``X.app``)."""
    p = Path(path).expanduser()
    if p.is_dir() and p.name.endswith(APP_SUFFIX):
        return app_engine(p, "explicit")
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
    # the current launcher's vfio-apple-pci: every option egpu may pass
    apple = tuple(DeviceProperty(n, t, d) for n, t, d in (
        ("addr", "int32", "-1"), ("dma-bounce-size", "size", None), ("dma-companion", "bool", None),
        ("host", "str", None), ("host-root", "str", None), ("multifunction", "bool", "off"),
        ("rombar", "uint32", "1"),
    ))
    return EngineInfo(
        engine, MIN_VERSION, ARCHES,
        {a: ("tcg",) for a in ARCHES}, {a: PASSTHROUGH_DEVICES for a in ARCHES},
        {APPLE_DEVICE: apple},
    )


def find_engine(qemu: str | None = None) -> Engine:
    """The engine that would run (without provisioning); EngineError when there is none."""
    return find_engine_info(qemu).engine


@dataclass(frozen=True)
class Candidate:
    """One QEMU egpu looked at, what its probe found, and why it was or was not picked."""

    engine: Engine
    info: EngineInfo | None
    chosen: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        i = self.info
        return {
            "source": self.engine.source,
            "path": str(self.engine.location),
            "version": i.version_text if i else None,
            "has_vfio_apple_pci": i.has_device(APPLE_DEVICE) if i else None,
            "properties": sorted(i.property_names(APPLE_DEVICE)) if i else [],
            "chosen": self.chosen,
            "reason": self.reason,
        }


def _candidate_engines(need: str | None, apps: Sequence[Path] | None) -> list[Engine]:
    found: list[Engine] = []
    if need == APPLE_DEVICE or platform.system() == "Darwin":
        for bundle in app_bundles(apps):
            found.append(app_engine(bundle))
    on_path = path_engine()
    if on_path is not None:
        found.append(on_path)
    private = private_engine()
    if private is not None:
        found.append(private)
    return found


def _judge(info: EngineInfo, need: str | None) -> str | None:
    """Why an engine does not fit (None: it does)."""
    if need is not None:
        if not any(need in v for v in info.devices.values()):
            return f"QEMU {info.version_text} has no {need}"
        return None
    if info.version < MIN_VERSION:
        return f"QEMU {info.version_text} is older than {'.'.join(map(str, MIN_VERSION))}"
    return None


def survey_engines(
    qemu: str | None = None, need: str | None = None, *, exhaustive: bool = False,
    apps: Sequence[Path] | None = None,
) -> list[Candidate]:
    """Every engine considered, in search order, with its verdict; stops at the first fit
    unless ``exhaustive``. ``need``: a device it must have (else: new enough for vfio-user)."""
    engines = [explicit_engine(qemu)] if qemu else _candidate_engines(need, apps)
    out: list[Candidate] = []
    picked = False
    for engine in engines:
        if picked and not exhaustive:
            break
        try:
            info: EngineInfo | None = probe(engine)
        except EngineError as e:
            out.append(Candidate(engine, None, False, f"does not run: {e}"))
            continue
        assert info is not None
        why = _judge(info, need)
        if why is not None:
            out.append(Candidate(engine, info, False, why))
        elif picked:
            out.append(Candidate(engine, info, False, "fits, but an earlier candidate was picked"))
        else:
            picked = True
            out.append(Candidate(engine, info, True,
                                 f"has {need}" if need else "first that fits"))
    return out


def find_engine_info(qemu: str | None = None, need: str | None = None) -> EngineInfo:
    """Resolve and probe the engine: ``--qemu``, then (for ``need=vfio-apple-pci``) the host
    apps, then QEMU on PATH if it fits, then the private engine."""
    return choose_engine(survey_engines(qemu, need), qemu, need)


def choose_engine(
    candidates: Sequence[Candidate], qemu: str | None = None, need: str | None = None
) -> EngineInfo:
    """The chosen candidate's probe, with notices for the ones skipped; EngineError if none."""
    minimum = ".".join(map(str, MIN_VERSION))
    # a QEMU without the device the GPU path needs (Homebrew's, on a Mac) is worth a word;
    # an old QEMU on PATH passed over for the private engine is routine
    skipped = tuple(
        f"skipping {c.engine.source} QEMU at {c.engine.location}: {c.reason}"
        for c in candidates
        if need and not c.chosen and c.info is not None and _judge(c.info, need)
    )
    chosen = next((c for c in candidates if c.chosen), None)
    if chosen is not None and chosen.info is not None:
        return replace(chosen.info, notices=skipped)
    if qemu:
        c = candidates[0]
        if c.info is None:
            raise EngineError(f"--qemu {qemu}: {c.reason}")
        if need:
            raise EngineError(f"--qemu {qemu} is {c.info.label}, which has no {need}",
                              hint="pass the qemu-vfio-apple host app (--qemu PATH.app)")
        raise EngineError(f"--qemu {qemu} is QEMU {c.info.version_text}; egpu needs >= {minimum}")
    tried = "; ".join(f"{c.engine.location}: {c.reason}" for c in candidates) or "none found"
    if need == APPLE_DEVICE:
        raise EngineError(
            f"no QEMU with {APPLE_DEVICE} found ({tried})",
            hint="install the qemu-vfio-apple host app in /Applications or pass --qemu PATH.app",
        )
    raise EngineError(
        f"no usable QEMU (>= {minimum}) found" + (f" ({tried})" if candidates else ""),
        hint="run 'egpu engine --provision' or pass --qemu PATH",
    )
