"""Linux discovery: read a sysfs tree (the live ``/sys`` or a copy given with ``--sysfs``).

Per function, under ``bus/pci/devices/DDDD:BB:DD.F/``: ``vendor``, ``device``, ``class`` (hex
text), the ``driver`` and ``iommu_group`` symlinks, ``current_link_speed`` / ``max_link_speed``
("8.0 GT/s PCIe"), ``current_link_width`` / ``max_link_width``, ``resource`` (one
"start end flags" line per BAR), ``removable`` ("removable" behind Thunderbolt/USB4). IOMMU
groups are ``kernel/iommu_groups/N/devices/*``; Thunderbolt devices are
``bus/thunderbolt/devices/*`` with ``authorized``, ``rx_speed`` ("20.0 Gb/s" per lane) and names.
Every file is untrusted: unparsable content is a one-line HostError naming the file.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from egpu.errors import HostError
from egpu.host.address import PciAddress, full_address
from egpu.host.device import CLASS_BRIDGE, VFIO_PCI_DRIVER, PciDevice, PcieLink, readiness

PCI_DEVICES = Path("bus/pci/devices")
PCI_DRIVERS = Path("bus/pci/drivers")
IOMMU_GROUPS = Path("kernel/iommu_groups")
THUNDERBOLT_DEVICES = Path("bus/thunderbolt/devices")
VFIO_PCI_MODULE = Path("module/vfio_pci")

# Drivers that keep an IOMMU group viable for VFIO besides vfio-pci itself (the kernel's
# vfio allow-list: pci-stub holds a device, pcieport drives a bridge and does no DMA).
VIABLE_DRIVERS = frozenset({VFIO_PCI_DRIVER, "pci-stub", "pcieport"})
MAX_ATTR_BYTES = 64 * 1024  # sysfs attributes are one page at most
MAX_LINK_WIDTH = 32
BAR_COUNT = 6
IORESOURCE_UNSET = 0x20000000  # the kernel's flag for a resource it could not place
# Thunderbolt 5 (USB4 v2) signals 40 Gb/s per lane (80 Gb/s links); TB3/TB4 signal 20 Gb/s.
TB5_LANE_GBPS = 40.0
NO_GROUP = "no IOMMU group: the IOMMU is off (enable it on the kernel command line)"
BOOT_VGA = "it drives the host's boot display; egpu never rebinds it"
GROUP_SHARED = "its IOMMU group holds devices of other slots that the host is using"

_SPEED_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*(?:GT/s|Gb/s)")


@dataclass(frozen=True)
class ThunderboltDevice:
    """One device on a Thunderbolt/USB4 domain (a dock, an eGPU enclosure, a host router)."""

    name: str
    vendor_name: str | None
    device_name: str | None
    authorized: bool | None
    lane_speed_gbps: float | None

    @property
    def is_tb5(self) -> bool:
        return self.lane_speed_gbps is not None and self.lane_speed_gbps >= TB5_LANE_GBPS

    def to_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "vendor_name": self.vendor_name,
            "device_name": self.device_name,
            "authorized": self.authorized,
            "lane_speed_gbps": self.lane_speed_gbps,
            "thunderbolt5": self.is_tb5,
        }


@dataclass(frozen=True)
class SysfsSnapshot:
    """What a sysfs tree says about PCI, IOMMU groups, vfio-pci and Thunderbolt."""

    devices: tuple[PciDevice, ...]
    iommu_enabled: bool
    vfio_pci_loaded: bool
    thunderbolt: tuple[ThunderboltDevice, ...]


def _read(path: Path, root: Path) -> str | None:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_ATTR_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise HostError(f"cannot read {path.relative_to(root)}: {e.strerror or e}") from e
    if len(raw) > MAX_ATTR_BYTES:
        raise HostError(f"{path.relative_to(root)}: larger than a sysfs attribute")
    return raw.decode("utf-8", "replace").strip()


def _hex(path: Path, root: Path, *, bits: int) -> int:
    text = _read(path, root)
    if text is None:
        raise HostError(f"{path.relative_to(root)}: missing (is this a copy of /sys?)")
    try:
        value = int(text, 16)
    except ValueError:
        raise HostError(f"{path.relative_to(root)}: {text[:40]!r} is not a hex number") from None
    if not 0 <= value < 1 << bits:
        raise HostError(f"{path.relative_to(root)}: {text[:40]!r} is out of range")
    return value


def _link_target(path: Path) -> str | None:
    """The last component of a symlink's target (driver name, group number)."""
    try:
        return Path(os.readlink(path)).name
    except FileNotFoundError:
        return None
    except OSError:
        # A copied tree may hold a directory or file instead of the link.
        return path.resolve().name if path.exists() else None


def parse_link_speed(text: str | None) -> float | None:
    """``"8.0 GT/s PCIe"`` -> 8.0; None for "Unknown" or absent."""
    if not text:
        return None
    m = _SPEED_RE.match(text)
    if m is None:
        return None
    value = float(m[1])
    return value if 0 < value <= 1024 else None


def _width(text: str | None) -> int | None:
    if text is None or not text.isdigit():
        return None
    value = int(text)
    return value if 0 < value <= MAX_LINK_WIDTH else None


def parse_resource(text: str) -> tuple[int, ...]:
    """Indices of BARs that asked for space but got none, from a ``resource`` file."""
    unassigned = []
    for index, line in enumerate(text.splitlines()[:BAR_COUNT]):
        fields = line.split()
        if len(fields) != 3:
            raise ValueError(f"resource line {index} has {len(fields)} fields, expected 3")
        start, end, flags = (int(f, 16) for f in fields)
        if flags == 0:
            continue  # BAR not implemented
        if flags & IORESOURCE_UNSET or (start == 0 and end != 0) or end < start:
            unassigned.append(index)
    return tuple(unassigned)


@dataclass(frozen=True)
class _Raw:
    address: PciAddress
    vendor: int
    device: int
    class_code: int
    driver: str | None
    group: int | None
    link: PcieLink | None
    unassigned: tuple[int, ...]
    removable: bool
    label: str | None
    boot_vga: bool


def _raw_device(d: Path, address: PciAddress, root: Path) -> _Raw:
    speed = parse_link_speed(_read(d / "current_link_speed", root))
    max_speed = parse_link_speed(_read(d / "max_link_speed", root))
    width = _width(_read(d / "current_link_width", root))
    max_width = _width(_read(d / "max_link_width", root))
    link = None
    if any(v is not None for v in (speed, max_speed, width, max_width)):
        link = PcieLink(speed, width, max_speed, max_width)
    resource = _read(d / "resource", root)
    try:
        unassigned = parse_resource(resource) if resource else ()
    except ValueError as e:
        raise HostError(f"{(d / 'resource').relative_to(root)}: {e}") from e
    group_name = _link_target(d / "iommu_group")
    group = int(group_name) if group_name and group_name.isdigit() else None
    return _Raw(
        address=address,
        vendor=_hex(d / "vendor", root, bits=16),
        device=_hex(d / "device", root, bits=16),
        class_code=_hex(d / "class", root, bits=24),
        driver=_link_target(d / "driver"),
        group=group,
        link=link,
        unassigned=unassigned,
        removable=_read(d / "removable", root) == "removable",
        label=_read(d / "label", root),
        boot_vga=_read(d / "boot_vga", root) == "1",
    )


def _groups(root: Path) -> dict[int, tuple[str, ...]]:
    base = root / IOMMU_GROUPS
    groups: dict[int, tuple[str, ...]] = {}
    if not base.is_dir():
        return groups
    for g in base.iterdir():
        if g.name.isdigit() and (g / "devices").is_dir():
            groups[int(g.name)] = tuple(sorted(p.name for p in (g / "devices").iterdir()))
    return groups


def _thunderbolt(root: Path) -> tuple[ThunderboltDevice, ...]:
    base = root / THUNDERBOLT_DEVICES
    if not base.is_dir():
        return ()
    found = []
    for d in sorted(base.iterdir(), key=lambda p: p.name):
        if not (d / "authorized").exists() and not (d / "device_name").exists():
            continue  # domains, ports and retimers have neither
        auth = _read(d / "authorized", root)
        speed = parse_link_speed(_read(d / "rx_speed", root))
        found.append(ThunderboltDevice(
            name=d.name,
            vendor_name=_read(d / "vendor_name", root),
            device_name=_read(d / "device_name", root),
            authorized=None if auth is None or not auth.isdigit() else int(auth) > 0,
            lane_speed_gbps=speed,
        ))
    return tuple(found)


def _group_state(me: _Raw, members: list[_Raw]) -> tuple[bool, bool]:
    """(viable now, viable once this slot's functions are rebound to vfio-pci)."""
    now = after = True
    for m in members:
        if m.address == me.address:
            continue
        bridge = (m.class_code >> 16) & 0xFF == CLASS_BRIDGE
        if bridge or m.driver is None or m.driver in VIABLE_DRIVERS:
            continue
        now = False
        if m.address.slot != me.address.slot:
            after = False
    return now, after


def read_sysfs(root: Path) -> SysfsSnapshot:
    """Read PCI functions, IOMMU groups, vfio-pci and Thunderbolt state from a sysfs tree."""
    devices_dir = root / PCI_DEVICES
    if not devices_dir.is_dir():
        raise HostError(f"{root}: no {PCI_DEVICES} here; pass a copy of /sys (or /sys itself)")
    raws: list[_Raw] = []
    for entry in sorted(devices_dir.iterdir(), key=lambda p: p.name):
        address = full_address(entry.name)
        if address is None:
            raise HostError(f"{entry.relative_to(root)}: not a PCI address (DDDD:BB:DD.F)")
        raws.append(_raw_device(entry, address, root))
    by_full = {r.address.full: r for r in raws}
    groups = _groups(root)
    out = []
    for r in raws:
        member_names = groups.get(r.group, ()) if r.group is not None else ()
        members = [by_full[n] for n in member_names if n in by_full]
        viable_now, viable_after = _group_state(r, members)
        group_known = r.group is not None
        is_bridge = (r.class_code >> 16) & 0xFF == CLASS_BRIDGE
        bound = r.driver == VFIO_PCI_DRIVER
        ready, why = readiness(
            platform="linux", class_code=r.class_code, driver=r.driver, bound=bound,
            unassigned_bars=r.unassigned, group_viable=viable_now if group_known else None,
            blockers=() if group_known else (NO_GROUP,),
        )
        if not is_bridge and not group_known:
            why = NO_GROUP  # nothing else matters until the IOMMU is on
        elif not is_bridge and not viable_after:
            why = GROUP_SHARED
        rebindable = (
            not ready and group_known and viable_after and not r.unassigned and not is_bridge
            and not r.boot_vga
        )
        if r.boot_vga and not ready:
            why = BOOT_VGA  # taking it away would blank the host's own console
        out.append(PciDevice(
            address=r.address,
            vendor_id=r.vendor,
            device_id=r.device,
            class_code=r.class_code,
            name=r.label or f"pci{r.vendor:04x},{r.device:04x}",
            driver=r.driver,
            passthrough_ready=ready,
            why_not=why,
            link=r.link,
            unassigned_bars=r.unassigned,
            thunderbolt=r.removable,
            iommu_group=r.group,
            iommu_group_members=tuple(n for n in member_names if n != r.address.full),
            iommu_group_viable=viable_after if group_known else None,
            rebindable=rebindable,
        ))
    vfio_loaded = (root / PCI_DRIVERS / VFIO_PCI_DRIVER).is_dir() or (
        root / VFIO_PCI_MODULE
    ).is_dir()
    return SysfsSnapshot(
        devices=tuple(out),
        iommu_enabled=bool(groups),
        vfio_pci_loaded=vfio_loaded,
        thunderbolt=_thunderbolt(root),
    )
