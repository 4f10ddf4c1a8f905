"""macOS registry-dump parsing: identity, class, pcidebug, dext binding, links, BARs, bad dumps."""

from __future__ import annotations

import contextlib
import plistlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egpu.errors import HostError
from egpu.host.device import DEXT_NAME, PciDevice
from egpu.host.ioreg import parse_ioreg, parse_pcidebug

FIXTURES = Path(__file__).parent / "fixtures" / "host"


def load(name: str, **kw: str) -> list[PciDevice]:
    return parse_ioreg((FIXTURES / name).read_bytes(), origin=name, **kw)


def by_addr(devs: list[PciDevice], bdf: str) -> PciDevice:
    (d,) = [d for d in devs if d.address.bdf == bdf]
    return d


def test_multifunction_gpu_bound_to_the_extension() -> None:
    devs = load("ioreg-rtx-bound.plist")
    gpu, audio = by_addr(devs, "08:00.0"), by_addr(devs, "08:00.1")
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code) == (0x10DE, 0x2B85, 0x030000)
    assert gpu.name == "display" and gpu.is_display and gpu.thunderbolt
    assert gpu.driver == DEXT_NAME and gpu.passthrough_ready and gpu.why_not is None
    # function 1 is claimed by name only (no CFBundleIdentifier): still the extension
    assert audio.is_audio and audio.passthrough_ready
    assert gpu.link is not None
    assert (gpu.link.speed_gts, gpu.link.width, gpu.link.max_speed_gts, gpu.link.max_width) == (
        8.0, 4, 32.0, 16,
    )
    assert gpu.link.degraded


def test_json_entry_has_the_documented_fields() -> None:
    doc = by_addr(load("ioreg-rtx-bound.plist"), "08:00.0").to_json()
    assert doc["address"] == "08:00.0"
    assert (doc["vendor_id"], doc["device_id"], doc["class_code"]) == ("10de", "2b85", "030000")
    assert doc["name"] == "display" and doc["driver"] == DEXT_NAME
    assert doc["passthrough_ready"] is True and "why_not" not in doc


def test_unbound_devices_say_why() -> None:
    devs = load("ioreg-unbound.plist")
    gpu = by_addr(devs, "08:00.0")
    assert not gpu.passthrough_ready and gpu.driver is None
    assert DEXT_NAME in (gpu.why_not or "")
    wlan = next(d for d in devs if d.name == "wlan")
    assert wlan.driver == "AppleBCMWLANBusInterfacePCIe" and not wlan.passthrough_ready
    assert "AppleBCMWLANBusInterfacePCIe" in (wlan.to_json()["why_not"])


def test_bridges_are_never_ready() -> None:
    bridges = [d for d in load("ioreg-rtx-bound.plist") if d.is_bridge]
    assert len(bridges) == 5  # three root ports and the enclosure's two bridges
    assert all(not b.passthrough_ready and "bridge" in (b.why_not or "") for b in bridges)


def test_same_bdf_under_different_roots_are_kept_apart() -> None:
    devs = load("ioreg-rtx-bound.plist")
    assert sorted(d.name for d in devs if d.address.bdf == "01:00.0") == ["usb-xhci", "wlan"]


def test_data_center_gpu_class_0302_is_display() -> None:
    gpu = by_addr(load("ioreg-datacenter-tb5.plist"), "08:00.0")
    assert gpu.class_code == 0x030200 and gpu.is_display and gpu.passthrough_ready


def test_unassigned_bars_are_found() -> None:
    gpu = by_addr(load("ioreg-unassigned-bars.plist"), "08:00.0")
    assert gpu.unassigned_bars == (1, 3)
    assert not gpu.passthrough_ready and "BAR1, BAR3" in (gpu.why_not or "")


def test_whole_registry_root_form() -> None:
    devs = load("ioreg-full-root.plist")
    assert [d.address.bdf for d in devs if d.passthrough_ready] == ["05:00.0", "05:00.1"]


def test_another_bundle_id_does_not_count_as_the_extension() -> None:
    devs = load("ioreg-rtx-bound.plist", bundle_id="com.example.other.Driver")
    gpu, audio = by_addr(devs, "08:00.0"), by_addr(devs, "08:00.1")
    assert not gpu.passthrough_ready  # bound by bundle id only
    assert audio.passthrough_ready  # named VFIOUserPCIDriver


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("ioreg-truncated.plist", "not a readable plist"),
        ("ioreg-malformed.plist", "not a readable plist"),
        ("ioreg-foreign.plist", "another tool"),
        ("ioreg-bad-vendor.plist", "vendor-id has 1 bytes"),
        ("ioreg-bad-pcidebug.plist", "out of PCI range"),
        ("ioreg-bad-reg.plist", "not a multiple of 20"),
    ],
)
def test_bad_dumps_give_one_line_errors(name: str, words: str) -> None:
    with pytest.raises(HostError) as e:
        load(name)
    assert words in str(e.value) and "\n" not in str(e.value) and name in str(e.value)


@pytest.mark.parametrize("data", [b"", b"   \n", b"\x00\x01\x02", b"bplist00garbage", b"[1, 2]"])
def test_garbage_is_a_host_error(data: bytes) -> None:
    with pytest.raises(HostError):
        parse_ioreg(data)


def test_wrong_types_are_host_errors() -> None:
    entry: dict[str, object] = {
        "IOObjectClass": "IOPCIDevice", "IORegistryEntryName": "x", "pcidebug": "1:0:0",
        "vendor-id": "10de", "device-id": b"\x00\x00",
    }
    with pytest.raises(HostError, match="vendor-id is str"):
        parse_ioreg(plistlib.dumps([entry]))
    entry["vendor-id"] = b"\xde\x10"
    entry["IOPCIExpressLinkStatus"] = -5
    with pytest.raises(HostError, match="IOPCIExpressLinkStatus"):
        parse_ioreg(plistlib.dumps([entry]))
    del entry["IOPCIExpressLinkStatus"]
    entry["IORegistryEntryChildren"] = "nope"
    with pytest.raises(HostError, match="not an array"):
        parse_ioreg(plistlib.dumps([entry]))


def test_deep_nesting_is_refused_not_crashing() -> None:
    # Written as text: plistlib's own writer recurses too deeply for this.
    level = "<dict><key>IOObjectClass</key><string>IOService</string>"
    depth = 400
    body = (level + "<key>IORegistryEntryChildren</key><array>") * depth
    body += level + "</dict>" + "</array></dict>" * depth
    data = f'<?xml version="1.0"?><plist version="1.0">{body}</plist>'.encode()
    with pytest.raises(HostError, match="nested"):
        parse_ioreg(data)


@pytest.mark.parametrize(
    ("text", "want"),
    [("3:0:0", (3, 0, 0)), ("3:0:1(2:4)", (3, 0, 1)), ("255:31:7", (255, 31, 7)),
     (" 10:2:3 (0:1) ", (10, 2, 3))],
)
def test_pcidebug(text: str, want: tuple[int, int, int]) -> None:
    assert parse_pcidebug(text) == want


@pytest.mark.parametrize("text", ["", "3:0", "3:0:8", "256:0:0", "a:b:c", "3:0:0(x)", "1:2:3:4"])
def test_pcidebug_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_pcidebug(text)


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=400))
def test_random_bytes_never_escape_as_other_errors(data: bytes) -> None:
    with contextlib.suppress(HostError):
        parse_ioreg(data)


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.binary(max_size=24)
    | st.text(max_size=12)
    | st.sampled_from(["IOPCIDevice", "1:0:0", "3:0:1(2:4)", "VFIOUserPCIDriver"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["IOObjectClass", "IORegistryEntryName", "IORegistryEntryChildren",
                         "vendor-id", "device-id", "class-code", "name", "pcidebug", "reg",
                         "assigned-addresses", "IOPCIExpressLinkStatus", "CFBundleIdentifier"]),
        inner, max_size=6),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(_values)
def test_hostile_plists_give_host_errors_or_devices(tree: object) -> None:
    try:
        data = plistlib.dumps(tree)  # type: ignore[arg-type]
    except (TypeError, OverflowError, ValueError):
        return  # not representable as a plist (None, huge ints, control characters)
    with contextlib.suppress(HostError):
        parse_ioreg(data)


def test_root_port_is_the_topmost_pci_ancestor() -> None:
    devs = load("ioreg-dual-egpu.plist")
    cards = [(d.root, d.address.bdf, d.device_id) for d in devs if d.passthrough_ready]
    assert cards == [
        ("pcic1-bridge", "01:00.0", 0x2B85), ("pcic2-bridge", "01:00.0", 0x2684),
        ("pcic1-bridge", "01:00.1", 0x22E8), ("pcic2-bridge", "01:00.1", 0x22E8),
    ]
    # the root ports themselves have no PCI ancestor
    assert all(d.root is None for d in devs if d.address.bdf == "00:00.0")
    assert by_addr(load("ioreg-rtx-bound.plist"), "08:00.0").root == "pci-bridge2"


def test_ioreg_r_copies_keep_the_nested_root() -> None:
    # the dump prints both cards a second time at top level (no ancestors): still four functions
    devs = [d for d in load("ioreg-dual-egpu.plist") if d.vendor_id == 0x10DE]
    assert len(devs) == 4 and all(d.root for d in devs)


def test_flat_dump_has_no_root_and_still_parses() -> None:
    devs = load("ioreg-flat.plist")
    assert [d.address.bdf for d in devs if d.passthrough_ready] == ["08:00.0", "08:00.1"]
    assert all(d.root is None for d in devs)
    assert by_addr(devs, "08:00.0").to_json()["root"] is None


def test_root_is_in_devices_json() -> None:
    doc = by_addr(load("ioreg-rtx-bound.plist"), "08:00.0").to_json()
    assert doc["root"] == "pci-bridge2"
