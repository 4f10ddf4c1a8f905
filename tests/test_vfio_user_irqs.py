"""The interrupt table and device description of the device boundary (devices/base.py)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from egpu.devices.base import (
    DeviceDescription,
    DeviceModelError,
    Interrupts,
    IrqIndex,
    IrqLine,
    MmapArea,
    Region,
    is_eventfd,
)

DESC = DeviceDescription(
    regions=(Region(0, 4096), Region(7, 4096)),
    irqs=(IrqLine(IrqIndex.INTX, 1), IrqLine(IrqIndex.MSI, 1), IrqLine(IrqIndex.MSIX, 4)),
)


@pytest.fixture
def efds() -> Iterator[list[int]]:
    fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(4)]
    yield fds
    for fd in fds:
        os.close(fd)


def pending(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def test_trigger_needs_an_fd_and_respects_masks(efds: list[int]) -> None:
    irqs = Interrupts(DESC)
    assert not irqs.trigger(IrqIndex.MSIX, 0)
    assert irqs.set_fds(IrqIndex.MSIX, 0, [os.dup(efds[0]), os.dup(efds[1])]) == []
    assert irqs.trigger(IrqIndex.MSIX, 1) and pending(efds[1]) == 1
    irqs.set_masked(IrqIndex.MSIX, 0, 1, True)
    assert not irqs.trigger(IrqIndex.MSIX, 0) and pending(efds[0]) == 0
    irqs.set_masked(IrqIndex.MSIX, 0, 1, False)  # the pending one fires on unmask
    assert pending(efds[0]) == 1
    assert not irqs.trigger(IrqIndex.MSIX, 9)  # out of range: ignored, never an IndexError
    assert not irqs.trigger(17, 0)
    for fd in irqs.clear():
        os.close(fd)


def test_intx_automasks(efds: list[int]) -> None:
    irqs = Interrupts(DESC)
    irqs.set_fds(IrqIndex.INTX, 0, [os.dup(efds[0])])
    assert irqs.trigger(IrqIndex.INTX)
    assert not irqs.trigger(IrqIndex.INTX)  # masked until the client unmasks
    assert pending(efds[0]) == 1
    irqs.set_masked(IrqIndex.INTX, 0, 1, False)
    assert pending(efds[0]) == 1
    for fd in irqs.clear():
        os.close(fd)


def test_replacing_and_clearing_hand_back_fds(efds: list[int]) -> None:
    irqs = Interrupts(DESC)
    first = os.dup(efds[0])
    irqs.set_fds(IrqIndex.MSI, 0, [first])
    assert irqs.enabled_index() == IrqIndex.MSI
    second = os.dup(efds[1])
    assert irqs.set_fds(IrqIndex.MSI, 0, [second]) == [first]
    os.close(first)
    third = os.dup(efds[2])
    irqs.set_fds(IrqIndex.MSIX, 2, [third])
    assert irqs.enabled_index() == IrqIndex.MSIX  # MSI-X wins, as a driver would use it
    assert sorted(irqs.clear()) == sorted([second, third])
    os.close(second)
    os.close(third)
    assert irqs.enabled_index() is None


def test_is_eventfd(efds: list[int]) -> None:
    r, w = os.pipe()
    try:
        assert is_eventfd(efds[0]) and not is_eventfd(r) and not is_eventfd(9999)
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("bad", [
    lambda: DeviceDescription((Region(9, 1),), ()),  # index past num_regions
    lambda: DeviceDescription((Region(0, 1), Region(0, 2)), ()),  # twice
    lambda: DeviceDescription((Region(0, 4096, mmap_areas=(MmapArea(4000, 200),)),), ()),
    lambda: DeviceDescription((), (IrqLine(5, 1),)),  # IRQ index past num_irqs
    lambda: DeviceDescription((), (IrqLine(2, 0),)),  # no vectors
    lambda: DeviceDescription((), (), num_regions=101),  # more than QEMU accepts
])
def test_impossible_descriptions_are_refused(bad: object) -> None:
    with pytest.raises(DeviceModelError):
        bad()  # type: ignore[operator]


def test_region_lookup_and_sparse_areas() -> None:
    r = Region(2, 8192, shm_fd=5)
    assert r.sparse_areas() == (MmapArea(0, 8192),)
    assert Region(2, 8192).sparse_areas() == ()
    assert DESC.region(0) is not None and DESC.region(3) is None
    assert DESC.irq_count(IrqIndex.MSIX) == 4 and DESC.irq_count(IrqIndex.ERR) == 0
