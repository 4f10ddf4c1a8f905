"""pci layer: a pure PCI/PCIe type-0 configuration-space model (write masks, RW1C bits,
capabilities, BARs) that device models build on (docs/ARCHITECTURE.md).
"""

from egpu.pci.config import (
    CONFIG_SPACE_SIZE,
    Bar,
    BarKind,
    CapabilityId,
    Command,
    ConfigSpace,
    ConfigSpaceError,
    MsixLayout,
    Status,
)

__all__ = [
    "CONFIG_SPACE_SIZE",
    "Bar",
    "BarKind",
    "CapabilityId",
    "Command",
    "ConfigSpace",
    "ConfigSpaceError",
    "MsixLayout",
    "Status",
]
