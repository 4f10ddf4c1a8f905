"""Type-0 PCI/PCIe configuration space: pure model of registers, masks and capabilities.

The model follows the PCI Local Bus 3.0 and PCI Express Base specifications: every byte has a
write mask (bits software may change) and a write-1-to-clear mask (status bits), so BAR sizing
(write all ones, read the size mask back), read-only identity fields and RW1C status bits all fall
out of one ``write`` rule instead of per-register code.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from egpu.errors import DeviceServerError

CONFIG_SPACE_SIZE = 4096  # PCIe extended configuration space
LEGACY_CONFIG_SIZE = 256

# Type-0 header offsets (PCI Local Bus 3.0, section 6.1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_CODE = 0x09  # 3 bytes: prog-if, subclass, base class
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
ROM_ADDRESS = 0x30
CAPABILITIES_POINTER = 0x34
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D
FIRST_CAPABILITY = 0x40
NUM_BARS = 6

HEADER_TYPE_MULTIFUNCTION = 0x80


class Command(enum.IntFlag):
    """Command register bits software may set (others are hardwired to zero)."""

    IO = 1 << 0
    MEMORY = 1 << 1
    BUS_MASTER = 1 << 2
    PARITY_ERROR_RESPONSE = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


COMMAND_WRITABLE = int(
    Command.IO
    | Command.MEMORY
    | Command.BUS_MASTER
    | Command.PARITY_ERROR_RESPONSE
    | Command.SERR
    | Command.INTX_DISABLE
)


class Status(enum.IntFlag):
    """Status register bits."""

    INTERRUPT = 1 << 3
    CAPABILITIES_LIST = 1 << 4
    MASTER_DATA_PARITY_ERROR = 1 << 8
    SIGNALED_TARGET_ABORT = 1 << 11
    RECEIVED_TARGET_ABORT = 1 << 12
    RECEIVED_MASTER_ABORT = 1 << 13
    SIGNALED_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY_ERROR = 1 << 15


# Error bits are write-1-to-clear; the interrupt and capability bits are read-only.
STATUS_W1C = int(
    Status.MASTER_DATA_PARITY_ERROR
    | Status.SIGNALED_TARGET_ABORT
    | Status.RECEIVED_TARGET_ABORT
    | Status.RECEIVED_MASTER_ABORT
    | Status.SIGNALED_SYSTEM_ERROR
    | Status.DETECTED_PARITY_ERROR
)


class CapabilityId(enum.IntEnum):
    """Standard capability IDs (PCI Code and ID Assignment spec)."""

    POWER_MANAGEMENT = 0x01
    MSI = 0x05
    PCI_EXPRESS = 0x10
    MSIX = 0x11


class BarKind(enum.Enum):
    """What a BAR decodes."""

    MEM32 = "mem32"
    MEM64 = "mem64"
    IO = "io"


# BAR low bits (PCI 3.0, 6.2.5.1).
BAR_IO_SPACE = 0x1
BAR_MEM_TYPE_64 = 0x4
BAR_MEM_PREFETCHABLE = 0x8
MIN_MEM_BAR_SIZE = 16
MIN_IO_BAR_SIZE = 4
MAX_IO_BAR_SIZE = 256

# MSI (PCI 3.0, 6.8.1) message control bits.
MSI_CTRL_ENABLE = 1 << 0
MSI_CTRL_MME_SHIFT = 4
MSI_CTRL_MME_MASK = 0x7 << MSI_CTRL_MME_SHIFT
MSI_CTRL_MMC_SHIFT = 1
MSI_CTRL_64BIT = 1 << 7
MSI_CTRL_PER_VECTOR_MASK = 1 << 8

# MSI-X (PCI 3.0, 6.8.2).
MSIX_CTRL_ENABLE = 1 << 15
MSIX_CTRL_FUNCTION_MASK = 1 << 14
MSIX_MAX_VECTORS = 2048
MSIX_ENTRY_SIZE = 16
MSIX_CAP_SIZE = 12

# Power management (PCI PM 1.2): PMC version 3 (PM 1.2), PMCSR.
PM_CAP_SIZE = 8
PM_PMC_VERSION_1_2 = 0x3
PMCSR_POWER_STATE_MASK = 0x3
PMCSR_NO_SOFT_RESET = 1 << 3
PMCSR_PME_ENABLE = 1 << 8
PMCSR_PME_STATUS = 1 << 15

# PCI Express capability, version 2 layout (PCIe Base 3.0, 7.8).
PCIE_CAP_SIZE = 0x3C
PCIE_CAP_VERSION_2 = 0x2
PCIE_TYPE_ENDPOINT = 0x0
PCIE_TYPE_SHIFT = 4
PCIE_DEVCAP = 0x04
PCIE_DEVCTL = 0x08
PCIE_DEVSTA = 0x0A
PCIE_LNKCAP = 0x0C
PCIE_LNKCTL = 0x10
PCIE_LNKSTA = 0x12
PCIE_LNKCAP2 = 0x2C
PCIE_LNKCTL2 = 0x30
PCIE_DEVCAP_FLR = 1 << 28
# DEVCTL: correctable/non-fatal/fatal/UR reporting, relaxed ordering, max payload, extended tag,
# phantom, aux power, no snoop, max read request, initiate FLR (bit 15, reads as zero).
PCIE_DEVCTL_WRITABLE = 0x7FFF
PCIE_DEVSTA_W1C = 0x000F
PCIE_LNKCTL_WRITABLE = 0x0FFB


class ConfigSpaceError(DeviceServerError):
    """A device model was built with an impossible configuration (a programming error)."""


@dataclass(frozen=True)
class Bar:
    """One base address register as declared by the device model."""

    index: int
    size: int
    kind: BarKind
    prefetchable: bool = False

    @property
    def slots(self) -> int:
        """How many BAR registers this BAR occupies (2 for a 64-bit BAR)."""
        return 2 if self.kind is BarKind.MEM64 else 1


@dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and pending-bit array live (BAR index and offset in it)."""

    vectors: int
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int

    @property
    def table_size(self) -> int:
        """Bytes of the vector table."""
        return self.vectors * MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        """Bytes of the pending-bit array (whole qwords)."""
        return ((self.vectors + 63) // 64) * 8


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class ConfigSpace:
    """A type-0 config space of 4 KiB with write masks, RW1C bits and a capability list.

    Build it once (identity, BARs, capabilities), then serve ``read``/``write`` from the wire;
    ``reset`` returns every register to its built value.
    """

    def __init__(
        self,
        *,
        vendor_id: int,
        device_id: int,
        class_code: int,
        revision: int = 0,
        subsystem_vendor_id: int = 0,
        subsystem_id: int = 0,
        multifunction: bool = False,
        interrupt_pin: int = 1,
    ) -> None:
        self._data = bytearray(CONFIG_SPACE_SIZE)
        self._view = memoryview(self._data)  # the buffer never resizes
        self._wmask = bytearray(CONFIG_SPACE_SIZE)
        self._w1cmask = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, Bar] = {}
        self._caps: dict[CapabilityId, int] = {}
        self._next_cap = FIRST_CAPABILITY
        self._last_cap_next_ptr = CAPABILITIES_POINTER
        self._msix: MsixLayout | None = None
        self.set_u16(VENDOR_ID, vendor_id)
        self.set_u16(DEVICE_ID, device_id)
        self.set_u8(REVISION_ID, revision)
        self.set_u8(CLASS_CODE, class_code & 0xFF)
        self.set_u16(CLASS_CODE + 1, (class_code >> 8) & 0xFFFF)
        self.set_u8(HEADER_TYPE, HEADER_TYPE_MULTIFUNCTION if multifunction else 0)
        self.set_u16(SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set_u16(SUBSYSTEM_ID, subsystem_id)
        self.set_u8(INTERRUPT_PIN, interrupt_pin)
        self._set_mask(COMMAND, COMMAND_WRITABLE, 2)
        self._set_mask(STATUS, STATUS_W1C, 2, w1c=True)
        self._set_mask(CACHE_LINE_SIZE, 0xFF, 1)
        self._set_mask(INTERRUPT_LINE, 0xFF, 1)
        self._reset_image = bytes(self._data)

    # -- building (bypasses write masks; used by device models, never by the wire) --------------

    def set_u8(self, offset: int, value: int) -> None:
        """Store a byte at build time (read-only fields included)."""
        self._data[offset] = value & 0xFF
        self._reset_image = bytes(self._data)

    def set_u16(self, offset: int, value: int) -> None:
        """Store a little-endian u16 at build time."""
        struct.pack_into("<H", self._data, offset, value & 0xFFFF)
        self._reset_image = bytes(self._data)

    def set_u32(self, offset: int, value: int) -> None:
        """Store a little-endian u32 at build time."""
        struct.pack_into("<I", self._data, offset, value & 0xFFFFFFFF)
        self._reset_image = bytes(self._data)

    def _set_mask(self, offset: int, mask: int, width: int, *, w1c: bool = False) -> None:
        target = self._w1cmask if w1c else self._wmask
        target[offset : offset + width] = mask.to_bytes(width, "little")

    def set_writable(self, offset: int, mask: int, width: int) -> None:
        """Declare which bits of a device-specific register software may change."""
        self._set_mask(offset, mask, width)

    def set_write1_to_clear(self, offset: int, mask: int, width: int) -> None:
        """Declare write-1-to-clear bits of a device-specific register."""
        self._set_mask(offset, mask, width, w1c=True)

    def add_bar(
        self, index: int, size: int, kind: BarKind = BarKind.MEM32, *, prefetchable: bool = False
    ) -> Bar:
        """Declare BAR ``index`` of ``size`` bytes (a power of two); returns its description."""
        bar = Bar(index, size, kind, prefetchable)
        if not 0 <= index < NUM_BARS or index + bar.slots > NUM_BARS:
            raise ConfigSpaceError(f"BAR index {index} out of range for a {kind.value} BAR")
        taken = {i + s for i, b in self._bars.items() for s in range(b.slots)}
        if index in taken or index + bar.slots - 1 in taken:
            raise ConfigSpaceError(f"BAR {index} overlaps a BAR already declared")
        minimum = MIN_IO_BAR_SIZE if kind is BarKind.IO else MIN_MEM_BAR_SIZE
        if not _is_power_of_two(size) or size < minimum:
            raise ConfigSpaceError(f"BAR {index} size {size:#x} is not a power of two >= {minimum}")
        if kind is BarKind.IO and size > MAX_IO_BAR_SIZE:
            raise ConfigSpaceError(f"I/O BAR {index} larger than {MAX_IO_BAR_SIZE} bytes")
        if kind is not BarKind.MEM64 and size > 1 << 31:
            raise ConfigSpaceError(f"32-bit BAR {index} larger than 2 GiB")
        offset = BAR0 + 4 * index
        if kind is BarKind.IO:
            low_bits = BAR_IO_SPACE
        else:
            low_bits = (BAR_MEM_TYPE_64 if kind is BarKind.MEM64 else 0) | (
                BAR_MEM_PREFETCHABLE if prefetchable else 0
            )
        address_mask = ~(size - 1)
        self.set_u32(offset, low_bits)
        self._set_mask(offset, address_mask & 0xFFFFFFFF, 4)
        if kind is BarKind.MEM64:
            self.set_u32(offset + 4, 0)
            self._set_mask(offset + 4, (address_mask >> 32) & 0xFFFFFFFF, 4)
        self._bars[index] = bar
        return bar

    def _add_capability(self, cap_id: CapabilityId, size: int) -> int:
        if cap_id in self._caps:
            raise ConfigSpaceError(f"capability {cap_id.name} declared twice")
        offset = self._next_cap
        if offset + size > LEGACY_CONFIG_SIZE:
            raise ConfigSpaceError("capabilities do not fit in the first 256 bytes")
        self.set_u8(offset, cap_id)
        self.set_u8(offset + 1, 0)
        self.set_u8(self._last_cap_next_ptr, offset)
        self._last_cap_next_ptr = offset + 1
        self.set_u16(STATUS, self.u16(STATUS) | Status.CAPABILITIES_LIST)
        self._caps[cap_id] = offset
        self._next_cap = (offset + size + 3) & ~3
        return offset

    def add_power_management(self) -> int:
        """Add a PM 1.2 capability (D0/D3hot, no soft reset on D3->D0); returns its offset."""
        off = self._add_capability(CapabilityId.POWER_MANAGEMENT, PM_CAP_SIZE)
        self.set_u16(off + 2, PM_PMC_VERSION_1_2)
        self.set_u16(off + 4, PMCSR_NO_SOFT_RESET)
        self._set_mask(off + 4, PMCSR_POWER_STATE_MASK | PMCSR_PME_ENABLE, 2)
        self._set_mask(off + 4, PMCSR_PME_STATUS, 2, w1c=True)
        return off

    def add_msi(self, vectors: int = 1, *, address_64: bool = True, per_vector_mask: bool = False
                ) -> int:
        """Add an MSI capability offering ``vectors`` (1..32, power of two); returns its offset."""
        if not _is_power_of_two(vectors) or vectors > 32:
            raise ConfigSpaceError(f"MSI vector count {vectors} is not a power of two <= 32")
        size = 10 + (4 if address_64 else 0) + (10 if per_vector_mask else 0)
        off = self._add_capability(CapabilityId.MSI, size)
        ctrl = (vectors.bit_length() - 1) << MSI_CTRL_MMC_SHIFT
        ctrl |= MSI_CTRL_64BIT if address_64 else 0
        ctrl |= MSI_CTRL_PER_VECTOR_MASK if per_vector_mask else 0
        self.set_u16(off + 2, ctrl)
        self._set_mask(off + 2, MSI_CTRL_ENABLE | MSI_CTRL_MME_MASK, 2)
        self._set_mask(off + 4, 0xFFFFFFFC, 4)  # message address, dword aligned
        data_off = off + 8
        if address_64:
            self._set_mask(off + 8, 0xFFFFFFFF, 4)
            data_off = off + 12
        self._set_mask(data_off, 0xFFFF, 2)
        if per_vector_mask:
            self._set_mask(data_off + 4, (1 << vectors) - 1, 4)
        return off

    def add_msix(self, layout: MsixLayout) -> int:
        """Add an MSI-X capability whose table and PBA lie in declared BARs; returns its offset."""
        if not 1 <= layout.vectors <= MSIX_MAX_VECTORS:
            raise ConfigSpaceError(f"MSI-X vector count {layout.vectors} out of 1..2048")
        for bar_index, start, size in (
            (layout.table_bar, layout.table_offset, layout.table_size),
            (layout.pba_bar, layout.pba_offset, layout.pba_size),
        ):
            bar = self._bars.get(bar_index)
            if bar is None or bar.kind is BarKind.IO:
                raise ConfigSpaceError(f"MSI-X structure in BAR {bar_index}, not a memory BAR")
            if start % 8 or start + size > bar.size:
                raise ConfigSpaceError(
                    f"MSI-X structure at {start:#x} does not fit BAR {bar_index}"
                )
        off = self._add_capability(CapabilityId.MSIX, MSIX_CAP_SIZE)
        self.set_u16(off + 2, layout.vectors - 1)
        self._set_mask(off + 2, MSIX_CTRL_ENABLE | MSIX_CTRL_FUNCTION_MASK, 2)
        self.set_u32(off + 4, layout.table_offset | layout.table_bar)
        self.set_u32(off + 8, layout.pba_offset | layout.pba_bar)
        self._msix = layout
        return off

    def add_pci_express(self, *, function_level_reset: bool = True) -> int:
        """Add a PCIe v2 endpoint capability (Gen1 x1 link, 256-byte max payload)."""
        off = self._add_capability(CapabilityId.PCI_EXPRESS, PCIE_CAP_SIZE)
        self.set_u16(off + 2, PCIE_CAP_VERSION_2 | (PCIE_TYPE_ENDPOINT << PCIE_TYPE_SHIFT))
        max_payload_256 = 0x1
        self.set_u32(off + PCIE_DEVCAP, max_payload_256 | (PCIE_DEVCAP_FLR if function_level_reset
                                                             else 0))
        self._set_mask(off + PCIE_DEVCTL, PCIE_DEVCTL_WRITABLE, 2)
        self._set_mask(off + PCIE_DEVSTA, PCIE_DEVSTA_W1C, 2, w1c=True)
        link_speed_2_5gt = 0x1
        link_width_x1 = 0x1 << 4
        self.set_u32(off + PCIE_LNKCAP, link_speed_2_5gt | link_width_x1)
        self._set_mask(off + PCIE_LNKCTL, PCIE_LNKCTL_WRITABLE, 2)
        self.set_u16(off + PCIE_LNKSTA, link_speed_2_5gt | link_width_x1)
        self.set_u32(off + PCIE_LNKCAP2, 1 << 1)  # supported link speeds vector: 2.5 GT/s
        self.set_u16(off + PCIE_LNKCTL2, link_speed_2_5gt)
        self._set_mask(off + PCIE_LNKCTL2, 0xF, 2)
        return off

    # -- wire access ------------------------------------------------------------------------

    def read(self, offset: int, count: int) -> bytes:
        """Bytes ``offset .. offset+count``; the caller has checked the range."""
        return self._view[offset : offset + count].tobytes()  # one copy (hot: guest probing)

    def write(self, offset: int, data: bytes) -> None:
        """Apply a software write: only writable bits change, RW1C bits clear on a one."""
        d, wm, w1c = self._data, self._wmask, self._w1cmask
        for i, value in enumerate(data, offset):
            d[i] = ((d[i] & ~wm[i]) | (value & wm[i])) & ~(value & w1c[i]) & 0xFF

    def reset(self) -> None:
        """Return every register to its built value (a function-level reset)."""
        self._data[:] = self._reset_image

    # -- typed views --------------------------------------------------------------------------

    def u8(self, offset: int) -> int:
        """Current byte at ``offset``."""
        return self._data[offset]

    def u16(self, offset: int) -> int:
        """Current little-endian u16 at ``offset``."""
        value: int = struct.unpack_from("<H", self._data, offset)[0]
        return value

    def u32(self, offset: int) -> int:
        """Current little-endian u32 at ``offset``."""
        value: int = struct.unpack_from("<I", self._data, offset)[0]
        return value

    def set_interrupt_status(self, asserted: bool) -> None:
        """Reflect the INTx line level in the status register (a device-side, read-only bit)."""
        status = self.u16(STATUS)
        status = status | Status.INTERRUPT if asserted else status & ~Status.INTERRUPT
        struct.pack_into("<H", self._data, STATUS, status)

    @property
    def command(self) -> Command:
        """The command register."""
        return Command(self.u16(COMMAND))

    @property
    def bars(self) -> dict[int, Bar]:
        """Declared BARs by index."""
        return dict(self._bars)

    def bar_address(self, index: int) -> int:
        """The address software programmed into BAR ``index`` (0 when unprogrammed)."""
        bar = self._bars[index]
        low = self.u32(BAR0 + 4 * index)
        if bar.kind is BarKind.IO:
            return low & ~0x3
        address = low & ~0xF
        if bar.kind is BarKind.MEM64:
            address |= self.u32(BAR0 + 4 * index + 4) << 32
        return address

    def capability_offset(self, cap_id: CapabilityId) -> int | None:
        """Offset of a capability, or None when the device does not have it."""
        return self._caps.get(cap_id)

    @property
    def msix(self) -> MsixLayout | None:
        """The MSI-X layout, when the function has MSI-X."""
        return self._msix

    @property
    def msix_enabled(self) -> bool:
        """MSI-X enable bit set and the function not masked as a whole."""
        off = self._caps.get(CapabilityId.MSIX)
        if off is None:
            return False
        ctrl = self.u16(off + 2)
        return bool(ctrl & MSIX_CTRL_ENABLE) and not ctrl & MSIX_CTRL_FUNCTION_MASK

    @property
    def msi_enabled(self) -> bool:
        """MSI enable bit set."""
        off = self._caps.get(CapabilityId.MSI)
        return off is not None and bool(self.u16(off + 2) & MSI_CTRL_ENABLE)

    @property
    def msi_vectors_enabled(self) -> int:
        """How many MSI vectors software enabled (Multiple Message Enable)."""
        off = self._caps.get(CapabilityId.MSI)
        if off is None:
            return 0
        return 1 << ((self.u16(off + 2) & MSI_CTRL_MME_MASK) >> MSI_CTRL_MME_SHIFT)

    @property
    def power_state(self) -> int:
        """Current D-state (0 = D0, 3 = D3hot); 0 without a PM capability."""
        off = self._caps.get(CapabilityId.POWER_MANAGEMENT)
        return 0 if off is None else self.u16(off + 4) & PMCSR_POWER_STATE_MASK

    def flr_requested(self, offset: int, data: bytes) -> bool:
        """True when a write at ``offset`` sets PCIe Device Control 'Initiate FLR' (bit 15)."""
        off = self._caps.get(CapabilityId.PCI_EXPRESS)
        if off is None:
            return False
        byte = off + PCIE_DEVCTL + 1
        return offset <= byte < offset + len(data) and bool(data[byte - offset] & 0x80)
