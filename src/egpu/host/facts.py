"""Gather what discovery and doctor need: the thin I/O edge over the pure parsers.

Live mode runs ``ioreg`` on macOS and reads ``/sys`` on Linux; a saved dump (``--ioreg FILE``,
``--sysfs DIR``, ``--systemextensions FILE``) replaces the live source so a bug report's dumps
can be replayed anywhere, with ``devices``, ``doctor`` and ``run`` alike.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import psutil

from egpu.errors import HostError
from egpu.host.device import DEFAULT_DEXT_BUNDLE_ID, DEXT_NAME, PciDevice
from egpu.host.ioreg import parse_ioreg, read_live_ioreg
from egpu.host.pciids import PciIds, system_pci_ids
from egpu.host.sysext import DextState, parse_systemextensions, read_live_systemextensions
from egpu.host.sysfs import SysfsSnapshot, ThunderboltDevice, read_sysfs

HostPlatform = Literal["macos", "linux", "other"]
LIVE_SYSFS = Path("/sys")
LIVE_DEV = Path("/dev")
MODULES_DIR = Path("/lib/modules")
VFIO_DIR = "vfio"
VFIO_CONTAINER = "vfio"  # /dev/vfio/vfio, the container every group joins
MAX_DUMP_BYTES = 256 * 1024 * 1024
DEXT_BUNDLE_ENV = "EGPU_DEXT_BUNDLE_ID"


def dext_bundle_id(app_bundle_id: str | None = None) -> str:
    """The extension's bundle id: ``$EGPU_DEXT_BUNDLE_ID``, else ``<app id>.VFIOUserPCIDriver``
    as the host app names it (each source build has its own app id), else the default app id's
    (scottjg/qemu-vfio-apple's)."""
    env = os.environ.get(DEXT_BUNDLE_ENV)
    if env:
        return env
    if app_bundle_id:
        return f"{app_bundle_id}.{DEXT_NAME}"
    return DEFAULT_DEXT_BUNDLE_ID


@dataclass(frozen=True)
class HostSource:
    """Where discovery reads from; every field None means the live host."""

    ioreg: Path | None = None
    sysfs: Path | None = None
    systemextensions: Path | None = None
    dev: Path | None = None  # root holding vfio/ (live: /dev); None skips device-node checks
    bundle_id: str = field(default_factory=lambda: dext_bundle_id())

    @property
    def is_dump(self) -> bool:
        return self.ioreg is not None or self.sysfs is not None

    def describe(self) -> str:
        if self.ioreg is not None:
            return f"registry dump {self.ioreg}"
        if self.sysfs is not None:
            return f"sysfs tree {self.sysfs}"
        return "this host"


@dataclass(frozen=True)
class Discovery:
    """The PCI functions a source shows, and on Linux what sysfs says besides."""

    platform: HostPlatform
    devices: tuple[PciDevice, ...]
    sysfs: SysfsSnapshot | None = None
    origin: str = "this host"

    def to_json(self) -> list[dict[str, Any]]:
        return [d.to_json() for d in self.devices]


@dataclass(frozen=True)
class DevVfio:
    """Device nodes under /dev/vfio: the container and the groups, and whether we may open them."""

    container_exists: bool
    container_access: bool
    groups: dict[int, bool]  # group number -> read/write access


@dataclass(frozen=True)
class EngineCandidateFacts:
    """One QEMU the engine layer looked at, as plain values."""

    source: str
    path: str
    version: str | None
    apple_properties: tuple[str, ...] | None  # vfio-apple-pci's options; None: no such device
    chosen: bool
    reason: str

    def to_json(self) -> dict[str, object]:
        return {
            "source": self.source, "path": self.path, "version": self.version,
            "has_vfio_apple_pci": self.apple_properties is not None,
            "properties": list(self.apple_properties or ()),
            "chosen": self.chosen, "reason": self.reason,
        }


@dataclass(frozen=True)
class EngineFacts:
    """What the engine layer found, as plain values (the host layer cannot import it)."""

    found: bool
    version: str | None = None
    source: str | None = None
    devices: tuple[str, ...] = ()  # passthrough devices it has: vfio-apple-pci, vfio-pci, ...
    accelerators: tuple[str, ...] = ()
    error: str | None = None
    candidates: tuple[EngineCandidateFacts, ...] = ()
    app_bundle_id: str | None = None  # the host app's CFBundleIdentifier (its QEMU's bundle)


@dataclass(frozen=True)
class GuestDriverFacts:
    """The guest-driver rule applied to the guest egpu run would boot (decided by the caller)."""

    label: str  # "the built-in guest", "image REF", ...
    problem: str | None  # why it cannot drive the eGPU; None: it can


@dataclass(frozen=True)
class HostFacts:
    """Everything the doctor checks look at; built by ``gather_facts``, or by tests directly."""

    platform: HostPlatform
    system: str  # "Darwin 24.1.0", "Linux 6.1.0", ...
    machine: str  # arm64, x86_64, ...
    origin: str = "this host"
    from_dump: bool = False
    host_memory: int | None = None
    guest_memory: int | None = None
    devices: tuple[PciDevice, ...] = ()
    dext: DextState | None = None
    iommu_enabled: bool | None = None
    vfio_pci_loaded: bool | None = None
    vfio_pci_available: bool | None = None  # module on disk or built in
    dev_vfio: DevVfio | None = None
    thunderbolt: tuple[ThunderboltDevice, ...] = ()
    engine: EngineFacts | None = None
    dext_bundle_id: str | None = None  # the bundle id discovery matched the extension by
    guest: GuestDriverFacts | None = None


def live_platform() -> HostPlatform:
    s = platform.system()
    return "macos" if s == "Darwin" else "linux" if s == "Linux" else "other"


def _read_dump(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_DUMP_BYTES + 1)
    except OSError as e:
        raise HostError(f"cannot read {what} {path}: {e.strerror or e}") from e
    if len(data) > MAX_DUMP_BYTES:
        raise HostError(f"{path}: too large for a {what}")
    return data


def describe(devices: Iterable[PciDevice], ids: PciIds) -> tuple[PciDevice, ...]:
    """The devices with their pci.ids descriptions filled in."""
    return tuple(replace(d, description=ids.describe(d.vendor_id, d.device_id)) for d in devices)


def discover(source: HostSource, ids: PciIds | None = None) -> Discovery:
    """Read the devices from the dump given, or from this host, with pci.ids descriptions."""
    found = _discover(source)
    table = ids if ids is not None else system_pci_ids()
    return replace(found, devices=describe(found.devices, table))


def _discover(source: HostSource) -> Discovery:
    if source.ioreg is not None and source.sysfs is not None:
        raise HostError("give --ioreg or --sysfs, not both")
    if source.ioreg is not None:
        data = _read_dump(source.ioreg, "registry dump")
        devs = parse_ioreg(data, bundle_id=source.bundle_id, origin=str(source.ioreg))
        return Discovery("macos", tuple(devs), origin=source.describe())
    if source.sysfs is not None:
        if not source.sysfs.is_dir():
            raise HostError(f"--sysfs {source.sysfs}: not a directory")
        snap = read_sysfs(source.sysfs)
        return Discovery("linux", snap.devices, snap, origin=source.describe())
    plat = live_platform()
    if plat == "macos":
        devs = parse_ioreg(read_live_ioreg(), bundle_id=source.bundle_id, origin="ioreg")
        return Discovery("macos", tuple(devs))
    if plat == "linux":
        snap = read_sysfs(LIVE_SYSFS)
        return Discovery("linux", snap.devices, snap)
    raise HostError(
        f"device discovery does not support {platform.system()}; use --ioreg or --sysfs"
    )


def dext_state(source: HostSource) -> DextState | None:
    """The DriverKit extension's state: from the saved listing, or live on macOS, else None."""
    if source.systemextensions is not None:
        text = _read_dump(source.systemextensions, "systemextensionsctl listing")
        return parse_systemextensions(
            text.decode("utf-8", "replace"), source.bundle_id, origin=str(source.systemextensions)
        )
    if live_platform() == "macos" and not source.is_dump:
        return parse_systemextensions(read_live_systemextensions(), source.bundle_id)
    return None


def read_dev_vfio(dev: Path) -> DevVfio:
    """Which /dev/vfio nodes exist and which this user may open read/write."""
    base = dev / VFIO_DIR
    container = base / VFIO_CONTAINER
    groups: dict[int, bool] = {}
    if base.is_dir():
        for node in base.iterdir():
            if node.name.isdigit():
                groups[int(node.name)] = os.access(node, os.R_OK | os.W_OK)
    return DevVfio(
        container_exists=container.exists(),
        container_access=container.exists() and os.access(container, os.R_OK | os.W_OK),
        groups=groups,
    )


def vfio_pci_module_available(modules: Path = MODULES_DIR, release: str | None = None) -> bool:
    """True when the running kernel has vfio-pci built in or as a module on disk."""
    kdir = modules / (release or platform.release())
    for index in ("modules.builtin", "modules.dep"):
        try:
            text = (kdir / index).read_text(errors="replace")
        except OSError:
            continue
        if "/vfio-pci.ko" in text or "/vfio_pci.ko" in text:
            return True
    return False


def gather_facts(
    source: HostSource, *, engine: EngineFacts | None = None, guest_memory: int | None = None
) -> HostFacts:
    """Collect HostFacts from the source (live host or dumps) plus what the caller knows."""
    found = discover(source)
    live = live_platform()
    same_host = not source.is_dump or found.platform == live
    system = f"{platform.system()} {platform.release()}" if same_host else (
        "macOS (from a registry dump)" if found.platform == "macos" else "Linux (from a sysfs tree)"
    )
    machine = platform.machine() if same_host else "unknown"
    snap = found.sysfs
    linux_live = found.platform == "linux" and not source.is_dump
    dev_root = source.dev if source.dev is not None else (LIVE_DEV if linux_live else None)
    return HostFacts(
        platform=found.platform,
        system=system,
        machine=machine,
        origin=found.origin,
        from_dump=source.is_dump,
        host_memory=int(psutil.virtual_memory().total) if same_host else None,
        guest_memory=guest_memory,
        devices=found.devices,
        dext=dext_state(source) if found.platform == "macos" else None,
        iommu_enabled=snap.iommu_enabled if snap else None,
        vfio_pci_loaded=snap.vfio_pci_loaded if snap else None,
        vfio_pci_available=vfio_pci_module_available() if linux_live else None,
        dev_vfio=read_dev_vfio(dev_root) if dev_root is not None else None,
        thunderbolt=snap.thunderbolt if snap else (),
        engine=engine,
        dext_bundle_id=source.bundle_id if found.platform == "macos" else None,
    )
