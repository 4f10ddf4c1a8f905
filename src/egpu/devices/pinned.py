"""Zero-copy windows onto whole fd-backed DMA ranges, pinned from DMA_MAP to DMA_UNMAP.

A device's hot path (queue entries, completion entries, data buffers) would otherwise pay a
table lookup, a lock and a pin per access through :meth:`GuestMemory.view`. Instead the device
pins one view per mapped range when the server reports it (``dma_mapped``) and releases it when
the server reports the range going away (``dma_unmapped`` runs before the server removes the
range, and removal waits for pins, so no reference outlives the DMA_UNMAP reply).

Every window is bounds-checked here against the range it comes from; an address that is not
entirely inside one pinned range gets ``None`` and the caller falls back to the
:class:`GuestMemory` methods (which handle ranges without fds and accesses that span ranges).
"""

from __future__ import annotations

import contextlib

from egpu.dma import DmaError, DmaProt, DmaRange, GuestMemory


class PinnedGuestMemory:
    """Pinned views of the fd-backed DMA ranges of a :class:`GuestMemory`."""

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        # (start, end, view, writable, its pin); few entries: QEMU maps RAM in a handful of ranges
        self._pins: list[tuple[int, int, memoryview, bool, contextlib.ExitStack]] = []
        for rng in memory.ranges():
            self.pin(rng)

    def pin(self, rng: DmaRange) -> None:
        """Pin a newly mapped range (ranges without an fd or not readable are skipped)."""
        if not rng.has_fd or not rng.prot & DmaProt.READ:
            return
        writable = bool(rng.prot & DmaProt.WRITE)
        stack = contextlib.ExitStack()
        try:
            view = stack.enter_context(self.memory.view(rng.iova, rng.size, writable=writable))
        except DmaError:
            stack.close()
            return
        self._pins.append((rng.iova, rng.end, view, writable, stack))

    def unpin(self, rng: DmaRange) -> None:
        """Release the pin of a range that is going away."""
        keep = []
        for pin in self._pins:
            if pin[0] < rng.end and rng.iova < pin[1]:
                pin[4].close()
            else:
                keep.append(pin)
        self._pins = keep

    def unpin_all(self) -> None:
        """Release every pin (client gone)."""
        for pin in self._pins:
            pin[4].close()
        self._pins = []

    def lookup(self, address: int, count: int, write: bool) -> tuple[int, int, memoryview] | None:
        """(start, end, view) of the pinned range holding ``count`` bytes at ``address``."""
        for start, end, view, writable, _ in self._pins:
            if start <= address and address + count <= end:
                return (start, end, view) if writable or not write else None
        return None

    def window(self, address: int, count: int, write: bool) -> memoryview | None:
        """A view of ``count`` bytes at ``address`` inside one pinned range, or None."""
        for start, end, view, writable, _ in self._pins:
            if start <= address and address + count <= end:
                if write and not writable:
                    return None
                offset = address - start
                return view[offset:offset + count]
        return None
