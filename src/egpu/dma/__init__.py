"""dma layer: the guest-memory table of DMA_MAP ranges, the only way device models reach guest
memory; every access is bounds-checked (docs/ARCHITECTURE.md, docs/THREAT_MODEL.md).
"""

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
