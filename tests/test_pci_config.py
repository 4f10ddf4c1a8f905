"""PCI config-space model: BAR sizing, masks, RW1C, capabilities, reset (pure, property-based)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.pci import BarKind, CapabilityId, Command, ConfigSpace, ConfigSpaceError, MsixLayout
from egpu.pci import config as c


def make() -> ConfigSpace:
    cs = ConfigSpace(vendor_id=0x1234, device_id=0xABCD, class_code=0x030000, revision=2,
                     subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
    cs.add_bar(0, 16 << 20, BarKind.MEM32, prefetchable=True)
    cs.add_bar(2, 1 << 33, BarKind.MEM64)
    cs.add_bar(4, 256, BarKind.IO)
    cs.add_bar(5, 4096, BarKind.MEM32)
    cs.add_power_management()
    cs.add_msi(4, per_vector_mask=True)
    cs.add_msix(MsixLayout(8, 5, 0x0, 5, 0x800))
    cs.add_pci_express()
    return cs


def u32(cs: ConfigSpace, off: int) -> int:
    return int(struct.unpack("<I", cs.read(off, 4))[0])


def test_identity_fields_are_read_only() -> None:
    cs = make()
    cs.write(0, b"\xff" * 4)
    cs.write(c.CLASS_CODE, b"\x00\x00\x00")
    assert u32(cs, 0) == 0xABCD1234
    assert cs.read(c.CLASS_CODE, 3) == b"\x00\x00\x03"
    assert cs.u16(c.SUBSYSTEM_ID) == 0x1100


def test_bar_sizing_32_bit_prefetchable() -> None:
    cs = make()
    cs.write(c.BAR0, b"\xff" * 4)
    assert u32(cs, c.BAR0) == 0xFF000008  # size mask | prefetchable, 32-bit memory
    cs.write(c.BAR0, struct.pack("<I", 0xE0000000))
    assert cs.bar_address(0) == 0xE0000000


def test_bar_sizing_64_bit() -> None:
    cs = make()
    cs.write(c.BAR0 + 8, b"\xff" * 4)
    cs.write(c.BAR0 + 12, b"\xff" * 4)
    assert u32(cs, c.BAR0 + 8) == 0x00000004  # 8 GiB: low dword has no address bits
    assert u32(cs, c.BAR0 + 12) == 0xFFFFFFFE
    cs.write(c.BAR0 + 12, struct.pack("<I", 0x4))
    assert cs.bar_address(2) == 0x4_0000_0000


def test_io_bar_sizing() -> None:
    cs = make()
    cs.write(c.BAR0 + 16, b"\xff" * 4)
    assert u32(cs, c.BAR0 + 16) == 0xFFFFFF01


def test_unused_bar_and_rom_read_zero_after_all_ones() -> None:
    cs = make()
    cs.write(c.BAR0 + 4, b"\xff" * 4)  # BAR1 unused
    cs.write(c.ROM_ADDRESS, b"\xff" * 4)
    assert u32(cs, c.BAR0 + 4) == 0 and u32(cs, c.ROM_ADDRESS) == 0


def test_command_register_keeps_only_defined_bits() -> None:
    cs = make()
    cs.write(c.COMMAND, b"\xff\xff")
    assert cs.u16(c.COMMAND) == c.COMMAND_WRITABLE
    assert Command.BUS_MASTER in cs.command


def test_status_error_bits_are_write_one_to_clear() -> None:
    cs = make()
    cs.set_u16(c.STATUS, cs.u16(c.STATUS) | c.Status.RECEIVED_MASTER_ABORT)
    cs.write(c.STATUS, b"\x00\x00")
    assert cs.u16(c.STATUS) & c.Status.RECEIVED_MASTER_ABORT
    both = c.Status.RECEIVED_MASTER_ABORT | c.Status.CAPABILITIES_LIST
    cs.write(c.STATUS, struct.pack("<H", both))
    assert not cs.u16(c.STATUS) & c.Status.RECEIVED_MASTER_ABORT
    assert cs.u16(c.STATUS) & c.Status.CAPABILITIES_LIST  # read-only bit survives


def test_capability_list_walks_pm_msi_msix_pcie() -> None:
    cs = make()
    assert cs.u16(c.STATUS) & c.Status.CAPABILITIES_LIST
    seen = []
    ptr = cs.u8(c.CAPABILITIES_POINTER)
    while ptr:
        assert ptr % 4 == 0 and 0x40 <= ptr < 0x100
        seen.append(cs.u8(ptr))
        ptr = cs.u8(ptr + 1)
    assert seen == [0x01, 0x05, 0x11, 0x10]


def test_msix_enable_and_table_location() -> None:
    cs = make()
    off = cs.capability_offset(CapabilityId.MSIX)
    assert off is not None
    assert cs.u16(off + 2) & 0x7FF == 7  # table size - 1
    assert cs.u32(off + 4) == 5 and cs.u32(off + 8) == 0x800 | 5
    assert not cs.msix_enabled
    cs.write(off + 2, struct.pack("<H", 0x8000))
    assert cs.msix_enabled
    cs.write(off + 4, b"\xff" * 8)  # table/PBA registers are read-only
    assert cs.u32(off + 4) == 5


def test_msi_enable_and_vector_count() -> None:
    cs = make()
    off = cs.capability_offset(CapabilityId.MSI)
    assert off is not None
    cs.write(off + 2, struct.pack("<H", 0xFFFF))
    assert cs.msi_enabled
    assert cs.u16(off + 2) & 0x0E == 0x04  # multiple message capable (4) is read-only
    cs.write(off + 4, b"\xff" * 4)
    assert cs.u32(off + 4) == 0xFFFFFFFC  # address is dword aligned


def test_pcie_capability_and_extended_space() -> None:
    cs = make()
    off = cs.capability_offset(CapabilityId.PCI_EXPRESS)
    assert off is not None
    assert cs.u16(off + 2) & 0xF == 2
    assert cs.u32(off + c.PCIE_DEVCAP) & c.PCIE_DEVCAP_FLR
    assert cs.read(0x100, 4) == b"\0\0\0\0"  # extended capability list is empty
    assert len(cs.read(0, 4096)) == 4096
    assert cs.flr_requested(off + c.PCIE_DEVCTL, struct.pack("<H", 0x8000))


def test_reset_restores_built_values() -> None:
    cs = make()
    before = cs.read(0, 4096)
    cs.write(c.COMMAND, b"\x07\x00")
    cs.write(c.BAR0, b"\xff" * 4)
    cs.reset()
    assert cs.read(0, 4096) == before


def test_power_state_is_writable() -> None:
    cs = make()
    off = cs.capability_offset(CapabilityId.POWER_MANAGEMENT)
    assert off is not None
    cs.write(off + 4, b"\x03\x00")
    assert cs.power_state == 3


@pytest.mark.parametrize(
    ("index", "size", "kind"),
    [(6, 4096, BarKind.MEM32), (5, 4096, BarKind.MEM64), (0, 3000, BarKind.MEM32),
     (0, 8, BarKind.MEM32), (0, 512, BarKind.IO), (0, 1 << 32, BarKind.MEM32)],
)
def test_impossible_bars_are_refused(index: int, size: int, kind: BarKind) -> None:
    cs = ConfigSpace(vendor_id=1, device_id=2, class_code=0)
    with pytest.raises(ConfigSpaceError):
        cs.add_bar(index, size, kind)


def test_overlapping_bars_and_misplaced_msix_are_refused() -> None:
    cs = ConfigSpace(vendor_id=1, device_id=2, class_code=0)
    cs.add_bar(0, 4096, BarKind.MEM64)
    with pytest.raises(ConfigSpaceError):
        cs.add_bar(1, 4096)
    with pytest.raises(ConfigSpaceError):
        cs.add_msix(MsixLayout(512, 0, 0, 0, 0x1000))  # table does not fit the BAR
    with pytest.raises(ConfigSpaceError):
        cs.add_msix(MsixLayout(4, 3, 0, 3, 0x800))  # no such BAR


@given(st.integers(0, 4095), st.binary(min_size=1, max_size=8))
def test_writes_only_change_writable_bits(offset: int, data: bytes) -> None:
    cs = make()
    data = data[: 4096 - offset]
    before = cs.read(0, 4096)
    cs.write(offset, data)
    after = cs.read(0, 4096)
    for i in range(4096):
        changed = before[i] ^ after[i]
        assert changed & ~(cs._wmask[i] | cs._w1cmask[i]) == 0
    # identity never changes, whatever is written where
    assert after[:4] == before[:4] and after[8:12] == before[8:12]
