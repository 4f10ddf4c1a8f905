"""PCI address parsing (property tests) and --passthrough slot resolution."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import NotFoundError, UsageError
from egpu.host.address import PciAddress, parse_address, parse_address_pattern
from egpu.host.device import PciDevice
from egpu.host.ioreg import parse_ioreg
from egpu.host.slots import Selection, bound_since_start, function_label, resolve_passthrough

FIXTURES = Path(__file__).parent / "fixtures" / "host"

domains = st.integers(0, 0xFFFF)
buses = st.integers(0, 0xFF)
devices = st.integers(0, 0x1F)
functions = st.integers(0, 7)


def hexcase(draw: st.DrawFn, value: int, width: int) -> str:
    text = f"{value:0{width}x}"
    return text.upper() if draw(st.booleans()) else text


@st.composite
def written(draw: st.DrawFn) -> tuple[str, int | None, int, int, int | None]:
    dom = draw(st.none() | domains)
    bus, dev = draw(buses), draw(devices)
    fn = draw(st.none() | functions)
    text = f"{hexcase(draw, bus, 2)}:{hexcase(draw, dev, 2)}"
    if dom is not None:
        text = f"{hexcase(draw, dom, 4)}:{text}"
    if fn is not None:
        text += f".{fn}"
    return text, dom, bus, dev, fn


@given(written())
def test_pattern_round_trip(case: tuple[str, int | None, int, int, int | None]) -> None:
    text, dom, bus, dev, fn = case
    p = parse_address_pattern(text)
    assert (p.domain, p.bus, p.device, p.function) == (dom, bus, dev, fn)
    assert parse_address_pattern(str(p)) == p


@given(domains, buses, devices, functions)
def test_address_forms(dom: int, bus: int, dev: int, fn: int) -> None:
    a = PciAddress(dom, bus, dev, fn)
    assert parse_address(a.full) == a
    assert parse_address(a.bdf) == PciAddress(0, bus, dev, fn)
    assert parse_address_pattern(a.bdf).matches(PciAddress(dom, bus, dev, fn))
    assert parse_address_pattern(f"{bus:02x}:{dev:02x}").matches(a)
    assert not parse_address_pattern(f"{(bus + 1) % 256:02x}:{dev:02x}").matches(a)


@given(st.text(max_size=20))
def test_junk_is_a_usage_error_or_a_valid_pattern(text: str) -> None:
    try:
        p = parse_address_pattern(text)
    except UsageError:
        return
    assert 0 <= p.bus <= 0xFF and 0 <= p.device <= 0x1F


@pytest.mark.parametrize(
    "text",
    ["", "01", "01:00.8", "01:20.0", "1:2:3:4", "0000:01", "g1:00.0", "01:00.", "12345:01:00.0"],
)
def test_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_address_pattern(text)


def test_function_required_for_parse_address() -> None:
    with pytest.raises(UsageError, match="function"):
        parse_address("01:00")


def test_address_range_is_enforced() -> None:
    with pytest.raises(ValueError):
        PciAddress(0, 0, 32, 0)


def devs(name: str) -> list[PciDevice]:
    return parse_ioreg((FIXTURES / name).read_bytes())


def bdfs(sel: Selection) -> list[str]:
    return [d.address.bdf for d in sel.functions]


def test_auto_takes_the_display_slot_and_skips_audio_with_a_notice() -> None:
    sel = resolve_passthrough(None, devs("ioreg-rtx-bound.plist"))
    assert sel.kind == "devices" and sel.auto and bdfs(sel) == ["08:00.0"]
    assert len(sel.notices) == 1 and "08:00.1" in sel.notices[0] and "audio" in sel.notices[0]


def test_auto_can_include_audio() -> None:
    sel = resolve_passthrough("auto", devs("ioreg-rtx-bound.plist"), include_audio=True)
    assert bdfs(sel) == ["08:00.0", "08:00.1"] and not sel.notices


def test_slot_takes_every_bound_function() -> None:
    sel = resolve_passthrough("08:00", devs("ioreg-rtx-bound.plist"))
    assert bdfs(sel) == ["08:00.0", "08:00.1"] and not sel.auto
    assert str(sel.slot) == "08:00"


def test_function_takes_only_that_function() -> None:
    assert bdfs(resolve_passthrough("08:00.1", devs("ioreg-rtx-bound.plist"))) == ["08:00.1"]
    assert bdfs(resolve_passthrough("0000:08:00.0", devs("ioreg-rtx-bound.plist"))) == ["08:00.0"]


def test_data_center_class_counts_as_display() -> None:
    sel = resolve_passthrough(None, devs("ioreg-datacenter-tb5.plist"))
    assert bdfs(sel) == ["08:00.0"] and sel.functions[0].class_code == 0x030200


def test_none_and_virtual() -> None:
    d = devs("ioreg-rtx-bound.plist")
    assert resolve_passthrough("none", d).kind == "none"
    assert resolve_passthrough("virtual", d).kind == "virtual"


def test_auto_with_nothing_bound_falls_back() -> None:
    d = devs("ioreg-unbound.plist")
    sel = resolve_passthrough(None, d)
    assert sel.kind == "virtual" and sel.auto and "virtual" in sel.notices[0]
    assert resolve_passthrough(None, d, fallback="none").kind == "none"


def test_unbound_slot_is_refused_with_the_reason() -> None:
    with pytest.raises(UsageError, match="VFIOUserPCIDriver"):
        resolve_passthrough("08:00", devs("ioreg-unbound.plist"))
    with pytest.raises(UsageError, match="cannot be passed through"):
        resolve_passthrough("08:00.0", devs("ioreg-unbound.plist"))


def test_unassigned_bars_exclude_the_function() -> None:
    sel = resolve_passthrough("08:00", devs("ioreg-unassigned-bars.plist"))
    assert bdfs(sel) == ["08:00.1"]


def test_missing_address() -> None:
    with pytest.raises(NotFoundError, match="egpu devices"):
        resolve_passthrough("42:00", devs("ioreg-rtx-bound.plist"))
    with pytest.raises(NotFoundError):
        resolve_passthrough("0001:08:00.0", devs("ioreg-rtx-bound.plist"))


def test_bad_spec_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        resolve_passthrough("gpu please", devs("ioreg-rtx-bound.plist"))


def labels(sel: Selection) -> list[str]:
    return [function_label(d) for d in sel.functions]


def test_apple_auto_takes_every_egpu_each_by_root() -> None:
    sel = resolve_passthrough(None, devs("ioreg-dual-egpu.plist"), apple=True)
    assert labels(sel) == ["pcic1-bridge/01:00.0", "pcic2-bridge/01:00.0"]
    assert [len(g) for g in sel.slots] == [1, 1]
    assert all("DART" in n for n in sel.notices) and len(sel.notices) == 2
    # without the apple rules auto still takes one card (GPU path vfio)
    assert len(resolve_passthrough(None, devs("ioreg-dual-egpu.plist")).slots) == 1


def test_root_slash_address_names_one_card() -> None:
    d = devs("ioreg-dual-egpu.plist")
    sel = resolve_passthrough("pcic2-bridge/01:00.0", d, apple=True)
    assert labels(sel) == ["pcic2-bridge/01:00.0"] and sel.functions[0].device_id == 0x2684
    sel = resolve_passthrough("PCIC1-bridge/01:00", d, apple=True)
    assert labels(sel) == ["pcic1-bridge/01:00.0"]  # audio left out, said so
    assert "DART" in sel.notices[0]
    with pytest.raises(NotFoundError, match="pcic1-bridge, pcic2-bridge"):
        resolve_passthrough("pcic9-bridge/01:00", d, apple=True)


def test_plain_address_behind_two_roots_is_ambiguous() -> None:
    with pytest.raises(UsageError, match=r"pcic1-bridge/01:00\.0, pcic2-bridge/01:00\.0"):
        resolve_passthrough("01:00.0", devs("ioreg-dual-egpu.plist"), apple=True)


def test_plain_address_is_fine_when_only_one_root_has_a_claimed_card() -> None:
    # rtx-bound has a wlan and a USB controller at 01:00.0 behind two other root ports
    sel = resolve_passthrough("08:00.0", devs("ioreg-rtx-bound.plist"), apple=True)
    assert labels(sel) == ["pci-bridge2/08:00.0"]


def test_apple_refuses_audio_even_when_named() -> None:
    with pytest.raises(UsageError, match=r"refuses to attach audio.*DART"):
        resolve_passthrough("08:00.1", devs("ioreg-rtx-bound.plist"), apple=True)
    with pytest.raises(UsageError, match="DART"):
        resolve_passthrough("pcic1-bridge/01:00.1", devs("ioreg-dual-egpu.plist"), apple=True)
    # auto ignores include_audio for apple: the extension would refuse the function anyway
    sel = resolve_passthrough(None, devs("ioreg-rtx-bound.plist"), apple=True, include_audio=True)
    assert labels(sel) == ["pci-bridge2/08:00.0"]


def test_flat_dump_selects_without_roots() -> None:
    sel = resolve_passthrough(None, devs("ioreg-flat.plist"), apple=True)
    assert labels(sel) == ["08:00.0"] and sel.functions[0].root is None


def test_gpus_bound_since_a_vm_started() -> None:
    d = devs("ioreg-dual-egpu.plist")
    late = bound_since_start(d, ["pcic1-bridge/01:00.0", "pcic1-bridge/01:00.1"])
    assert [function_label(x) for x in late] == ["pcic2-bridge/01:00.0"]  # displays only
    assert bound_since_start(d, [function_label(x) for x in d]) == ()
