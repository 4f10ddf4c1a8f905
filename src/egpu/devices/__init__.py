"""devices layer: the virtual eGPU's PCI functions (display, nvme) behind the narrow boundary in
:mod:`egpu.devices.base`; below vfio_user, above pci and dma (docs/ARCHITECTURE.md).

Each model module exposes ``create(**options) -> DeviceBackend`` (options are the ``--option``
strings of ``egpu vfio-user serve``, already parsed to Python values by the model). The registry
below names them so the CLI and the VM layer can build one by name without importing all.
"""

from __future__ import annotations

import importlib
from typing import Any

from egpu.devices.base import DeviceBackend
from egpu.errors import NotFoundError

# function name -> module whose ``create(**options)`` builds it.
DEVICE_MODULES: dict[str, str] = {
    "display": "egpu.devices.display",
    "nvme": "egpu.devices.nvme",
}


def available_devices() -> list[str]:
    """Names of device models whose module is present and exposes ``create``."""
    names = []
    for name, module in DEVICE_MODULES.items():
        try:
            if callable(getattr(importlib.import_module(module), "create", None)):
                names.append(name)
        except ImportError:
            continue
    return names


def create_device(name: str, **options: Any) -> DeviceBackend:
    """Build the device model registered as ``name`` with ``options``."""
    module = DEVICE_MODULES.get(name)
    if module is None:
        raise NotFoundError(f"no device model named {name!r}",
                            hint=f"known: {', '.join(DEVICE_MODULES)}")
    try:
        factory = importlib.import_module(module).create
    except (ImportError, AttributeError) as e:
        raise NotFoundError(f"device model {name!r} is not available in this build") from e
    device: DeviceBackend = factory(**options)
    return device
