"""Pinned windows onto guest memory (the NVMe hot path): exact bounds, protection, release."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.devices.pinned import PinnedGuestMemory
from egpu.dma import DmaProt, GuestMemory

A, A_SIZE = 0x10000, 0x8000  # read-write
B, B_SIZE = 0x18000, 0x4000  # read-only, adjacent to A
C, C_SIZE = 0x40000, 0x1000  # no fd: never pinned


class Remote:
    def dma_read(self, address: int, count: int) -> bytes:
        return bytes(count)

    def dma_write(self, address: int, data: bytes) -> None:
        pass


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory(Remote())
    for base, size, prot in ((A, A_SIZE, DmaProt.READ | DmaProt.WRITE), (B, B_SIZE, DmaProt.READ)):
        fd = os.memfd_create("pinned-test")
        os.ftruncate(fd, size)
        os.pwrite(fd, os.urandom(size), 0)
        mem.add(base, size, prot, fd)
        os.close(fd)
    mem.add(C, C_SIZE, DmaProt.READ | DmaProt.WRITE)
    yield mem
    mem.clear()


@given(address=st.one_of(st.integers(0, 1 << 64), st.integers(A - 16, C + C_SIZE + 16)),
       count=st.integers(1, 0x10000), write=st.booleans())
def test_windows_are_exact_or_absent(memory: GuestMemory, address: int, count: int,
                                     write: bool) -> None:
    pinned = PinnedGuestMemory(memory)
    try:
        w = pinned.window(address, count, write)
        inside_a = address >= A and address + count <= A + A_SIZE
        inside_b = address >= B and address + count <= B + B_SIZE
        if w is None:
            assert not inside_a and not (inside_b and not write)
        else:
            assert inside_a or (inside_b and not write)
            assert len(w) == count
            assert bytes(w) == memory.read(address, count)
            assert w.readonly == (not inside_a)
            del w
    finally:
        pinned.unpin_all()


def _b_removes_at_once(memory: GuestMemory) -> bool:
    """Remove range B and map it again; False when the removal waited (a pin still held)."""
    done = threading.Event()

    def remove_and_restore() -> None:
        memory.remove(B, B_SIZE)
        fd = os.memfd_create("pinned-test")
        os.ftruncate(fd, B_SIZE)
        memory.add(B, B_SIZE, DmaProt.READ, fd)
        os.close(fd)
        done.set()

    t = threading.Thread(target=remove_and_restore)
    t.start()
    t.join(timeout=10)
    return done.is_set()


def test_unpin_lets_the_range_go(memory: GuestMemory) -> None:
    pinned = PinnedGuestMemory(memory)
    rng = next(r for r in memory.ranges() if r.iova == B)
    assert pinned.window(B, 16, False) is not None
    pinned.unpin(rng)
    assert pinned.window(B, 16, False) is None
    # Without the pin a removal completes at once (with it, remove() would wait for it).
    assert _b_removes_at_once(memory)
    pinned.unpin_all()


def test_scatter_windows_are_exact_and_follow_the_list(memory: GuestMemory) -> None:
    pinned = PinnedGuestMemory(memory)
    try:
        first = [(A, 0x1000), (A + 0x3000, 0x200), (B, 0x100)]
        views = pinned.windows(first, False)
        assert views is not None
        assert [bytes(v) for v in views] == [memory.read(a, n) for a, n in first]
        # The same list again (a new but equal list object) gets the same views...
        assert pinned.windows(list(first), False) is views
        # ...a list that differs in one segment gets its own...
        moved = [*first[:2], (B + 0x800, 0x100)]
        again = pinned.windows(moved, False)
        assert again is not None and bytes(again[2]) == memory.read(B + 0x800, 0x100)
        # ...and the direction is part of the key: B is read-only, so no writable views.
        assert pinned.windows(moved, True) is None
        assert pinned.windows([(A, 0x10)], True) is not None
        # Segments outside every pinned range, or straddling two ranges, get none.
        assert pinned.windows([(C, 0x10)], False) is None
        assert pinned.windows([(B - 8, 0x10)], False) is None
    finally:
        pinned.unpin_all()


def test_cached_scatter_windows_never_hold_a_range_that_goes_away(memory: GuestMemory) -> None:
    pinned = PinnedGuestMemory(memory)
    rng = next(r for r in memory.ranges() if r.iova == B)
    views = pinned.windows([(B, 0x100)], False)
    assert views is not None
    pinned.unpin(rng)
    # The views of the last list were released with the pin: none keeps B's mapping alive.
    with pytest.raises(ValueError):
        bytes(views[0])
    assert pinned.windows([(B, 0x100)], False) is None
    assert _b_removes_at_once(memory)
    pinned.unpin_all()
