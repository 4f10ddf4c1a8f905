"""dma layer (see DESIGN.md): the bounds-checked guest-memory table."""

from egpu.dma.memory import (
    DmaAccessError,
    DmaError,
    DmaMapError,
    DmaProt,
    DmaRange,
    GuestMemory,
    RemoteDma,
)

__all__ = [
    "DmaAccessError",
    "DmaError",
    "DmaMapError",
    "DmaProt",
    "DmaRange",
    "GuestMemory",
    "RemoteDma",
]
