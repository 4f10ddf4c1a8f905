"""GPU path ``user``: the virtual eGPU, two vfio-user functions served by egpu's device servers.

Pure: a servers directory and options in, a VirtualEgpuPlan out. The plan names the servers
to start (one socket per PCI function, as vfio-user requires) and the QEMU pieces: fd-backed
shared guest RAM (DMA_MAP carries fds only then) and one ``vfio-user-pci`` per function, both
at one guest slot with ``multifunction=on`` on function 0, like a real card.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from egpu.devices.nvme.function import BACKING as NVME_BACKING
from egpu.devices.nvme.function import DEFAULT_SIZE
from egpu.devices.nvme.function import SIZE as NVME_SIZE
from egpu.devices.serve_spec import ServeSpec
from egpu.engine.argv import VmSpec
from egpu.engine.qemu_options import json_option
from egpu.units import format_size

# Clear of the slots QEMU hands out to -device entries without an addr (they count up from 1)
# and of q35's fixed functions at 0x1f.
GUEST_SLOT = 0x10
DEFAULT_NVME_SIZE = format_size(DEFAULT_SIZE)  # as `--nvme-size` shows it
# The guest checks that need the card (egpu/guest/checks).
CHECKS = ("nvme", "display")
DISPLAY, NVME = "display", "nvme"  # the device models at functions 0 and 1


@dataclass(frozen=True)
class DeviceServer:
    """One device server: its PCI function number, what it serves, where its spec and log go."""

    name: str  # the device model (egpu.devices registry)
    function: int  # PCI function number at the guest slot
    spec: ServeSpec
    spec_file: Path  # the vm layer writes ``spec`` here for the server to read
    log: Path

    @property
    def socket(self) -> Path:
        return self.spec.socket


@dataclass(frozen=True)
class VirtualEgpuPlan:
    """The servers to start and the QEMU devices that connect to them."""

    servers: tuple[DeviceServer, ...]
    devices: tuple[tuple[str, ...], ...]
    screenshot_request: Path
    checks: tuple[str, ...] = CHECKS

    def apply(self, spec: VmSpec) -> VmSpec:
        """The spec with shared guest RAM and the card's devices."""
        return replace(spec, memory_backend="memfd-shared", devices=spec.devices + self.devices)


def device_arg(server: DeviceServer, slot: int) -> tuple[str, str]:
    """The ``-device`` for one function (JSON form: the socket is a nested option, and a path
    in JSON needs no escaping)."""
    dev: dict[str, object] = {
        "driver": "vfio-user-pci",
        "id": f"egpu-{server.name}",
        "socket": {"type": "unix", "path": str(server.socket)},
        "addr": f"{slot:#x}.{server.function}",
    }
    if server.function == 0:
        dev["multifunction"] = True
    return ("-device", json_option(dev))


def virtual_egpu_plan(
    servers_dir: Path, *, nvme_backing: Path, nvme_size: str = DEFAULT_NVME_SIZE,
    slot: int = GUEST_SLOT,
) -> VirtualEgpuPlan:
    """Plan the virtual eGPU: display at function 0, the NVMe DMA engine at function 1."""
    request = servers_dir / "screenshot.request"
    display = ServeSpec(DISPLAY, servers_dir / "display.sock", screenshot_request=request)
    # parsed now: a bad --nvme-size fails the plan, before anything starts
    nvme = ServeSpec.parse(NVME, servers_dir / "nvme.sock", {
        NVME_BACKING.name: str(nvme_backing), NVME_SIZE.name: nvme_size})
    servers = tuple(
        DeviceServer(spec.function, number, spec, servers_dir / f"{spec.function}.spec.json",
                     servers_dir / f"{spec.function}.log")
        for number, spec in enumerate((display, nvme)))
    return VirtualEgpuPlan(
        servers=servers, devices=tuple(device_arg(s, slot) for s in servers),
        screenshot_request=request,
    )
