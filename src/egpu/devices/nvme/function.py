"""The NVMe controller as a vfio-user PCI function, and ``create`` for the devices registry."""

from __future__ import annotations

from pathlib import Path

from egpu.devices.base import (
    DeviceDescription,
    Interrupts,
    IrqIndex,
    IrqLine,
    PciFunction,
    RegionIndex,
)
from egpu.devices.nvme.backing import NvmeBacking
from egpu.devices.nvme.controller import DEFAULT_IO_QUEUES, MAX_IO_QUEUES, VENDOR_ID, NvmeController
from egpu.devices.options import DeviceOption, OptionType
from egpu.dma import DmaRange, GuestMemory
from egpu.errors import DeviceServerError
from egpu.paths import dirs
from egpu.pci import BarKind, ConfigSpace, MsixLayout
from egpu.pci import Command as PciCommand
from egpu.units import GIB, MIB

DEVICE_ID = 0xE9E1  # "eGPU, function 1": not in any driver's quirk table
CLASS_NVME = 0x010802  # mass storage, non-volatile memory, NVM Express
BAR0_SIZE = 0x4000  # registers, doorbells, MSI-X table and PBA (Linux maps >= 8 KiB)
MSIX_TABLE_OFFSET = 0x2000
MSIX_PBA_OFFSET = 0x3000


class NvmeFunction(PciFunction):
    """The NVMe controller as a vfio-user PCI function (BAR0 trapped, MSI-X per queue)."""

    def __init__(self, backing: NvmeBacking, *, max_io_queues: int = DEFAULT_IO_QUEUES,
                 multifunction: bool = False, shadow_doorbells: bool = True) -> None:
        vectors = max_io_queues + 1
        config = ConfigSpace(vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_NVME,
                             revision=2, subsystem_vendor_id=VENDOR_ID, subsystem_id=DEVICE_ID,
                             multifunction=multifunction, interrupt_pin=0)
        config.add_bar(0, BAR0_SIZE, BarKind.MEM64)
        config.add_power_management()
        config.add_msix(MsixLayout(vectors, 0, MSIX_TABLE_OFFSET, 0, MSIX_PBA_OFFSET))
        config.add_pci_express()
        super().__init__(config)
        self.backing = backing
        self.max_io_queues = max_io_queues
        self.shadow_doorbells = shadow_doorbells
        self._controller: NvmeController | None = None

    def describe(self) -> DeviceDescription:
        """Config space, BAR0, and one MSI-X vector per queue."""
        return DeviceDescription(
            regions=(self.config_region(), *self.bar_regions()),
            # ERR and REQ let QEMU set up error recovery and device-request notifiers (it warns
            # when a device has none); nothing ever signals them.
            irqs=(IrqLine(IrqIndex.MSIX, self.max_io_queues + 1), IrqLine(IrqIndex.ERR, 1),
                  IrqLine(IrqIndex.REQ, 1)),
        )

    def attach(self, memory: GuestMemory, interrupts: Interrupts) -> None:
        """Build the controller on the server's guest memory and interrupt table."""
        super().attach(memory, interrupts)
        self._controller = NvmeController(memory, self._raise, self.backing,
                                          max_io_queues=self.max_io_queues,
                                          shadow_doorbells=self.shadow_doorbells)
        self.config_written(0, 0)

    @property
    def controller(self) -> NvmeController:
        """The controller core (exists once attached)."""
        if self._controller is None:
            raise DeviceServerError("NVMe function used before the server attached it")
        return self._controller

    def _raise(self, vector: int) -> None:
        self.interrupts.trigger(IrqIndex.MSIX, vector)

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """BAR0 registers."""
        if index != RegionIndex.BAR0:
            return bytes(count)
        return self.controller.bar0_read(offset, count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """BAR0 registers and doorbells (the MSI-X table is QEMU's, never reaches us)."""
        if index == RegionIndex.BAR0 and offset < MSIX_TABLE_OFFSET:
            self.controller.bar0_write(offset, data)

    def config_written(self, offset: int, size: int) -> None:
        """Track Bus Master Enable: no DMA while the driver has it off."""
        if self._controller is not None:
            self._controller.bus_master = bool(self.config.command & PciCommand.BUS_MASTER)

    def dma_mapped(self, dma_range: DmaRange) -> None:
        """Pin a view of the new range for zero-copy queue and data access."""
        self.controller.pinned.pin(dma_range)

    def dma_unmapped(self, dma_range: DmaRange) -> None:
        """Drop the pinned view before the server unmaps the range."""
        self.controller.pinned.unpin(dma_range)

    def client_disconnected(self) -> None:
        """The client's maps are gone (their pins were dropped by dma_unmapped)."""
        self.controller.pinned.unpin_all()

    def reset(self) -> None:
        """Function-level or device reset: controller back to power-on state."""
        super().reset()
        if self._controller is not None:
            self._controller.power_on_reset()
            self.config_written(0, 0)


DEFAULT_BACKING_NAME = "nvme.img"
MIN_SIZE = MIB  # the least a namespace may be: refused where the size is parsed
DEFAULT_SIZE = GIB
BACKING = DeviceOption("backing", OptionType.PATH, None,
                       "storage file of the namespace (created sparse, never shrunk)",
                       default_text=f"<egpu data dir>/devices/{DEFAULT_BACKING_NAME}")
SIZE = DeviceOption("size", OptionType.SIZE, DEFAULT_SIZE,
                    "namespace size; the file grows sparse to it", minimum=MIN_SIZE)
QUEUES = DeviceOption("queues", OptionType.INT, DEFAULT_IO_QUEUES, "I/O queue pairs offered",
                      minimum=1, maximum=MAX_IO_QUEUES)
MULTIFUNCTION = DeviceOption("multifunction", OptionType.BOOL, False,
                             "set the multifunction bit of the PCI header")
SHADOW_DOORBELLS = DeviceOption("shadow_doorbells", OptionType.BOOL, True,
                                "offer Doorbell Buffer Config: the guest writes doorbells to "
                                "memory and rings MMIO only when the controller asks")
OPTIONS = (BACKING, SIZE, QUEUES, MULTIFUNCTION, SHADOW_DOORBELLS)


def default_backing() -> Path:
    """Where a standalone nvme function keeps its storage: egpu's data dir (read at start)."""
    return dirs().devices / DEFAULT_BACKING_NAME


def create(backing: Path | None = None, size: int = DEFAULT_SIZE,
           queues: int = DEFAULT_IO_QUEUES, multifunction: bool = False,
           shadow_doorbells: bool = True) -> NvmeFunction:
    """Build the NVMe function from parsed :data:`OPTIONS` (no backing: :func:`default_backing`)."""
    if backing is None:
        backing = default_backing()
        backing.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    return NvmeFunction(NvmeBacking(backing, size), max_io_queues=queues,
                        multifunction=multifunction, shadow_doorbells=shadow_doorbells)
