"""devices layer (see DESIGN.md): device models behind the boundary in :mod:`egpu.devices.base`.

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
    "sample": "egpu.devices.sample",  # the protocol test device: no guest driver binds it
}


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
