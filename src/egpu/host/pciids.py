"""Readable vendor and device names from the pci.ids database, when the host has one.

Format (https://pci-ids.ucw.cz): a vendor line is ``vvvv  Name`` at column 0, its devices follow
as ``\\tdddd  Name``, subsystems as ``\\t\\tssss ssss  Name``; ``#`` starts a comment, and the
class list (``C cc  Name``) ends the vendor section.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

SEARCH_PATHS = (
    Path("/usr/share/misc/pci.ids"),
    Path("/usr/share/hwdata/pci.ids"),
    Path("/usr/share/pci.ids"),
)
MAX_BYTES = 8 * 1024 * 1024  # the database is about 1.5 MB

_VENDOR_RE = re.compile(r"^([0-9a-fA-F]{4})\s+(.+)$")
_DEVICE_RE = re.compile(r"^\t([0-9a-fA-F]{4})\s+(.+)$")


@dataclass(frozen=True)
class PciIds:
    """Vendor names and device names by id."""

    vendors: dict[int, str] = field(default_factory=dict)
    devices: dict[tuple[int, int], str] = field(default_factory=dict)

    def describe(self, vendor: int, device: int) -> str | None:
        """``"NVIDIA Corporation AD102 [GeForce RTX 4090]"``, the vendor alone, or None."""
        v = self.vendors.get(vendor)
        d = self.devices.get((vendor, device))
        if v and d:
            return f"{v} {d}"
        return v


def parse_pci_ids(text: str) -> PciIds:
    """Parse the database text; lines that fit no rule are skipped."""
    ids = PciIds()
    vendor: int | None = None
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("C "):
            break  # device classes follow: no more vendors
        if line.startswith("\t\t"):
            continue  # subsystems
        m = _DEVICE_RE.match(line)
        if m and vendor is not None:
            ids.devices[(vendor, int(m[1], 16))] = m[2].strip()
            continue
        m = _VENDOR_RE.match(line)
        if m:
            vendor = int(m[1], 16)
            ids.vendors[vendor] = m[2].strip()
    return ids


@functools.cache
def system_pci_ids() -> PciIds:
    """The host's database (cached), or an empty one when there is none."""
    for path in SEARCH_PATHS:
        try:
            with path.open("rb") as f:
                return parse_pci_ids(f.read(MAX_BYTES).decode("utf-8", "replace"))
        except OSError:
            continue
    return PciIds()
