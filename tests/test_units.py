"""The one size parser (egpu.units) and the options that use it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.devices import device_options
from egpu.devices.nvme.function import SIZE as NVME_SIZE
from egpu.engine.argv import parse_memory
from egpu.errors import UsageError
from egpu.units import GIB, KIB, MIB, TIB, format_size, parse_size

UNITS = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}


@given(st.integers(min_value=1, max_value=1 << 50))
def test_format_size_reads_back(size: int) -> None:
    assert parse_size(format_size(size)) == size


@given(st.integers(min_value=1, max_value=1 << 20), st.sampled_from(sorted(UNITS)),
       st.sampled_from(["", "i", "B", "iB", "b", "ib"]), st.booleans())
def test_unit_spellings(number: int, unit: str, tail: str, lower: bool) -> None:
    text = f"{number}{unit.lower() if lower else unit}{tail}"
    assert parse_size(text) == number * UNITS[unit]


@given(st.text(max_size=12))
def test_never_crashes(text: str) -> None:
    try:
        size = parse_size(text)
    except UsageError:
        return
    assert size > 0


def test_bare_numbers_are_in_the_unit_the_option_declares() -> None:
    assert parse_size("4096") == 4096  # bytes unless the option says otherwise
    assert parse_size("4096B") == 4096
    assert parse_size("512", bare_unit=MIB) == 512 * MIB
    assert parse_memory("512") == 512  # --memory documents MiB, as QEMU's -m does
    assert NVME_SIZE.parse("2097152") == 2 * MIB  # nvme's size documents bytes


def test_fractions_must_land_on_whole_units() -> None:
    assert parse_size("1.5G") == 3 * GIB // 2
    assert parse_size("1.5K") == 1536
    with pytest.raises(UsageError, match="not a whole number of bytes"):
        parse_size("1.0001K")
    with pytest.raises(UsageError, match="not a whole number of MiB"):
        parse_size("1.5M", granule=MIB)


@pytest.mark.parametrize("text", ["", "0", "0M", "-1", "1X", "M", "1 G B", "\u0661M", "1e3"])
def test_refused(text: str) -> None:
    with pytest.raises(UsageError):
        parse_size(text)


def test_every_size_option_uses_the_one_parser() -> None:
    # nvme's size and display's vram both accept what egpu.units accepts (fractions included,
    # which nvme's own parser refused) and agree on bare numbers.
    assert NVME_SIZE.parse("1.5M") == 3 * MIB // 2
    vram = next(o for o in device_options("display") if o.name == "vram")
    assert vram.parse("16777216") == 16 * MIB
    assert vram.parse("16MiB") == 16 * MIB
