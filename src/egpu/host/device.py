"""The device record every discovery source produces, and its JSON form."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from egpu.host.address import PciAddress

# PCI base classes (PCI Code and ID Assignment spec, class code byte 2).
CLASS_DISPLAY = 0x03  # 0x0300 VGA, 0x0302 3D controller (data-center GPUs), 0x0380 other
CLASS_MULTIMEDIA = 0x04  # 0x0403 HD audio: the HDMI/DP audio function of a GPU
CLASS_BRIDGE = 0x06

Platform = Literal["macos", "linux"]

# The DriverKit extension that claims a device for passthrough on macOS (scottjg/qemu-vfio-apple,
# contrib/apple-vfio/VFIOUserPCIDriver/): its class name, and its bundle id, which that project's
# build notes make ``<host app id>.VFIOUserPCIDriver``.
DEXT_NAME = "VFIOUserPCIDriver"
DEFAULT_DEXT_BUNDLE_ID = "scottjg.VFIOUserHostApp.VFIOUserPCIDriver"
VFIO_PCI_DRIVER = "vfio-pci"


@dataclass(frozen=True)
class PcieLink:
    """Negotiated and maximum PCIe link: speed in GT/s, width in lanes (None when unknown)."""

    speed_gts: float | None
    width: int | None
    max_speed_gts: float | None
    max_width: int | None

    @property
    def degraded(self) -> bool:
        """True when the link trained below what both ends support."""
        slow = (
            self.speed_gts is not None
            and self.max_speed_gts is not None
            and self.speed_gts < self.max_speed_gts
        )
        narrow = (
            self.width is not None and self.max_width is not None and self.width < self.max_width
        )
        return slow or narrow

    def describe(self) -> str:
        def one(speed: float | None, width: int | None) -> str:
            s = f"{speed:g} GT/s" if speed is not None else "? GT/s"
            return f"{s} x{width if width is not None else '?'}"

        return f"{one(self.speed_gts, self.width)} (max {one(self.max_speed_gts, self.max_width)})"

    def to_json(self) -> dict[str, Any]:
        return {
            "speed_gts": self.speed_gts,
            "width": self.width,
            "max_speed_gts": self.max_speed_gts,
            "max_width": self.max_width,
            "degraded": self.degraded,
        }


@dataclass(frozen=True)
class PciDevice:
    """One PCI function as discovery saw it, with whether it can be passed through and why not."""

    address: PciAddress
    vendor_id: int
    device_id: int
    class_code: int  # 24 bits: base << 16 | sub << 8 | prog-if
    name: str
    driver: str | None
    passthrough_ready: bool
    why_not: str | None = None
    link: PcieLink | None = None
    unassigned_bars: tuple[int, ...] = ()  # BAR indices the firmware gave no address
    thunderbolt: bool = False  # behind a Thunderbolt/USB4 tunnel
    iommu_group: int | None = None
    iommu_group_members: tuple[str, ...] = ()  # other functions of the group (DDDD:BB:DD.F)
    iommu_group_viable: bool | None = None
    rebindable: bool = False  # Linux: would be ready once rebound to vfio-pci (``--bind``)
    description: str | None = None  # vendor and model from pci.ids, when the host has it
    # macOS: registry-entry name of the topmost IOPCIDevice ancestor (e.g. ``pcic1-bridge``).
    # Apple Silicon has no PCI segments and reuses bus numbers on every Thunderbolt root port,
    # so this, not a domain, tells two cards at 01:00.0 apart. None when the dump was flat.
    root: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def base_class(self) -> int:
        return (self.class_code >> 16) & 0xFF

    @property
    def is_display(self) -> bool:
        return self.base_class == CLASS_DISPLAY

    @property
    def is_audio(self) -> bool:
        return self.base_class == CLASS_MULTIMEDIA

    @property
    def is_bridge(self) -> bool:
        return self.base_class == CLASS_BRIDGE

    @property
    def kind(self) -> str:
        """A short word for the class, for tables."""
        return {
            CLASS_DISPLAY: "display",
            CLASS_MULTIMEDIA: "audio",
            CLASS_BRIDGE: "bridge",
            0x01: "storage",
            0x02: "network",
            0x0C: "serial-bus",
        }.get(self.base_class, "other")

    def to_json(self) -> dict[str, Any]:
        """The stable JSON form of ``egpu devices --json``."""
        doc: dict[str, Any] = {
            "address": self.address.bdf,
            "domain": f"{self.address.domain:04x}",
            "root": self.root,
            "vendor_id": f"{self.vendor_id:04x}",
            "device_id": f"{self.device_id:04x}",
            "class_code": f"{self.class_code:06x}",
            "kind": self.kind,
            "name": self.name,
            "description": self.description,
            "driver": self.driver,
            "passthrough_ready": self.passthrough_ready,
        }
        if not self.passthrough_ready:
            doc["why_not"] = self.why_not or "not claimed for passthrough"
        doc["link"] = self.link.to_json() if self.link else None
        doc["unassigned_bars"] = list(self.unassigned_bars)
        doc["thunderbolt"] = self.thunderbolt
        doc["iommu_group"] = self.iommu_group
        doc["iommu_group_members"] = list(self.iommu_group_members)
        doc["iommu_group_viable"] = self.iommu_group_viable
        doc["rebindable"] = self.rebindable
        doc.update(self.extra)
        return doc


def readiness(
    *,
    platform: Platform,
    class_code: int,
    driver: str | None,
    bound: bool,
    unassigned_bars: tuple[int, ...],
    group_viable: bool | None = None,
    blockers: tuple[str, ...] = (),
) -> tuple[bool, str | None]:
    """Whether a function can be passed through as discovered, and if not, why (one phrase)."""
    if (class_code >> 16) & 0xFF == CLASS_BRIDGE:
        return False, "a PCI bridge is never passed through"
    if not bound:
        if platform == "macos":
            owner = f"claimed by {driver}" if driver else "not claimed by any driver"
            return False, f"{owner}, not by the {DEXT_NAME} DriverKit extension"
        owner = f"bound to {driver}" if driver else "bound to no driver"
        return False, f"{owner}, not {VFIO_PCI_DRIVER} (egpu run --bind rebinds it)"
    if unassigned_bars:
        bars = ", ".join(f"BAR{i}" for i in unassigned_bars)
        return False, f"{bars} left unassigned by the host firmware"
    if group_viable is False:
        return False, "its IOMMU group holds devices bound to other drivers"
    if blockers:
        return False, blockers[0]
    return True, None
