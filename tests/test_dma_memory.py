"""Guest-memory table: real memfd mappings, bounds checks, exact unmap, pinned views."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.dma import DmaAccessError, DmaMapError, DmaProt, GuestMemory

RW = DmaProt.READ | DmaProt.WRITE
MIB = 1 << 20
UNMAP_BLOCK_WINDOW_S = 0.2  # how long a blocked unmap is watched for returning early


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, 4 * MIB)
    yield fd
    os.close(fd)


def test_read_write_through_the_fd(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0x100000, MIB, RW, memfd, 0)
    mem.write(0x100010, b"hello")
    assert os.pread(memfd, 5, 0x10) == b"hello"  # same pages as the client's
    os.pwrite(memfd, b"world", 0x20)
    assert mem.read(0x100020, 5) == b"world"


def test_access_across_two_adjacent_mappings(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0x0, MIB, RW, memfd, 0)
    mem.add(MIB, MIB, RW, memfd, 2 * MIB)
    mem.write(MIB - 2, b"abcd")
    assert mem.read(MIB - 2, 4) == b"abcd"
    assert os.pread(memfd, 2, 2 * MIB) == b"cd"


@pytest.mark.parametrize(("address", "count"), [
    (0x100000 - 1, 2),           # starts before the map
    (0x100000 + MIB - 1, 2),     # runs past its end
    (0x500000, 1),               # nowhere near
    (0x100000 + MIB, 0x1000),    # right after it
])
def test_access_outside_mappings_is_refused(memfd: int, address: int, count: int) -> None:
    mem = GuestMemory()
    mem.add(0x100000, MIB, RW, memfd, 0)
    with pytest.raises(DmaAccessError):
        mem.read(address, count)
    with pytest.raises(DmaAccessError):
        mem.write(address, b"x" * count)


def test_protection_is_enforced(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0, MIB, DmaProt.READ, memfd, 0)
    mem.read(0, 4)
    with pytest.raises(DmaAccessError):
        mem.write(0, b"x")


def test_overlapping_map_is_refused_with_eexist(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0x10000, 0x10000, RW, memfd, 0)
    for iova, size in [(0x10000, 0x1000), (0x8000, 0x9000), (0x1F000, 0x2000)]:
        with pytest.raises(DmaMapError) as e:
            mem.add(iova, size, RW, memfd, 0)
        assert e.value.errno == errno.EEXIST
    mem.add(0x20000, 0x1000, RW, memfd, 0)  # adjacent is fine


def test_unmap_needs_an_exact_match(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0x10000, 0x10000, RW, memfd, 0)
    for iova, size in [(0x10000, 0x1000), (0x11000, 0xF000), (0x20000, 0x10000)]:
        with pytest.raises(DmaMapError) as e:
            mem.remove(iova, size)
        assert e.value.errno == errno.ENOENT
    mem.remove(0x10000, 0x10000)
    assert mem.ranges() == ()
    with pytest.raises(DmaAccessError):
        mem.read(0x10000, 1)


def test_map_larger_than_its_file_is_refused(memfd: int) -> None:
    mem = GuestMemory()
    with pytest.raises(DmaMapError) as e:
        mem.add(0, 8 * MIB, RW, memfd, 0)  # touching the tail would SIGBUS
    assert e.value.errno == errno.EINVAL
    with pytest.raises(DmaMapError):
        mem.add(0, MIB, RW, memfd, 123)  # unaligned offset
    r, w = os.pipe()
    try:
        with pytest.raises(DmaMapError):
            mem.add(0, 4096, RW, r, 0)  # not a file
    finally:
        os.close(r)
        os.close(w)


def test_view_is_zero_copy_and_unmap_waits_for_it(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0, MIB, RW, memfd, 0)
    removed = threading.Event()
    with mem.view(0x1000, 16, writable=True) as v:
        v[:4] = b"ABCD"
        assert os.pread(memfd, 4, 0x1000) == b"ABCD"
        def remove() -> None:
            mem.remove(0, MIB)
            removed.set()

        t = threading.Thread(target=remove)
        t.start()
        # unmap stays blocked while the view is pinned: given time, it still has not returned
        assert not removed.wait(UNMAP_BLOCK_WINDOW_S)
        v[4:8] = b"EFGH"
    t.join(5)
    assert removed.is_set()
    assert os.pread(memfd, 8, 0x1000) == b"ABCDEFGH"


def test_readonly_view_and_views_cannot_cross_maps(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0, MIB, RW, memfd, 0)
    mem.add(MIB, MIB, RW, memfd, MIB)
    with mem.view(0, 4) as v:
        assert v.readonly
    with pytest.raises(DmaAccessError), mem.view(MIB - 4, 8):
        pass


class _FakeClientMemory:
    """Stands in for the client side of DMA_READ/DMA_WRITE (no fd)."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self.buf = base, bytearray(size)

    def dma_read(self, address: int, count: int) -> bytes:
        return bytes(self.buf[address - self.base : address - self.base + count])

    def dma_write(self, address: int, data: bytes) -> None:
        self.buf[address - self.base : address - self.base + len(data)] = data


def test_ranges_without_fd_go_through_the_remote(memfd: int) -> None:
    remote = _FakeClientMemory(0x200000, 0x1000)
    mem = GuestMemory(remote)
    mem.add(0x200000, 0x1000, RW)
    mem.write(0x200010, b"remote")
    assert remote.buf[0x10:0x16] == b"remote"
    assert mem.read(0x200010, 6) == b"remote"
    with pytest.raises(DmaAccessError), mem.view(0x200000, 4):
        pass
    lonely = GuestMemory()  # no client to ask
    lonely.add(0, 4096, RW)
    with pytest.raises(DmaAccessError):
        lonely.read(0, 1)


def test_clear_drops_everything(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0, MIB, RW, memfd, 0)
    mem.add(2 * MIB, MIB, RW, memfd, 0)
    assert len(mem.clear()) == 2
    assert mem.ranges() == ()


@given(st.lists(st.tuples(st.integers(0, 64), st.integers(1, 16)), max_size=12),
       st.integers(0, 80 * 4096), st.integers(0, 16 * 4096))
def test_accesses_succeed_exactly_when_fully_mapped(
    maps: list[tuple[int, int]], address: int, count: int
) -> None:
    fd = os.memfd_create("prop")
    os.ftruncate(fd, 16 * 4096)
    try:
        mem = GuestMemory()
        covered: set[int] = set()
        for page, pages in maps:
            try:
                mem.add(page * 4096, pages * 4096, RW, fd, 0)
            except DmaMapError:
                continue
            covered.update(range(page * 4096, (page + pages) * 4096))
        inside = all(a in covered for a in range(address, address + count))
        try:
            mem.read(address, count)
            assert inside
        except DmaAccessError:
            assert not inside
        mem.clear()
    finally:
        os.close(fd)


def test_buffer_types_on_fast_and_split_paths(memfd: int) -> None:
    mem = GuestMemory()
    mem.add(0, MIB, RW, memfd, 0)
    mem.add(MIB, MIB, RW, memfd, 2 * MIB)
    for base in (0x100, MIB - 6):  # inside one mapping, then across two
        words = memoryview(bytearray(range(12))).cast("I")  # not a byte view
        mem.write(base, words)
        assert mem.read(base, 12) == bytes(range(12))
        mem.write(base, memoryview(b"abcdefghijkl")[2:8])
        out = bytearray(16)
        mem.readinto(base, memoryview(out)[4:10])
        assert out[4:10] == b"cdefgh"
        mem.readinto(base, out)
        assert out[:6] == b"cdefgh"
