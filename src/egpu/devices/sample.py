"""The sample PCI function: protocol tests and smoke runs against any vfio-user client.

BAR0 (4 KiB, trapped): scratch registers plus three commands that exercise the server paths a
real device uses; the MSI-X table and PBA live at its end. BAR2 (64 KiB) is shared memory whose
upper half the client may mmap (sparse mmap); the lower half is trapped.

BAR0 registers (u64): 0x00 IRQ doorbell (write a vector: raises it in the enabled mode),
0x08 DMA address, 0x10 DMA length, 0x18 DMA command (1 = guest -> BAR2, 2 = BAR2 -> guest),
0x20 DMA status (0 ok, 1 failed), 0x100.. scratch.
"""

from __future__ import annotations

import mmap
import os
import struct

from egpu.devices.base import (
    DeviceDescription,
    IrqIndex,
    IrqLine,
    MmapArea,
    PciFunction,
)
from egpu.devices.options import DeviceOption
from egpu.dma import DmaError
from egpu.pci import BarKind, ConfigSpace, MsixLayout

SAMPLE_VENDOR_ID = 0x1234  # QEMU's test vendor ID, never a real product
SAMPLE_DEVICE_ID = 0x5678
SAMPLE_CLASS = 0xFF0000  # unassigned class: no guest driver binds it
BAR0_SIZE = 4096
BAR2_SIZE = 64 * 1024
MSIX_VECTORS = 4
REG_DOORBELL = 0x00
REG_DMA_ADDR = 0x08
REG_DMA_LEN = 0x10
REG_DMA_CMD = 0x18
REG_DMA_STATUS = 0x20
DMA_TO_DEVICE = 1
DMA_FROM_DEVICE = 2
MSIX_TABLE_OFFSET = 0x800
MSIX_PBA_OFFSET = 0xC00
_U64 = struct.Struct("<Q")


class SampleFunction(PciFunction):
    """Scratch registers, a shared-memory BAR and IRQ/DMA triggers (see module docstring)."""

    def __init__(self, *, multifunction: bool = False) -> None:
        config = ConfigSpace(vendor_id=SAMPLE_VENDOR_ID, device_id=SAMPLE_DEVICE_ID,
                             class_code=SAMPLE_CLASS, multifunction=multifunction)
        config.add_bar(0, BAR0_SIZE, BarKind.MEM32)
        config.add_bar(2, BAR2_SIZE, BarKind.MEM64, prefetchable=True)
        config.add_power_management()
        config.add_msi(1)
        config.add_msix(MsixLayout(MSIX_VECTORS, 0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET))
        config.add_pci_express()
        super().__init__(config)
        self.regs = bytearray(BAR0_SIZE)
        self.shm_fd = os.memfd_create("egpu-sample-bar2", os.MFD_CLOEXEC)
        os.ftruncate(self.shm_fd, BAR2_SIZE)
        self.shm = mmap.mmap(self.shm_fd, BAR2_SIZE)
        self.resets = 0

    def describe(self) -> DeviceDescription:
        """BAR0 trapped, BAR2 shm-backed with its upper half mmappable, config, all IRQ types."""
        half = BAR2_SIZE // 2
        regions = self.bar_regions({2: (self.shm_fd, (MmapArea(half, half),))})
        return DeviceDescription(
            regions=(*regions, self.config_region()),
            irqs=(
                IrqLine(IrqIndex.INTX, 1),
                IrqLine(IrqIndex.MSI, 1),
                IrqLine(IrqIndex.MSIX, MSIX_VECTORS),
                IrqLine(IrqIndex.ERR, 1),
                IrqLine(IrqIndex.REQ, 1),
            ),
        )

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """BAR0 registers; BAR2 from shared memory."""
        if index == 2:
            return self.shm[offset : offset + count]
        return bytes(self.regs[offset : offset + count])

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Store, then act on the command registers."""
        if index == 2:
            self.shm[offset : offset + len(data)] = data
            return
        self.regs[offset : offset + len(data)] = data
        if offset == REG_DOORBELL and len(data) >= 1:
            self._raise(_U64.unpack_from(self.regs, REG_DOORBELL)[0])
        elif offset == REG_DMA_CMD:
            self._dma(_U64.unpack_from(self.regs, REG_DMA_CMD)[0])

    def _raise(self, vector: int) -> None:
        mode = self.interrupts.enabled_index()
        if mode is not None:
            self.interrupts.trigger(mode, vector if mode == IrqIndex.MSIX else 0)

    def _dma(self, command: int) -> None:
        address = _U64.unpack_from(self.regs, REG_DMA_ADDR)[0]
        length = min(_U64.unpack_from(self.regs, REG_DMA_LEN)[0], BAR2_SIZE)
        status = 0
        try:
            if command == DMA_TO_DEVICE:
                self.shm[:length] = self.memory.read(address, length)
            elif command == DMA_FROM_DEVICE:
                self.memory.write(address, self.shm[:length])
        except DmaError:
            status = 1  # a wild guest address fails the command, never the server
        _U64.pack_into(self.regs, REG_DMA_STATUS, status)

    def reset(self) -> None:
        """Clear registers and config space; shared memory keeps its content."""
        super().reset()
        self.regs[:] = bytes(BAR0_SIZE)
        self.resets += 1


OPTIONS: tuple[DeviceOption, ...] = ()  # nothing to configure


def create() -> SampleFunction:
    """Build the sample function (``egpu vfio-user serve --function sample``)."""
    return SampleFunction()
