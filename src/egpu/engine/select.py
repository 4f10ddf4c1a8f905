"""Resolve the engine, provisioning the private one when allowed and nothing else fits."""

from __future__ import annotations

from egpu.engine.qemu import APPLE_DEVICE, EngineInfo, find_engine_info, probe
from egpu.errors import EngineError
from egpu.progress import Progress


def ensure_engine_info(
    qemu: str | None = None, *, allow_provision: bool = True, progress: Progress | None = None,
    need: str | None = None,
) -> EngineInfo:
    """Like find_engine_info, but provisions the private engine when no other engine fits.

    Never for ``vfio-apple-pci``: Debian's QEMU does not have it, only the host app's does.
    """
    try:
        return find_engine_info(qemu, need)
    except EngineError:
        if qemu or not allow_provision or need == APPLE_DEVICE:
            raise
    # provisioning brings the Debian client (httpx): imported only when it has to run
    from egpu.engine.provision import provision

    return probe(provision(progress))
