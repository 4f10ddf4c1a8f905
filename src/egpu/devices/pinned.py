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
        # The last scatter list's windows: segments, direction, views. Programs reuse buffers,
        # so the next transfer is often the same list; its views share the pins' buffers and
        # are dropped before any pin is released.
        self._scatter: tuple[list[tuple[int, int]], bool, list[memoryview]] | None = None
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
        self._drop_scatter()
        keep = []
        for pin in self._pins:
            if pin[0] < rng.end and rng.iova < pin[1]:
                pin[4].close()
            else:
                keep.append(pin)
        self._pins = keep

    def unpin_all(self) -> None:
        """Release every pin (client gone)."""
        self._drop_scatter()
        for pin in self._pins:
            pin[4].close()
        self._pins = []

    def _drop_scatter(self) -> None:
        if self._scatter is not None:
            for view in self._scatter[2]:
                view.release()
            self._scatter = None

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

    def windows(self, segments: list[tuple[int, int]], write: bool) -> list[memoryview] | None:
        """Views of every ``(address, count)`` segment, or None when one is not pinned whole.

        The views stay valid until the next call or unpin; callers use them at once.
        """
        last = self._scatter
        if last is not None and last[1] == write and last[0] == segments:
            return last[2]  # one C-level list compare instead of a lookup per segment
        views = []
        start = end = 0
        view = memoryview(b"")
        for addr, n in segments:
            if not (start <= addr and addr + n <= end):
                # Scatter lists mostly stay in one range: look up only when leaving it.
                found = self.lookup(addr, n, write)
                if found is None:
                    return None
                start, end, view = found
            offset = addr - start
            views.append(view[offset:offset + n])
        self._drop_scatter()
        self._scatter = (list(segments), write, views)
        return views
