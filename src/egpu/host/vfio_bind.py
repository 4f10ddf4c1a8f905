"""Rebind PCI functions to vfio-pci for a VM (``egpu run --bind``) and give them back on stop.

Uses the kernel's sysfs interface (Documentation/ABI/testing/sysfs-bus-pci): write the driver
name to ``devices/X/driver_override``, the address to ``devices/X/driver/unbind``, then the
address to ``bus/pci/drivers_probe`` so the override takes effect. Restoring unbinds from
vfio-pci, clears the override and binds the previous driver again. Works on any sysfs root, so
tests run it against a fake tree whose "kernel" is the writer they pass.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from egpu.errors import HostError
from egpu.host.address import full_address
from egpu.host.device import VFIO_PCI_DRIVER
from egpu.process import run_tool

LIVE_SYSFS = Path("/sys")
PCI_DEVICES = Path("bus/pci/devices")
PCI_DRIVERS = Path("bus/pci/drivers")
DRIVERS_PROBE = Path("bus/pci/drivers_probe")
MODPROBE_TIMEOUT_S = 60

SysfsWriter = Callable[[Path, str], None]


def write_attr(path: Path, value: str) -> None:
    """Write one sysfs attribute (the kernel acts on the write itself)."""
    with path.open("w") as f:
        f.write(value)


@dataclass(frozen=True)
class Rebinding:
    """One function moved to vfio-pci, and the driver it had."""

    address: str  # DDDD:BB:DD.F
    previous_driver: str | None


@dataclass(frozen=True)
class BindRecord:
    """What ``bind_to_vfio`` changed; kept in the VM directory so any later CLI can undo it."""

    rebindings: tuple[Rebinding, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [{"address": r.address, "previous_driver": r.previous_driver}
                for r in self.rebindings]

    @classmethod
    def from_json(cls, doc: object) -> BindRecord:
        """Parse a stored record; HostError when it is not one."""
        if not isinstance(doc, list):
            raise HostError("bind record is not a list")
        out = []
        for item in doc:
            if not isinstance(item, dict) or not isinstance(item.get("address"), str):
                raise HostError("bind record entry has no address")
            prev = item.get("previous_driver")
            if prev is not None and (not isinstance(prev, str) or "/" in prev or not prev):
                raise HostError("bind record names a bad driver")
            # it becomes a sysfs path and is written to the kernel: only the exact form
            if full_address(item["address"]) is None:
                raise HostError("bind record names a bad address")
            out.append(Rebinding(item["address"], prev))
        return cls(tuple(out))


def current_driver(root: Path, address: str) -> str | None:
    """The driver a function is bound to now (None when unbound)."""
    link = root / PCI_DEVICES / address / "driver"
    try:
        return Path(os.readlink(link)).name
    except OSError:
        return None


def _write(writer: SysfsWriter, path: Path, value: str, what: str) -> None:
    try:
        writer(path, value)
    except PermissionError as e:
        raise HostError(f"{what}: permission denied; rebinding devices needs root") from e
    except OSError as e:
        raise HostError(f"{what}: {e.strerror or e}") from e


def ensure_vfio_pci(root: Path = LIVE_SYSFS) -> None:
    """Load the vfio-pci module when its driver is absent (only on the live /sys)."""
    if (root / PCI_DRIVERS / VFIO_PCI_DRIVER).is_dir():
        return
    if root != LIVE_SYSFS:
        raise HostError(f"{root}: the vfio-pci driver is not loaded")
    run_tool(["modprobe", VFIO_PCI_DRIVER], lambda why: HostError(f"cannot load vfio-pci: {why}"),
             timeout=MODPROBE_TIMEOUT_S)
    if not (root / PCI_DRIVERS / VFIO_PCI_DRIVER).is_dir():
        raise HostError("cannot load vfio-pci: the driver did not appear")


def _bind_one(root: Path, address: str, writer: SysfsWriter) -> Rebinding:
    dev = root / PCI_DEVICES / address
    if not dev.exists():
        raise HostError(f"{address}: no such PCI function in {root}")
    previous = current_driver(root, address)
    if previous == VFIO_PCI_DRIVER:
        return Rebinding(address, VFIO_PCI_DRIVER)
    _write(writer, dev / "driver_override", VFIO_PCI_DRIVER, f"{address}: driver_override")
    if previous is not None:
        _write(writer, dev / "driver" / "unbind", address, f"{address}: unbind from {previous}")
    _write(writer, root / DRIVERS_PROBE, address, f"{address}: probe vfio-pci")
    now = current_driver(root, address)
    if now != VFIO_PCI_DRIVER:
        raise HostError(f"{address}: still bound to {now or 'no driver'} after rebinding")
    return Rebinding(address, previous)


def bind_to_vfio(
    addresses: Sequence[str], *, root: Path = LIVE_SYSFS, writer: SysfsWriter = write_attr
) -> BindRecord:
    """Move every function to vfio-pci; on failure, put back the ones already moved."""
    done: list[Rebinding] = []
    try:
        for address in addresses:
            done.append(_bind_one(root, address, writer))
    except HostError:
        restore(BindRecord(tuple(done)), root=root, writer=writer)
        raise
    return BindRecord(tuple(done))


def restore(
    record: BindRecord, *, root: Path = LIVE_SYSFS, writer: SysfsWriter = write_attr
) -> list[str]:
    """Give every function back to its previous driver; returns problems (never raises),
    so a stop always gets as far as it can."""
    problems = []
    for r in reversed(record.rebindings):
        if r.previous_driver == VFIO_PCI_DRIVER:
            continue  # it was on vfio-pci before us: leave it there
        dev = root / PCI_DEVICES / r.address
        try:
            if current_driver(root, r.address) == VFIO_PCI_DRIVER:
                _write(writer, dev / "driver" / "unbind", r.address, f"{r.address}: unbind")
            _write(writer, dev / "driver_override", "\n", f"{r.address}: clear driver_override")
            if r.previous_driver is None:
                continue
            bind = root / PCI_DRIVERS / r.previous_driver / "bind"
            if bind.exists():
                _write(writer, bind, r.address, f"{r.address}: bind {r.previous_driver}")
            else:
                _write(writer, root / DRIVERS_PROBE, r.address, f"{r.address}: reprobe")
            if current_driver(root, r.address) != r.previous_driver:
                problems.append(f"{r.address} did not return to {r.previous_driver}")
        except HostError as e:
            problems.append(str(e))
    return problems
