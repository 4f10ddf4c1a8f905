"""devices layer: the virtual eGPU's PCI functions (display, nvme) behind the narrow boundary in
:mod:`egpu.devices.base`; below vfio_user, above pci and dma (docs/ARCHITECTURE.md).

Each model module declares ``OPTIONS`` (a tuple of :class:`~egpu.devices.options.DeviceOption`)
and exposes ``create(**values) -> DeviceBackend`` taking them as typed values. The registry below
names the modules so the CLI and the VM layer can build a function by name, its ``KEY=VALUE``
strings checked against its declaration first, without importing every model.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType

from egpu.devices.base import DeviceBackend
from egpu.devices.options import DeviceOption, parse_options
from egpu.errors import NotFoundError

# function name -> module declaring its OPTIONS and the ``create`` that builds it.
DEVICE_MODULES: dict[str, str] = {
    "display": "egpu.devices.display",
    "nvme": "egpu.devices.nvme.function",
    "sample": "egpu.devices.sample",  # the protocol test device: no guest driver binds it
}


def _model(name: str) -> ModuleType:
    module = DEVICE_MODULES.get(name)
    if module is None:
        raise NotFoundError(f"no device model named {name!r}",
                            hint=f"known: {', '.join(DEVICE_MODULES)}")
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise NotFoundError(f"device model {name!r} is not available in this build") from e


def device_options(name: str) -> tuple[DeviceOption, ...]:
    """The options the function registered as ``name`` declares."""
    options: tuple[DeviceOption, ...] = _model(name).OPTIONS
    return options


def create_device(name: str, options: Mapping[str, str]) -> DeviceBackend:
    """Build the function registered as ``name`` from ``KEY=VALUE`` strings (UsageError if bad)."""
    model = _model(name)
    values = parse_options(name, model.OPTIONS, options)
    device: DeviceBackend = model.create(**values)
    return device
