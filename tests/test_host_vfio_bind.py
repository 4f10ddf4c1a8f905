"""--bind: functions to vfio-pci and back, on a fake sysfs whose kernel is the writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from egpu.errors import HostError
from egpu.host.vfio_bind import BindRecord, bind_to_vfio, current_driver, ensure_vfio_pci, restore
from test_host_sysfs import T

GPU, AUDIO = "0000:01:00.0", "0000:01:00.1"


class FakeKernel:
    """Acts on sysfs writes the way the PCI core does, by moving the driver symlinks."""

    def __init__(self, root: Path, natural: dict[str, str], refuse: set[str] | None = None):
        self.root, self.natural, self.refuse = root, natural, refuse or set()
        self.log: list[tuple[str, str]] = []

    def _attach(self, addr: str, driver: str) -> None:
        dev = self.root / "bus/pci/devices" / addr
        target = self.root / "bus/pci/drivers" / driver
        if not target.is_dir() or addr in self.refuse:
            return
        (dev / "driver").symlink_to(os.path.relpath(target, dev.resolve()))

    def __call__(self, path: Path, value: str) -> None:
        rel = path.relative_to(self.root).as_posix()
        self.log.append((rel, value))
        parts = rel.split("/")
        if rel == "bus/pci/drivers_probe":
            dev = self.root / "bus/pci/devices" / value
            override = (dev / "driver_override").read_text().strip() if (
                dev / "driver_override").exists() else ""
            if not (dev / "driver").is_symlink():
                self._attach(value, override or self.natural.get(value, ""))
        elif parts[-1] == "unbind":
            (self.root / "bus/pci/devices" / value / "driver").unlink()
        elif parts[-1] == "bind":
            self._attach(value, parts[-2])
        elif parts[-1] == "driver_override":
            path.write_text(value)
        else:
            raise AssertionError(f"unexpected write to {rel}")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root: Path = T.build(tmp_path, T.host_functions("nvidia", "snd_hda_intel"))
    return root


def test_bind_and_restore(tree: Path) -> None:
    k = FakeKernel(tree, {GPU: "nvidia", AUDIO: "snd_hda_intel"})
    record = bind_to_vfio([GPU, AUDIO], root=tree, writer=k)
    assert current_driver(tree, GPU) == current_driver(tree, AUDIO) == "vfio-pci"
    assert [r.previous_driver for r in record.rebindings] == ["nvidia", "snd_hda_intel"]
    assert k.log[:3] == [
        (f"bus/pci/devices/{GPU}/driver_override", "vfio-pci"),
        (f"bus/pci/devices/{GPU}/driver/unbind", GPU),
        ("bus/pci/drivers_probe", GPU),
    ]
    # the record survives a round trip through the VM directory
    record = BindRecord.from_json(json.loads(json.dumps(record.to_json())))
    (tree / "bus/pci/drivers/nvidia/bind").write_text("")  # this driver offers a bind file
    assert restore(record, root=tree, writer=k) == []
    assert current_driver(tree, GPU) == "nvidia" and current_driver(tree, AUDIO) == "snd_hda_intel"
    assert ("bus/pci/drivers/nvidia/bind", GPU) in k.log
    assert (tree / "bus/pci/devices" / GPU / "driver_override").read_text() == "\n"


def test_already_on_vfio_is_left_alone(tmp_path: Path) -> None:
    tree = T.build(tmp_path, T.host_functions())
    k = FakeKernel(tree, {})
    record = bind_to_vfio([GPU], root=tree, writer=k)
    assert k.log == [] and restore(record, root=tree, writer=k) == [] and k.log == []
    assert current_driver(tree, GPU) == "vfio-pci"


def test_failure_rolls_back(tree: Path) -> None:
    k = FakeKernel(tree, {GPU: "nvidia", AUDIO: "snd_hda_intel"}, refuse={AUDIO})
    with pytest.raises(HostError, match=r"0000:01:00\.1: still bound to no driver"):
        bind_to_vfio([GPU, AUDIO], root=tree, writer=k)
    assert current_driver(tree, GPU) == "nvidia"  # put back


def test_permission_denied_is_one_clear_error(tree: Path) -> None:
    def deny(path: Path, value: str) -> None:
        raise PermissionError(13, "Permission denied")

    with pytest.raises(HostError, match="needs root"):
        bind_to_vfio([GPU], root=tree, writer=deny)


def test_unknown_address(tree: Path) -> None:
    with pytest.raises(HostError, match="no such PCI function"):
        bind_to_vfio(["0000:09:00.0"], root=tree, writer=FakeKernel(tree, {}))


def test_restore_reports_instead_of_raising(tree: Path) -> None:
    k = FakeKernel(tree, {GPU: "nvidia"})
    record = bind_to_vfio([GPU], root=tree, writer=k)
    k.refuse.add(GPU)
    problems = restore(record, root=tree, writer=k)
    assert problems == [f"{GPU} did not return to nvidia"]


@pytest.mark.parametrize(
    "doc",
    [{}, [1], [{"address": 3}], [{"address": "x/../y"}],
     [{"address": GPU, "previous_driver": "../evil"}]],
)
def test_bad_records(doc: object) -> None:
    with pytest.raises(HostError):
        BindRecord.from_json(doc)


def test_ensure_vfio_pci_on_a_fake_root(tmp_path: Path) -> None:
    tree = T.build(tmp_path, T.host_functions("nvidia", "snd_hda_intel"), vfio_loaded=False)
    with pytest.raises(HostError, match="not loaded"):
        ensure_vfio_pci(tree)
    (tree / "bus/pci/drivers/vfio-pci").mkdir()
    ensure_vfio_pci(tree)
