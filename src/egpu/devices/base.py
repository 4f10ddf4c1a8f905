"""The boundary between the vfio-user server and a device model.

A device is *described* (regions, IRQ types, config space: :class:`DeviceDescription`, validated
once) and then *called back* (:class:`DeviceBackend`: region read/write, DMA map/unmap
notifications, reset, IRQ set-up). It reaches guest memory only through the
:class:`~egpu.dma.GuestMemory` and raises interrupts only through the :class:`Interrupts` table
that the server hands it in :meth:`DeviceBackend.attach`. Offsets and sizes reaching the
callbacks were already checked against the description by the server: ``index`` is a described,
readable (or writable) region and ``offset + len <= size``.
"""

from __future__ import annotations

import abc
import contextlib
import enum
import fcntl
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from egpu.dma import DmaRange, GuestMemory
from egpu.errors import DeviceServerError
from egpu.pci import CONFIG_SPACE_SIZE, ConfigSpace


class RegionIndex(enum.IntEnum):
    """vfio-pci region indices (linux/vfio.h VFIO_PCI_*_REGION_INDEX)."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


NUM_PCI_REGIONS = 9
_CONFIG_INDEX = int(RegionIndex.CONFIG)  # a plain int: compared on every config access


class IrqIndex(enum.IntEnum):
    """vfio-pci IRQ indices (linux/vfio.h VFIO_PCI_*_IRQ_INDEX)."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


NUM_PCI_IRQS = 5

# QEMU refuses servers that describe more (hw/vfio-user/device.c: VFIO_USER_MAX_REGIONS and
# VFIO_USER_MAX_IRQS, "to defend against a malign server").
MAX_REGIONS = 100
MAX_IRQ_TYPES = 50


class DeviceModelError(DeviceServerError):
    """A device description is inconsistent (a programming error in a device model)."""


@dataclass(frozen=True)
class MmapArea:
    """A part of a region the client may mmap (vfio sparse-mmap capability)."""

    offset: int
    size: int


@dataclass(frozen=True)
class Region:
    """One device region. ``shm_fd`` (owned by the device) backs it for mmap by the client.

    With ``shm_fd`` and no ``mmap_areas`` the whole region is mmappable; with areas, only those
    (the rest is trapped and reaches ``region_read``/``region_write``).
    """

    index: int
    size: int
    readable: bool = True
    writable: bool = True
    shm_fd: int | None = None
    shm_offset: int = 0
    mmap_areas: tuple[MmapArea, ...] = ()

    @property
    def mappable(self) -> bool:
        """True when the client gets an fd for (part of) this region."""
        return self.shm_fd is not None

    def sparse_areas(self) -> tuple[MmapArea, ...]:
        """The areas to announce in the sparse-mmap capability (empty: not mmappable)."""
        if self.shm_fd is None:
            return ()
        return self.mmap_areas or (MmapArea(0, self.size),)


@dataclass(frozen=True)
class IrqLine:
    """One IRQ type the device offers: ``count`` vectors at ``index``."""

    index: int
    count: int


@dataclass(frozen=True)
class DeviceDescription:
    """What the server announces; validated once at construction."""

    regions: tuple[Region, ...]
    irqs: tuple[IrqLine, ...]
    num_regions: int = NUM_PCI_REGIONS
    num_irqs: int = NUM_PCI_IRQS
    resettable: bool = True
    _by_index: dict[int, Region] = field(init=False, repr=False, compare=False)
    _irq_counts: tuple[int, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not 0 < self.num_regions <= MAX_REGIONS or not 0 < self.num_irqs <= MAX_IRQ_TYPES:
            raise DeviceModelError("too many regions or IRQ types for a vfio-user client")
        by_index: dict[int, Region] = {}
        for r in self.regions:
            if not 0 <= r.index < self.num_regions or r.index in by_index or r.size < 0:
                raise DeviceModelError(f"region {r.index} is out of range or declared twice")
            for a in r.mmap_areas:
                if a.offset < 0 or a.size <= 0 or a.offset + a.size > r.size:
                    raise DeviceModelError(f"mmap area {a} lies outside region {r.index}")
            by_index[r.index] = r
        counts = [0] * self.num_irqs
        for irq in self.irqs:
            if not 0 <= irq.index < self.num_irqs or counts[irq.index] or irq.count <= 0:
                raise DeviceModelError(f"IRQ index {irq.index} is out of range or declared twice")
            counts[irq.index] = irq.count
        object.__setattr__(self, "_by_index", by_index)
        object.__setattr__(self, "_irq_counts", tuple(counts))

    def region(self, index: int) -> Region | None:
        """The region at ``index``, or None when the device has none there (size 0)."""
        return self._by_index.get(index)

    def irq_count(self, index: int) -> int:
        """Vectors offered at IRQ ``index`` (0 when none)."""
        return self._irq_counts[index] if 0 <= index < self.num_irqs else 0


def is_eventfd(fd: int) -> bool:
    """True when ``fd`` is an eventfd (a client could pass a pipe that blocks our writes)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as f:
            return any(line.startswith("eventfd-count:") for line in f)
    except OSError:
        return False


@dataclass
class _Vector:
    fd: int | None = None
    masked: bool = False
    pending: bool = False


class Interrupts:
    """The eventfds the client gave per IRQ index and vector; devices call :meth:`trigger`.

    The server owns the fds (it closes them on disconnect or when replaced). Thread-safe.
    """

    def __init__(self, description: DeviceDescription) -> None:
        self._lock = threading.Lock()
        self._vectors: list[list[_Vector]] = [
            [_Vector() for _ in range(description.irq_count(i))]
            for i in range(description.num_irqs)
        ]

    # -- device side --------------------------------------------------------------------------

    def trigger(self, index: int, vector: int = 0) -> bool:
        """Signal ``vector`` of IRQ ``index``; False when no eventfd is set or it is masked.

        INTx is automasked (linux/vfio.h): after firing it stays masked until the client unmasks
        it, and the device re-triggers from ``irqs_changed`` if its line is still asserted.
        """
        with self._lock:
            v = self._vector(index, vector)
            if v is None or v.fd is None:
                return False
            if v.masked:
                v.pending = True
                return False
            fd = v.fd
            if index == IrqIndex.INTX:
                v.masked = True
        _signal(fd)
        return True

    def enabled(self, index: int, vector: int = 0) -> bool:
        """True when the client set an eventfd for this vector."""
        with self._lock:
            v = self._vector(index, vector)
            return v is not None and v.fd is not None

    def enabled_index(self) -> IrqIndex | None:
        """The interrupt mode in use: MSI-X, MSI or INTx when any of its vectors has an fd."""
        with self._lock:
            for index in (IrqIndex.MSIX, IrqIndex.MSI, IrqIndex.INTX):
                if index < len(self._vectors) and any(v.fd is not None
                                                      for v in self._vectors[index]):
                    return index
        return None

    # -- server side --------------------------------------------------------------------------

    def _vector(self, index: int, vector: int) -> _Vector | None:
        if 0 <= index < len(self._vectors) and 0 <= vector < len(self._vectors[index]):
            return self._vectors[index][vector]
        return None

    def count(self, index: int) -> int:
        """Vectors at ``index``."""
        return len(self._vectors[index]) if 0 <= index < len(self._vectors) else 0

    def set_fds(self, index: int, start: int, fds: Sequence[int | None]) -> list[int]:
        """Install eventfds (owned from now on) at ``start``; returns replaced fds to close."""
        old: list[int] = []
        for fd in fds:
            if fd is not None:
                flags = fcntl.fcntl(fd, fcntl.F_GETFL)
                fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
        with self._lock:
            for i, fd in enumerate(fds, start):
                v = self._vectors[index][i]
                if v.fd is not None:
                    old.append(v.fd)
                v.fd, v.pending = fd, False
                if fd is None:
                    v.masked = False
        return old

    def set_masked(self, index: int, start: int, count: int, masked: bool) -> None:
        """Mask or unmask vectors; unmasking fires what became pending meanwhile."""
        fire: list[int] = []
        with self._lock:
            for v in self._vectors[index][start : start + count]:
                v.masked = masked
                if not masked and v.pending and v.fd is not None:
                    v.pending = False
                    fire.append(v.fd)
        for fd in fire:
            _signal(fd)

    def clear(self) -> list[int]:
        """Forget every eventfd (client gone); returns them for the server to close."""
        fds: list[int] = []
        with self._lock:
            for vectors in self._vectors:
                for v in vectors:
                    if v.fd is not None:
                        fds.append(v.fd)
                    v.fd, v.masked, v.pending = None, False, False
        return fds


def _signal(fd: int) -> None:
    # A saturated counter already signals; a closed or broken fd means the client is gone.
    with contextlib.suppress(OSError):
        os.eventfd_write(fd, 1)


class DeviceBackend(abc.ABC):
    """What the vfio-user server calls. Every callback runs on the server's thread."""

    memory: GuestMemory
    interrupts: Interrupts

    @abc.abstractmethod
    def describe(self) -> DeviceDescription:
        """The static description (called once, before serving)."""

    def attach(self, memory: GuestMemory, interrupts: Interrupts) -> None:
        """Receive the server's guest-memory table and interrupt table (once, before serving)."""
        self.memory = memory
        self.interrupts = interrupts

    @abc.abstractmethod
    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Return exactly ``count`` bytes of region ``index`` at ``offset`` (range pre-checked)."""

    @abc.abstractmethod
    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Apply a write to region ``index`` at ``offset`` (range pre-checked)."""

    def dma_mapped(self, dma_range: DmaRange) -> None:  # noqa: B027 - optional hook
        """A range of guest memory became reachable."""

    def dma_unmapped(self, dma_range: DmaRange) -> None:  # noqa: B027 - optional hook
        """A range is going away: drop views and stop DMA into it before returning."""

    def irqs_changed(self, index: int) -> None:  # noqa: B027 - optional hook
        """The client changed eventfds or masks of IRQ ``index`` (re-raise a level INTx here)."""

    def reset(self) -> None:  # noqa: B027 - optional hook
        """Return to power-on state (DEVICE_RESET); guest memory maps stay."""

    def client_disconnected(self) -> None:  # noqa: B027 - optional hook
        """The client went away (its maps and fds are already dropped); device state stays."""


class PciFunction(DeviceBackend):
    """A DeviceBackend whose config region is a :class:`ConfigSpace`; BARs go to subclasses."""

    def __init__(self, config: ConfigSpace) -> None:
        self.config = config

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        """Config reads come from the model; other regions from :meth:`bar_read`."""
        if index == _CONFIG_INDEX:
            return self.config.read(offset, count)
        return self.bar_read(index, offset, count)

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        """Config writes go through the model's masks, then :meth:`config_written`."""
        if index == RegionIndex.CONFIG:
            flr = self.config.flr_requested(offset, data)
            self.config.write(offset, data)
            if flr:
                self.reset()
            else:
                self.config_written(offset, len(data))
            return
        self.bar_write(index, offset, data)

    def config_region(self) -> Region:
        """The config-space region to put in the description."""
        return Region(RegionIndex.CONFIG, CONFIG_SPACE_SIZE)

    def bar_regions(self, mappable: dict[int, tuple[int, tuple[MmapArea, ...]]] | None = None
                    ) -> tuple[Region, ...]:
        """Regions for each declared BAR; ``mappable`` maps a BAR index to (shm fd, areas)."""
        mappable = mappable or {}
        out = []
        for index, bar in sorted(self.config.bars.items()):
            fd, areas = mappable.get(index, (None, ()))
            out.append(Region(index, bar.size, shm_fd=fd, mmap_areas=areas))
        return tuple(out)

    def reset(self) -> None:
        """Reset config space; subclasses reset their own state and call this."""
        self.config.reset()

    def config_written(self, offset: int, size: int) -> None:
        """React to a config write (command register, MSI-X enable, ...)."""

    def bar_read(self, index: int, offset: int, count: int) -> bytes:
        """Read a trapped BAR; the default is all zeros."""
        return bytes(count)

    def bar_write(self, index: int, offset: int, data: bytes) -> None:
        """Write a trapped BAR; the default ignores it."""
