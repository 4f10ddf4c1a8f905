"""GPU path ``user``: the virtual eGPU, two vfio-user functions served by egpu's device servers.

Pure: a servers directory and options in, a VirtualEgpuPlan out. The plan names the servers
to start (one socket per PCI function, as vfio-user requires) and the QEMU pieces: fd-backed
shared guest RAM (DMA_MAP carries fds only then) and one ``vfio-user-pci`` per function, both
at one guest slot with ``multifunction=on`` on function 0, like a real card.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from egpu.devices.display import SCREENSHOT_REQUEST
from egpu.devices.nvme.function import BACKING as NVME_BACKING
from egpu.devices.nvme.function import DEFAULT_SIZE
from egpu.devices.nvme.function import SIZE as NVME_SIZE
from egpu.engine.argv import VmSpec
from egpu.engine.qemu_options import json_option
from egpu.units import format_size

# Clear of the slots QEMU hands out to -device entries without an addr (they count up from 1)
# and of q35's fixed functions at 0x1f.
GUEST_SLOT = 0x10
DEFAULT_NVME_SIZE = format_size(DEFAULT_SIZE)  # as `--nvme-size` shows it
# The guest checks that need the card (egpu/guest/checks).
CHECKS = ("nvme", "display")


@dataclass(frozen=True)
class DeviceServer:
    """One device server: which function it serves, on which socket, with which options."""

    name: str  # the device model (egpu.devices registry)
    function: int  # PCI function number at the guest slot
    socket: Path
    log: Path
    options: tuple[str, ...] = ()  # KEY=VALUE, as `egpu vfio-user serve -o`

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "function": self.function, "socket": str(self.socket),
                "log": str(self.log), "options": list(self.options)}


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


def screenshot_request_of(options: object) -> Path | None:
    """The screenshot request file named in a server's recorded options, if any."""
    if not isinstance(options, list | tuple):
        return None
    for option in options:
        key, _, value = str(option).partition("=")
        if key == SCREENSHOT_REQUEST.name and value:
            return Path(value)
    return None


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
    display = DeviceServer(
        "display", 0, servers_dir / "display.sock", servers_dir / "display.log",
        (SCREENSHOT_REQUEST.pair(request),),
    )
    nvme = DeviceServer(
        "nvme", 1, servers_dir / "nvme.sock", servers_dir / "nvme.log",
        (NVME_BACKING.pair(nvme_backing), f"{NVME_SIZE.name}={nvme_size}"),
    )
    servers = (display, nvme)
    return VirtualEgpuPlan(
        servers=servers, devices=tuple(device_arg(s, slot) for s in servers),
        screenshot_request=request,
    )
