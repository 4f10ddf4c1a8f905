"""Linux discovery from sysfs trees built the way the kernel lays out /sys."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
from hypothesis import given
from hypothesis import strategies as st

from egpu.errors import HostError
from egpu.host.device import PciDevice
from egpu.host.facts import HostSource, discover, read_dev_vfio, vfio_pci_module_available
from egpu.host.slots import resolve_passthrough
from egpu.host.sysfs import SysfsSnapshot, parse_link_speed, parse_resource, read_sysfs

FIXTURES = Path(__file__).parent / "fixtures" / "host"


def load_tree_builder() -> ModuleType:
    name = "egpu_test_sysfs_tree"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, FIXTURES / "sysfs_tree.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    spec.loader.exec_module(mod)
    return mod


T = load_tree_builder()


def dev(snap: SysfsSnapshot, bdf: str) -> PciDevice:
    (d,) = [d for d in snap.devices if d.address.bdf == bdf]
    return d


def test_gpu_bound_to_vfio_pci(tmp_path: Path) -> None:
    snap = read_sysfs(T.build(tmp_path, T.host_functions()))
    gpu, audio = dev(snap, "01:00.0"), dev(snap, "01:00.1")
    assert (gpu.vendor_id, gpu.device_id, gpu.class_code) == (0x10DE, 0x2684, 0x030000)
    assert gpu.driver == "vfio-pci" and gpu.passthrough_ready and gpu.iommu_group == 12
    assert gpu.iommu_group_members == ("0000:01:00.1",) and gpu.iommu_group_viable
    assert gpu.thunderbolt  # "removable"
    assert gpu.link is not None and gpu.link.describe() == "8 GT/s x4 (max 32 GT/s x16)"
    assert audio.passthrough_ready
    assert snap.iommu_enabled and snap.vfio_pci_loaded
    igpu = dev(snap, "00:02.0")
    assert igpu.driver == "i915" and not igpu.passthrough_ready and not igpu.rebindable
    assert "boot display" in (igpu.why_not or "")
    nic = dev(snap, "00:1f.6")
    assert nic.rebindable and "e1000e" in (nic.why_not or "") and "--bind" in (nic.why_not or "")
    bridge = dev(snap, "00:01.0")
    assert not bridge.passthrough_ready and not bridge.rebindable


def test_host_driver_bound_card_is_rebindable(tmp_path: Path) -> None:
    snap = read_sysfs(T.build(tmp_path, T.host_functions("nvidia", "snd_hda_intel")))
    gpu = dev(snap, "01:00.0")
    assert not gpu.passthrough_ready and gpu.rebindable and gpu.iommu_group_viable
    with pytest.raises(Exception, match="cannot be passed through"):
        resolve_passthrough("01:00.0", snap.devices)
    sel = resolve_passthrough("01:00", snap.devices, rebind=True)
    assert [d.address.bdf for d in sel.functions] == ["01:00.0", "01:00.1"]


def test_vfio_bound_gpu_with_a_sibling_on_a_host_driver(tmp_path: Path) -> None:
    snap = read_sysfs(T.build(tmp_path, T.host_functions("vfio-pci", "snd_hda_intel")))
    gpu = dev(snap, "01:00.0")
    # the kernel refuses the group until the audio function leaves snd_hda_intel
    assert not gpu.passthrough_ready and gpu.rebindable
    assert "IOMMU group" in (gpu.why_not or "")


def test_non_viable_group(tmp_path: Path) -> None:
    fns = T.host_functions()
    fns[2].group = 12  # host audio (00:1f.3, snd_hda_intel) shares the card's group
    snap = read_sysfs(T.build(tmp_path, fns))
    gpu = dev(snap, "01:00.0")
    assert not gpu.passthrough_ready and not gpu.rebindable and gpu.iommu_group_viable is False
    assert "0000:00:1f.3" in gpu.iommu_group_members
    assert "other slots" in (gpu.why_not or "")
    sel = resolve_passthrough(None, snap.devices, rebind=True)
    assert sel.kind == "virtual"


def test_iommu_off(tmp_path: Path) -> None:
    fns = T.host_functions("nvidia", "snd_hda_intel")
    for f in fns:
        f.group = None
    snap = read_sysfs(T.build(tmp_path, fns, vfio_loaded=False))
    gpu = dev(snap, "01:00.0")
    assert not snap.iommu_enabled and not snap.vfio_pci_loaded
    assert not gpu.passthrough_ready and not gpu.rebindable
    assert "IOMMU is off" in (gpu.why_not or "")


def test_data_center_gpu(tmp_path: Path) -> None:
    snap = read_sysfs(T.build(tmp_path, T.host_functions(gpu_class=0x030200)))
    sel = resolve_passthrough(None, snap.devices)
    assert [d.address.bdf for d in sel.functions] == ["01:00.0"]
    assert sel.notices and "01:00.1" in sel.notices[0]


def test_unassigned_bar(tmp_path: Path) -> None:
    fns = T.host_functions()
    fns[4].bars = [T.BAR_OK, T.BAR_UNSET, T.BAR_NONE, T.BAR_UNSET, T.BAR_NONE, T.BAR_NONE]
    snap = read_sysfs(T.build(tmp_path, fns))
    gpu = dev(snap, "01:00.0")
    assert gpu.unassigned_bars == (1, 3) and not gpu.passthrough_ready and not gpu.rebindable


def test_thunderbolt_devices(tmp_path: Path) -> None:
    tbs = [T.Tb("0-1", "Razer Core X"), T.Tb("0-3", "TB5 Dock", authorized=0, rx_speed="40.0 Gb/s")]
    snap = read_sysfs(T.build(tmp_path, T.host_functions(), thunderbolt=tbs))
    assert [t.name for t in snap.thunderbolt] == ["0-1", "0-3"]
    assert snap.thunderbolt[0].authorized and not snap.thunderbolt[0].is_tb5
    assert snap.thunderbolt[1].authorized is False and snap.thunderbolt[1].is_tb5


@pytest.mark.parametrize(
    ("file", "content", "words"),
    [("vendor", "zz\n", "not a hex number"), ("class", "0x1000000\n", "out of range"),
     ("resource", "0x0 0x1\n", "fields")],
)
def test_malformed_attributes(tmp_path: Path, file: str, content: str, words: str) -> None:
    T.build(tmp_path, T.host_functions())
    (tmp_path / "devices/pci0000:00/0000:01:00.0" / file).write_text(content)
    with pytest.raises(HostError, match=words) as e:
        read_sysfs(tmp_path)
    assert "0000:01:00.0" in str(e.value)


def test_missing_vendor(tmp_path: Path) -> None:
    T.build(tmp_path, T.host_functions())
    (tmp_path / "devices/pci0000:00/0000:01:00.0/vendor").unlink()
    with pytest.raises(HostError, match="missing"):
        read_sysfs(tmp_path)


def test_not_a_sysfs_tree(tmp_path: Path) -> None:
    with pytest.raises(HostError, match="copy of /sys"):
        read_sysfs(tmp_path)
    (tmp_path / "bus/pci/devices/not-an-address").mkdir(parents=True)
    with pytest.raises(HostError, match="not a PCI address"):
        read_sysfs(tmp_path)


def test_discover_through_a_source(tmp_path: Path) -> None:
    T.build(tmp_path, T.host_functions())
    found = discover(HostSource(sysfs=tmp_path))
    assert found.platform == "linux" and len(found.devices) == 6
    with pytest.raises(HostError, match="not a directory"):
        discover(HostSource(sysfs=tmp_path / "nope"))
    with pytest.raises(HostError, match="not both"):
        discover(HostSource(sysfs=tmp_path, ioreg=tmp_path))
    found = discover(HostSource(ioreg=FIXTURES / "ioreg-rtx-bound.plist"))
    assert found.platform == "macos"
    with pytest.raises(HostError, match="cannot read"):
        discover(HostSource(ioreg=tmp_path / "absent.plist"))


def test_live_sysfs_of_this_machine_parses() -> None:
    # The real kernel's /sys: whatever it holds must parse without error.
    if not Path("/sys/bus/pci/devices").is_dir():
        pytest.fail("this Linux test machine has no /sys/bus/pci")
    snap = read_sysfs(Path("/sys"))
    assert all(d.address.full for d in snap.devices)


@pytest.mark.parametrize(
    ("text", "want"),
    [("8.0 GT/s PCIe", 8.0), ("2.5 GT/s", 2.5), ("Unknown", None), ("", None), (None, None),
     ("20.0 Gb/s", 20.0), ("99999 GT/s", None)],
)
def test_link_speed(text: str | None, want: float | None) -> None:
    assert parse_link_speed(text) == want


def test_resource_parsing() -> None:
    ok = "0x00000000f0000000 0x00000000f0ffffff 0x0000000000040200"
    unset = "0x0000000000000000 0x000000000fffffff 0x0000000020040200"
    none = "0x0000000000000000 0x0000000000000000 0x0000000000000000"
    assert parse_resource("\n".join([ok, unset, none, ok, none, none, none])) == (1,)
    with pytest.raises(ValueError):
        parse_resource("0xzz 0x0 0x0")


def test_dev_vfio(tmp_path: Path) -> None:
    (tmp_path / "vfio").mkdir()
    (tmp_path / "vfio/vfio").write_text("")
    (tmp_path / "vfio/12").write_text("")
    v = read_dev_vfio(tmp_path)
    assert v.container_exists and v.container_access and v.groups == {12: True}
    assert not read_dev_vfio(tmp_path / "none").container_exists


def test_vfio_module_lookup(tmp_path: Path) -> None:
    k = tmp_path / "6.1.0-test"
    k.mkdir()
    (k / "modules.dep").write_text("kernel/drivers/net/e1000e.ko:\n")
    assert not vfio_pci_module_available(tmp_path, "6.1.0-test")
    (k / "modules.dep").write_text("kernel/drivers/vfio/pci/vfio-pci.ko: kernel/x.ko\n")
    assert vfio_pci_module_available(tmp_path, "6.1.0-test")


@given(st.text(max_size=300))
def test_resource_text_is_parsed_or_refused(text: str) -> None:
    try:
        bars = parse_resource(text)
    except ValueError:
        return
    assert all(0 <= i < 6 for i in bars)


@given(st.text(max_size=30))
def test_link_speed_text_never_raises(text: str) -> None:
    v = parse_link_speed(text)
    assert v is None or 0 < v <= 1024
