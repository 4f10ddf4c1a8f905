"""pci layer (see DESIGN.md): a pure PCI/PCIe type-0 configuration-space model."""

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
