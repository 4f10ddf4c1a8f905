"""The guest-memory table: DMA_MAP ranges, mmapped when they come with an fd, bounds-checked.

Device models reach guest memory only through :class:`GuestMemory`. An address range that is not
entirely covered by mapped ranges raises :class:`DmaAccessError` before any byte is touched, so a
hostile guest programming a wild DMA address cannot make the server read or write outside what the
client mapped. Ranges that came without an fd are reached through a :class:`RemoteDma` (the server
sends DMA_READ / DMA_WRITE to the client).
"""

from __future__ import annotations

import bisect
import contextlib
import enum
import errno
import mmap
import os
import stat
import threading
from dataclasses import dataclass
from typing import Protocol

from egpu.errors import DeviceServerError

PAGE_SIZE = mmap.PAGESIZE


class DmaError(DeviceServerError):
    """Guest-memory table failure."""


class DmaMapError(DmaError):
    """A DMA_MAP / DMA_UNMAP request cannot be honoured (overlap, no such range, bad fd)."""

    def __init__(self, message: str, errno_value: int) -> None:
        super().__init__(message)
        self.errno = errno_value


class DmaAccessError(DmaError):
    """A device reached guest memory outside the mapped ranges or against their protection."""


class DmaProt(enum.IntFlag):
    """Protection of a mapped range, as the client granted it."""

    READ = 1
    WRITE = 2


class RemoteDma(Protocol):
    """Reaches guest memory that came without an fd (vfio-user DMA_READ / DMA_WRITE)."""

    def dma_read(self, address: int, count: int) -> bytes:
        """Ask the client for ``count`` bytes at ``address``."""
        ...

    def dma_write(self, address: int, data: bytes) -> None:
        """Ask the client to store ``data`` at ``address``."""
        ...


@dataclass(frozen=True)
class DmaRange:
    """One mapped range of guest (IO virtual) addresses."""

    iova: int
    size: int
    prot: DmaProt
    has_fd: bool

    @property
    def end(self) -> int:
        """First address after the range."""
        return self.iova + self.size


class _Mapping:
    """A table entry; plain attributes because every DMA access reads them."""

    __slots__ = ("end", "iova", "mm", "pins", "prot", "range", "view")

    def __init__(self, rng: DmaRange, mm: mmap.mmap | None, view: memoryview | None) -> None:
        self.range = rng
        self.iova = rng.iova
        self.end = rng.end
        self.prot = int(rng.prot)  # an int: IntFlag arithmetic is slow on the access path
        self.mm = mm
        self.view = view
        self.pins = 0


_READ = int(DmaProt.READ)
_WRITE = int(DmaProt.WRITE)


class _PinnedView:
    """Context manager of :meth:`GuestMemory.view`: keeps its mapping alive until exit."""

    __slots__ = ("_mapping", "_memory", "_views")

    def __init__(self, memory: GuestMemory, mapping: _Mapping, *views: memoryview) -> None:
        self._memory, self._mapping, self._views = memory, mapping, views

    def __enter__(self) -> memoryview:
        return self._views[-1]

    def __exit__(self, *_exc: object) -> None:
        for v in reversed(self._views):
            v.release()
        self._memory._unpin(self._mapping)


class GuestMemory:
    """Bounds-checked access to guest memory by IO virtual address. Thread-safe."""

    def __init__(self, remote: RemoteDma | None = None) -> None:
        self._lock = threading.Lock()
        self._unpinned = threading.Condition(self._lock)
        self._starts: list[int] = []  # sorted iova of each mapping, parallel to _maps
        self._maps: list[_Mapping] = []
        self.remote = remote

    # -- table management (server side) -------------------------------------------------------

    def add(self, iova: int, size: int, prot: DmaProt, fd: int | None = None, offset: int = 0
            ) -> DmaRange:
        """Map ``size`` bytes at ``iova``; ``fd`` (borrowed, not kept) is mmapped at ``offset``.

        Raises DmaMapError (EINVAL) for an empty or overlapping range or a failing mmap.
        """
        if size <= 0 or iova < 0 or iova + size > 1 << 64:
            raise DmaMapError(f"DMA range {iova:#x}+{size:#x} is empty or out of range",
                              errno.EINVAL)
        mm: mmap.mmap | None = None
        view: memoryview | None = None
        if fd is not None:
            access = mmap.PROT_READ | (mmap.PROT_WRITE if prot & DmaProt.WRITE else 0)
            if offset % PAGE_SIZE or offset < 0:
                raise DmaMapError(f"DMA map offset {offset:#x} not page aligned", errno.EINVAL)
            # Touching a page past the end of the file raises SIGBUS and kills the server, so a
            # map larger than what backs it is refused here (memfd, shm and files are regular).
            try:
                st = os.fstat(fd)
            except OSError as e:
                raise DmaMapError(f"DMA map fd is unusable: {e}", errno.EBADF) from e
            if not stat.S_ISREG(st.st_mode) or st.st_size < offset + size:
                raise DmaMapError(
                    f"DMA range {iova:#x}+{size:#x} is not backed by its file", errno.EINVAL
                )
            try:
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=access, offset=offset)
            except (OSError, ValueError, OverflowError) as e:
                raise DmaMapError(f"cannot mmap DMA range {iova:#x}+{size:#x}: {e}",
                                  errno.EINVAL) from e
            view = memoryview(mm)
        rng = DmaRange(iova, size, prot, fd is not None)
        with self._lock:
            i = bisect.bisect_right(self._starts, iova)
            overlaps = (i > 0 and self._maps[i - 1].end > iova) or (
                i < len(self._maps) and self._starts[i] < iova + size
            )
            if overlaps:
                if view is not None and mm is not None:
                    view.release()
                    mm.close()
                raise DmaMapError(f"DMA range {iova:#x}+{size:#x} overlaps a mapped range",
                                  errno.EEXIST)
            self._starts.insert(i, iova)
            self._maps.insert(i, _Mapping(rng, mm, view))
        return rng

    def remove(self, iova: int, size: int) -> DmaRange:
        """Unmap exactly the range mapped at ``iova`` of ``size``; waits for pinned views to go.

        Raises DmaMapError (ENOENT) when no mapping matches exactly.
        """
        with self._lock:
            i = bisect.bisect_left(self._starts, iova)
            if i >= len(self._maps) or self._starts[i] != iova or self._maps[i].range.size != size:
                raise DmaMapError(f"no DMA mapping is exactly {iova:#x}+{size:#x}", errno.ENOENT)
            m = self._maps.pop(i)
            del self._starts[i]
        self._release(m)
        return m.range

    def clear(self) -> list[DmaRange]:
        """Unmap everything (client disconnect); returns what was mapped."""
        with self._lock:
            maps, self._maps, self._starts = self._maps, [], []
        for m in maps:
            self._release(m)
        return [m.range for m in maps]

    def _release(self, m: _Mapping) -> None:
        # Every reference is dropped before DMA_UNMAP is answered (QEMU docs/interop/
        # vfio-user.rst, VFIO_USER_DMA_UNMAP): wait until
        # views handed out by ``view()`` are returned, then close the mapping.
        with self._unpinned:
            self._unpinned.wait_for(lambda: m.pins == 0)
        if m.view is not None:
            m.view.release()
        if m.mm is not None:
            # A device that kept a slice of a view past its ``with`` block keeps the mapping
            # alive until that slice is collected; the table no longer lists the range.
            with contextlib.suppress(BufferError):
                m.mm.close()

    def _unpin(self, m: _Mapping) -> None:
        with self._lock:  # the lock behind _unpinned
            m.pins -= 1
            if m.pins == 0:
                self._unpinned.notify_all()

    def ranges(self) -> tuple[DmaRange, ...]:
        """The mapped ranges, in address order."""
        with self._lock:
            return tuple(m.range for m in self._maps)

    # -- device side --------------------------------------------------------------------------

    def _hit(self, address: int, count: int, need: int) -> tuple[_Mapping, int] | None:
        """The fd-backed mapping holding all of ``address..+count`` with ``need``, if one does.

        The common case (one mapping, shared memory); anything else takes :meth:`_find`.
        """
        i = bisect.bisect_right(self._starts, address) - 1
        if i >= 0 and address >= 0 and count >= 0:
            m = self._maps[i]
            if address + count <= m.end and m.prot & need == need and m.view is not None:
                return m, address - m.iova
        return None

    def _find(self, address: int, count: int, need: int) -> list[tuple[_Mapping, int, int]]:
        """Split ``address..+count`` into (mapping, offset, length) pieces or raise."""
        if count < 0 or address < 0:
            raise DmaAccessError(f"DMA access {address:#x}+{count:#x} is invalid")
        pieces: list[tuple[_Mapping, int, int]] = []
        pos, end = address, address + count
        i = bisect.bisect_right(self._starts, address) - 1
        while pos < end:
            if i < 0 or i >= len(self._maps):
                break
            m = self._maps[i]
            if not m.iova <= pos < m.end:
                break
            if m.prot & need != need:
                what = "write" if need == _WRITE else "read"
                raise DmaAccessError(f"DMA {what} of {pos:#x} not permitted by its mapping")
            n = min(end, m.end) - pos
            pieces.append((m, pos - m.iova, n))
            pos += n
            i += 1
        if pos < end:
            raise DmaAccessError(
                f"DMA access {address:#x}+{count:#x} reaches unmapped guest memory at {pos:#x}"
            )
        return pieces

    def read(self, address: int, count: int) -> bytes:
        """Copy ``count`` bytes of guest memory at ``address``."""
        with self._lock:
            hit = self._hit(address, count, _READ)
            if hit is not None:
                m, off = hit
                assert m.view is not None
                return m.view[off : off + count].tobytes()
        out = bytearray(count)
        self.readinto(address, out)
        return bytes(out)

    def readinto(self, address: int, buffer: bytearray | memoryview) -> None:
        """Fill ``buffer`` from guest memory at ``address``."""
        if isinstance(buffer, bytearray) or (buffer.format == "B" and buffer.ndim == 1):
            n = len(buffer)
            with self._lock:
                hit = self._hit(address, n, _READ)
                if hit is not None:
                    m, off = hit
                    assert m.view is not None
                    buffer[:n] = m.view[off : off + n]
                    return
        dest = memoryview(buffer).cast("B")
        remote: list[tuple[int, int, int]] = []
        with self._lock:
            pos = 0
            for m, off, n in self._find(address, len(dest), _READ):
                if m.view is not None:
                    dest[pos : pos + n] = m.view[off : off + n]
                else:
                    remote.append((m.iova + off, pos, n))
                pos += n
        for addr, pos, n in remote:
            dest[pos : pos + n] = self._remote().dma_read(addr, n)

    def write(self, address: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` into guest memory at ``address``."""
        if not isinstance(data, memoryview) or (data.format == "B" and data.ndim == 1):
            n = len(data)
            with self._lock:
                hit = self._hit(address, n, _WRITE)
                if hit is not None:
                    m, off = hit
                    assert m.view is not None
                    m.view[off : off + n] = data
                    return
        src = memoryview(data).cast("B")
        remote: list[tuple[int, bytes]] = []
        with self._lock:
            pos = 0
            for m, off, n in self._find(address, len(src), _WRITE):
                if m.view is not None:
                    m.view[off : off + n] = src[pos : pos + n]
                else:
                    remote.append((m.iova + off, bytes(src[pos : pos + n])))
                pos += n
        for addr, chunk in remote:
            self._remote().dma_write(addr, chunk)

    def view(self, address: int, count: int, *, writable: bool = False) -> _PinnedView:
        """Zero-copy memoryview of ``count`` bytes at ``address`` inside one fd-backed mapping.

        Use as ``with memory.view(addr, n) as v:``; the mapping stays alive (an unmap waits)
        until the block exits; do not keep the view afterwards. Raises DmaAccessError when the
        range is unmapped, crosses mappings or has no fd.
        """
        with self._lock:
            hit = self._hit(address, count, _WRITE if writable else _READ)
            if hit is None:
                self._find(address, count, _WRITE if writable else _READ)  # the precise error
                raise DmaAccessError(
                    f"DMA range {address:#x}+{count:#x} is not inside one shared-memory mapping"
                )
            m, off = hit
            assert m.view is not None
            m.pins += 1
        sub = m.view[off : off + count]
        if writable:
            return _PinnedView(self, m, sub)
        return _PinnedView(self, m, sub, sub.toreadonly())

    def _remote(self) -> RemoteDma:
        if self.remote is None:
            raise DmaAccessError("guest memory without an fd and no client to ask for it")
        return self.remote
